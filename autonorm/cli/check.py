"""`autonorm check`: run every available backend against the reference on a small grid.

Interpreters and simulators count (Triton with TRITON_INTERPRET=1, Numba CUDA
with NUMBA_ENABLE_CUDASIM=1): they prove the generated code computes the right
thing, never how fast it is. Prints one line per (backend, spec) and exits 1 if
anything failed.
"""
from __future__ import annotations

import sys
import time



def add_arguments(parser) -> None:
    from .args import add_device, add_list, positive_int
    from ..spec import DTYPE_LIST

    add_list(parser, "--backends", help="backend names (default: every available one)")
    add_list(parser, "--hidden", kind=positive_int, default=[7, 760, 4096], help="hidden sizes N")
    add_list(parser, "--dtypes", default=list(DTYPE_LIST), help="input dtypes (float32, float16, bfloat16 or fp32 ...)")
    parser.add_argument("--rows", type=positive_int, default=4, help="rows per check")
    add_device(parser)


def main(args) -> int:
    from .. import verify
    from ..backends import get_backend
    from ..backends.base import poison_outputs
    from ..errors import AutonormError
    from .args import UsageError, backend_names, device_arg, dtype_names
    from ..spec import MAX_HIDDEN, NormSpec

    device = device_arg(args.device)
    hidden, dtypes = args.hidden, dtype_names(args.dtypes)
    names = backend_names(args.backends, device)
    too_big = [n for n in hidden if n > MAX_HIDDEN]
    if too_big:
        raise UsageError(f"--hidden {too_big[0]} is above the kernels' maximum {MAX_HIDDEN}")
    poison_outputs(True)  # unwritten outputs show up as NaN
    header = (f"{'backend':<10} {'op':<10} {'dir':<4} {'dtype':<9} {'N':>6} {'max err':>10} {'tol':>8} "
              f"{'compile s':>9}  result")
    print(f"autonorm check on {device}")
    print(header)
    print("-" * len(header))
    failures = total = 0
    for name in names:
        backend = get_backend(name)
        reason = backend.unavailable_reason() or (
            None if backend.supports_device(device) else f"does not run on {device}")
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
    if total == 0:
        print("autonorm check: nothing ran: every backend was skipped", file=sys.stderr)
        return 1
    return 1 if failures else 0
