"""`autonorm check`: run every available backend against the reference on a small grid.

Interpreters and simulators count (Triton with TRITON_INTERPRET=1, Numba CUDA
with NUMBA_ENABLE_CUDASIM=1): they prove the generated code computes the right
thing, never how fast it is. Prints one line per (backend, spec) and exits 1 if
anything failed.
"""
from __future__ import annotations

import time

import torch

HELP = "run every available backend against the reference on a small grid"


def add_arguments(parser) -> None:
    parser.add_argument("--backends", default=None, help="comma-separated backend names (default: all available)")
    parser.add_argument("--hidden", default="7,760,4096", help="comma-separated hidden sizes")
    parser.add_argument("--dtypes", default="float32,float16,bfloat16")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def _backend_names(requested: str | None, device: torch.device) -> list[str]:
    from .backends import available, get_backend

    if requested:
        names = [n.strip() for n in requested.split(",") if n.strip()]
        for name in names:
            get_backend(name)  # an unknown name fails here, listing the known ones
        return names
    return available(device)


def main(args) -> int:
    from . import verify
    from .backends import get_backend
    from .backends.base import poison_outputs
    from .errors import AutonormError
    from .spec import DTYPE_ALIASES, NormSpec

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    hidden = [int(n) for n in args.hidden.split(",")]
    dtypes = [DTYPE_ALIASES.get(d.strip(), d.strip()) for d in args.dtypes.split(",")]
    poison_outputs(True)  # unwritten outputs show up as NaN
    header = f"{'backend':<10} {'op':<10} {'dir':<4} {'dtype':<9} {'N':>6} {'max err':>10} {'tol':>8} {'compile s':>9}  result"
    print(f"autonorm check on {device}")
    print(header)
    print("-" * len(header))
    failures = total = 0
    for name in _backend_names(args.backends, device):
        backend = get_backend(name)
        reason = backend.unavailable_reason() or (None if backend.supports_device(device) else f"does not run on {device}")
        if reason:
            print(f"{name:<10} skipped: {reason}")
            continue
        for op in ("rmsnorm", "layernorm"):
            for direction in ("fwd", "bwd"):
                for dt in dtypes:
                    for n in hidden:
                        spec = NormSpec(op, direction, dt, dt, n, bias=op == "layernorm")
                        total += 1
                        started = time.perf_counter()
                        try:
                            kernel = backend.compile(spec, backend.heuristic(spec), device)
                            compile_s = time.perf_counter() - started
                            result = verify.check_kernel(spec, kernel, args.rows, device)
                            err, tol, ok = result.max_error, result.tolerance, result.ok
                            status = "pass" if ok else "FAIL"
                        except (AutonormError, RuntimeError, ValueError, TypeError) as exc:
                            compile_s, err, tol, ok = time.perf_counter() - started, float("nan"), float("nan"), False
                            status = f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
                        failures += not ok
                        print(f"{name:<10} {op:<10} {direction:<4} {dt:<9} {n:>6} {err:>10.2e} {tol:>8.0e} "
                              f"{compile_s:>9.2f}  {status}", flush=True)
    print(f"{total - failures} passed, {failures} failed")
    return 1 if failures else 0
