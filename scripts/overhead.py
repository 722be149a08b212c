"""Host cost per call on tiny inputs, where dispatch dominates (the goal: no slower than torch's own call).

    python scripts/overhead.py [--rows 1] [--hidden 64] [--device cpu|cuda] [--no-breakdown]

For each op it times, per call (best of several repeats of many calls):
  torch     torch.nn.functional.rms_norm / layer_norm
  autonorm  autonorm.rms_norm / layer_norm (validation + key lookup + the resolved kernel)
  ratio     autonorm / torch (the goal on CPU: <= 1.0 for rms_norm, <= 1.5 for layer_norm)
  grad      the same two calls with x and the parameters requiring grad (forward only: the
            autograd node is recorded, no backward is run), and their ratio
  kernel    the resolved kernel called directly, as autonorm calls it without grad (its
            `y_only` entry when it has one): what autonorm cannot go below
  op        the same call through the torch.library custom op (the path torch.compile uses)
  added     autonorm - kernel: validation, key, dict lookup (goal on a GPU: <= 2 us)
With --first-call, what a key's first call costs instead: the first-use check of a kernel no tuning
run verified (timed alone on the resolved kernel), and the whole first call in fresh processes
with the check and with AUTONORM_SKIP_FIRST_USE_CHECK=1.
Then a per-layer breakdown of the no-grad call (each layer timed alone, so the rows add up
only roughly). GPU timings synchronize once per batch of calls, so they measure host cost.
The header prints the load average: on a shared machine, quote it with the numbers.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import timeit
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

import autonorm
from autonorm import dispatch, first_use, functional, ops
from autonorm.backends.base import new_empty
from autonorm.device import identity


def per_call_us(fn, device, number=5000, repeat=7) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def batch():
        for _ in range(number):
            fn()
        sync()

    batch()  # warm-up: resolve, compile
    return min(timeit.repeat(batch, number=1, repeat=repeat)) / number * 1e6


def breakdown(name, op, x, w, b, eps, torch_fn, autonorm_fn, kernel, device, number):
    """(layer, us) rows of one no-grad call, outermost first."""
    n = x.shape[-1]
    key = dispatch.make_key(op, "fwd", x, w, b, None, 0.0)
    y_only = getattr(kernel, "y_only", None)
    rows = [
        (f"torch F.{name}", torch_fn),
        (f"autonorm.{name} (total)", autonorm_fn),
        ("  functional: _fast_n (argument checks)", lambda: functional._fast_n(x, (n,), w, b)),
        ("  ops.norm_fwd (everything below)", lambda: ops.norm_fwd(x, w, b, None, op, eps, 0.0)),
        ("    is_compiling + is_grad_enabled", lambda: (torch.compiler.is_compiling(), torch.is_grad_enabled())),
        ("    dispatch.make_key", lambda: dispatch.make_key(op, "fwd", x, w, b, None, 0.0)),
        ("    dispatch.choice_for (dict lookup)", lambda: dispatch.choice_for(key)),
    ]
    if y_only is not None:
        rows.append(("    kernel.y_only (launcher + kernel)", lambda: y_only(x, w, b, eps, 0.0)))
    rows.append(("    kernel, full (+ mean/rstd outputs)", lambda: kernel(x, w, b, None, eps, 0.0)))
    rows.append(("      output allocation (empty_like)", lambda: torch.empty_like(x)))
    rows.append(("      output allocation (new_empty)", lambda: new_empty(tuple(x.shape), x.dtype, x.device)))
    numba_kernels = getattr(kernel, "dispatchers", None)
    if numba_kernels is not None and x.numel() < 1 << 15:
        serial = numba_kernels[1]
        y = torch.empty_like(x)
        addrs = (x.data_ptr(), w.data_ptr() if w is not None else 0, b.data_ptr() if b is not None else 0,
                 y.data_ptr())
        m = x.shape[0]
        rows.append(("      Numba serial kernel call (addresses ready)",
                     lambda: serial(addrs[0], n, 0, 0, addrs[1], addrs[2], addrs[3], 0, 0, 0, m, n, eps, 0.0, 1)))
    print(f"\nbreakdown: {name} ({dispatch.choice_for(key).backend}), no grad")
    for label, fn in rows:
        print(f"  {label:<48} {per_call_us(fn, device, number):7.2f} us")


# One process: import, tensors, then the timed first call (resolution, compile or cache load, check), and
# the part of it spent in the first-use check.
_FIRST_CALL = """
import time, torch, autonorm
from autonorm import first_use
spent = []
real_check = first_use.check_call
def timed_check(*args):
    start = time.perf_counter()
    try:
        return real_check(*args)
    finally:
        spent.append(time.perf_counter() - start)
first_use.check_call = timed_check
x = torch.randn({rows}, {n}, device="{device}", dtype=torch.{dtype})
w = torch.randn({n}, device="{device}", dtype=torch.{dtype})
start = time.perf_counter()
autonorm.{call}
{sync}
print((time.perf_counter() - start) * 1e3, sum(spent) * 1e3)
"""


def first_call(args, device, x, w, b) -> None:
    """ms of the first-use check alone (warm), and of a whole first call in fresh processes with the part
    spent checking: with no verdict yet, and with the verdict on file. The processes share a private
    AUTONORM_CACHE_DIR, warmed once, so compiled kernels load from it as they would for a user."""
    cache = tempfile.mkdtemp(prefix="autonorm-first-call-")
    n = args.hidden
    for name, op, bias, eps, call in (("rms_norm", "rmsnorm", None, 1e-6, f"rms_norm(x, ({n},), w, 1e-6)"),
                                      ("layer_norm", "layernorm", b, 1e-5, f"layer_norm(x, ({n},), w, w, 1e-5)")):
        auto = autonorm.rms_norm if bias is None else partial(autonorm.layer_norm, bias=bias)
        auto(x, (n,), w, eps=eps)
        choice = dispatch.choice_for(dispatch.make_key(op, "fwd", x, w, bias, None, 0.0))
        torch_kernel = dispatch._make_choice("torch", choice.spec, None, device, "torch").kernel
        check = partial(first_use.check_call, choice.spec, choice.kernel, torch_kernel, (x, w, bias, None, eps, 0.0),
                        device)
        assert check() is None, "the resolved kernel fails its first-use check"
        check_ms = min(timeit.repeat(check, number=20, repeat=5)) / 20 * 1e3
        code = _FIRST_CALL.format(rows=args.rows, n=n, device=device, dtype=args.dtype, call=call,
                                  sync="torch.cuda.synchronize()" if device.type == "cuda" else "")

        def run() -> tuple[float, float]:
            env = {**os.environ, "AUTONORM_CACHE_DIR": cache}
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            total, checking = out.stdout.strip().splitlines()[-1].split()
            return float(total), float(checking)

        run()  # fills the private compile cache
        times = {"no verdict yet": [], "verdict on file": []}
        for _ in range(args.first_call_runs):
            shutil.rmtree(Path(cache) / "verdicts", ignore_errors=True)
            times["no verdict yet"].append(run())
            times["verdict on file"].append(run())
        first = "; ".join(f"{label}: {statistics.median(t for t, _ in v):.0f} ms, of which checking "
                          f"{statistics.median(c for _, c in v):.1f} ms" for label, v in times.items())
        print(f"{name:<11} {choice.backend} [{choice.config.short()}] (rung: {choice.rung}): check alone, warm "
              f"{check_ms:.2f} ms. First call (median of {args.first_call_runs} processes) {first}")
        # Steady state: the same key resolved with and without the check, alternated, best of each.
        steady = {"checked": [], "unchecked": []}
        for _ in range(args.first_call_runs):
            for label, skip in (("checked", "0"), ("unchecked", "1")):
                os.environ["AUTONORM_SKIP_FIRST_USE_CHECK"] = skip
                dispatch.reset()
                auto(x, (n,), w, eps=eps)  # resolves, and checks unless skipped
                steady[label].append(per_call_us(partial(auto, x, (n,), w, eps=eps), device, args.number))
        os.environ.pop("AUTONORM_SKIP_FIRST_USE_CHECK")
        print(f"{'':<11} steady state, best of {args.first_call_runs} alternated runs: "
              + ", ".join(f"{label} {min(v):.2f} us" for label, v in steady.items()))
    shutil.rmtree(cache, ignore_errors=True)


def _calls(torch_f, auto_f, n, eps, plain, grad):
    """The four timed calls (torch / autonorm, without / with grad); bias only when given."""
    def bind(fn, x, w, b):
        return (lambda: fn(x, (n,), w, eps)) if b is None else (lambda: fn(x, (n,), w, b, eps))
    return bind(torch_f, *plain), bind(auto_f, *plain), bind(torch_f, *grad), bind(auto_f, *grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--number", type=int, default=5000)
    parser.add_argument("--no-breakdown", action="store_true")
    parser.add_argument("--first-call", action="store_true", help="time a key's first call instead (see above)")
    parser.add_argument("--first-call-runs", type=int, default=5)
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    n = args.hidden
    x = torch.randn(args.rows, n, device=device, dtype=dtype)
    w = torch.randn(n, device=device, dtype=dtype)
    b = torch.randn(n, device=device, dtype=dtype)
    xg, wg, bg = (t.clone().requires_grad_(True) for t in (x, w, b))
    cases = {
        "rms_norm": ("rmsnorm", None, 1e-6, F.rms_norm, autonorm.rms_norm),
        "layer_norm": ("layernorm", b, 1e-5, F.layer_norm, autonorm.layer_norm),
    }
    load = " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"device {device} ({identity(device)['name']}), x {list(x.shape)} {args.dtype}, "
          f"torch {torch.__version__}, autonorm {autonorm.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, load average {load}; "
          f"microseconds per call")
    if args.first_call:
        first_call(args, device, x, w, b)
        return
    header = (f"{'op':<11} {'backend':<10} {'torch':>7} {'autonorm':>9} {'ratio':>6} {'goal':>5} "
              f"{'torch(g)':>8} {'auto(g)':>8} {'ratio(g)':>8} {'kernel':>7} {'op':>7} {'added':>6}")
    print(header)
    print("-" * len(header))
    details = []
    for name, (op, bias, eps, torch_f, auto_f) in cases.items():
        torch_fn, auto_fn, torch_g, auto_g = _calls(torch_f, auto_f, n, eps, (x, w, bias),
                                                    (xg, wg, bg if bias is not None else None))
        auto_fn()  # the first call resolves the key and runs any first-use check: the memo then holds the kernel
        choice = dispatch.choice_for(dispatch.make_key(op, "fwd", x, w, bias, None, 0.0))
        kernel = choice.kernel
        y_only = getattr(kernel, "y_only", None)
        direct = (partial(y_only, x, w, bias, eps, 0.0) if y_only is not None
                  else partial(kernel, x, w, bias, None, eps, 0.0))
        t_torch = per_call_us(torch_fn, device, args.number)
        t_auto = per_call_us(auto_fn, device, args.number)
        t_torch_g = per_call_us(torch_g, device, args.number)
        t_auto_g = per_call_us(auto_g, device, args.number)
        t_kernel = per_call_us(direct, device, args.number)
        t_op = per_call_us(partial(ops.norm_fwd_op, x, w, bias, None, op, eps, 0.0), device, args.number)
        goal = 1.0 if name == "rms_norm" else 1.5
        print(f"{name:<11} {choice.backend:<10} {t_torch:7.2f} {t_auto:9.2f} {t_auto / t_torch:6.2f} {goal:5.1f} "
              f"{t_torch_g:8.2f} {t_auto_g:8.2f} {t_auto_g / t_torch_g:8.2f} {t_kernel:7.2f} {t_op:7.2f} "
              f"{t_auto - t_kernel:6.2f}")
        details.append((name, op, x, w, bias, eps, torch_fn, auto_fn, kernel))
    print("ratio = autonorm / torch; (g) = inputs requiring grad (forward only); "
          "added = autonorm - kernel (validation, key, dict lookup)")
    if not args.no_breakdown:
        for name, op, x_, w_, b_, eps, torch_fn, auto_fn, kernel in details:
            breakdown(name, op, x_, w_, b_, eps, torch_fn, auto_fn, kernel, device, args.number)


if __name__ == "__main__":
    main()
