"""Host cost per call on tiny inputs, where dispatch dominates (issue 5's overhead goal).

    python scripts/overhead.py [--rows 1] [--hidden 64] [--device cpu|cuda]

For each op it times, per call (best of several repeats of many calls):
  torch     torch.nn.functional.rms_norm / layer_norm
  autonorm  autonorm.rms_norm / layer_norm (validation + key lookup + the resolved kernel)
  kernel    the resolved kernel called directly (what autonorm cannot go below)
  op        the same call through the torch.library custom op (the path torch.compile uses)
and prints autonorm / torch (the goal: <= 1.0 for rms_norm, <= 1.5 for layer_norm on CPU)
and autonorm - kernel (the dispatcher's own cost; goal on a GPU: <= 2 us).
GPU timings synchronize once per batch of calls, so they measure host cost, not the kernel.
"""
from __future__ import annotations

import argparse
import timeit

import torch
import torch.nn.functional as F

import autonorm
from autonorm import dispatch, ops
from autonorm.device import identity


def per_call_us(fn, device, number=5000, repeat=7) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def batch():
        for _ in range(number):
            fn()
        sync()

    batch()  # warm-up: resolve, compile
    return min(timeit.repeat(batch, number=1, repeat=repeat)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--number", type=int, default=5000)
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    n = args.hidden
    x = torch.randn(args.rows, n, device=device, dtype=dtype)
    w = torch.randn(n, device=device, dtype=dtype)
    b = torch.randn(n, device=device, dtype=dtype)
    cases = {
        "rms_norm": (lambda: F.rms_norm(x, (n,), w, 1e-6), lambda: autonorm.rms_norm(x, (n,), w, 1e-6),
                     ("rmsnorm", x, w, None, None, 1e-6, 0.0)),
        "layer_norm": (lambda: F.layer_norm(x, (n,), w, b, 1e-5), lambda: autonorm.layer_norm(x, (n,), w, b, 1e-5),
                       ("layernorm", x, w, b, None, 1e-5, 0.0)),
    }
    print(f"device {device} ({identity(device)['name']}), x {list(x.shape)} {args.dtype}, "
          f"torch {torch.__version__}, autonorm {autonorm.__version__}; microseconds per call")
    header = (f"{'op':<11} {'backend':<10} {'torch':>7} {'autonorm':>9} {'kernel':>7} {'op':>7} "
              f"{'ratio':>6} {'added':>6}")
    print(header)
    print("-" * len(header))
    for name, (torch_fn, autonorm_fn, (op, *kargs)) in cases.items():
        choice = dispatch.choice_for_tensors(op, "fwd", kargs[0], kargs[1], kargs[2], kargs[3], kargs[5])
        kernel = choice.kernel
        t_torch = per_call_us(torch_fn, device, args.number)
        t_auto = per_call_us(autonorm_fn, device, args.number)
        t_kernel = per_call_us(lambda: kernel(*kargs), device, args.number)
        t_op = per_call_us(lambda: ops.norm_fwd_op(*kargs[:4], op, *kargs[4:]), device, args.number)
        print(f"{name:<11} {choice.backend:<10} {t_torch:7.2f} {t_auto:9.2f} {t_kernel:7.2f} {t_op:7.2f} "
              f"{t_auto / t_torch:6.2f} {t_auto - t_kernel:6.2f}")
    print("ratio = autonorm / torch; added = autonorm - kernel (validation, key, dict lookup)")


if __name__ == "__main__":
    main()
