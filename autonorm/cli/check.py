"""`autonorm check`: run every available backend against the reference on a small grid.

Interpreters and simulators count (Triton with TRITON_INTERPRET=1, Numba CUDA
with NUMBA_ENABLE_CUDASIM=1, CuPy's CUDA C++ with --cupy-on-cpu): they prove the
generated code computes the right thing, never how fast it is. Prints one line
per (backend, spec) and exits 1 if anything failed.
"""
from __future__ import annotations

import shutil
import sys
import time


def add_arguments(parser) -> None:
    from ..spec import DTYPE_LIST
    from .args import add_device, add_list, positive_int

    add_list(parser, "--backends", help="backend names (default: every available one)")
    add_list(parser, "--hidden", kind=positive_int, default=[7, 760, 4096], help="hidden sizes N")
    add_list(parser, "--dtypes", default=list(DTYPE_LIST), help="input dtypes (float32, float16, bfloat16 or fp32 ...)")
    parser.add_argument("--rows", type=positive_int, default=4, help="rows per check")
    parser.add_argument("--cupy-on-cpu", action="store_true",
                        help="run the CuPy backend's CUDA C++ on the CPU: g++ builds it against autonorm's model of "
                             "CUDA's execution (threads as fibers, shared memory, clusters, guard pages), no GPU "
                             "needed; without --backends, only cupy runs")
    add_device(parser)


def main(args) -> int:
    from .. import verify
    from ..backends import get_backend
    from ..backends.base import poison_outputs
    from ..errors import AutonormError
    from ..spec import MAX_HIDDEN, NormSpec
    from .args import UsageError, backend_names, device_arg, dtype_names

    device = device_arg(args.device)
    hidden, dtypes = args.hidden, dtype_names(args.dtypes)
    names = backend_names(args.backends or (["cupy"] if args.cupy_on_cpu else None), device)
    too_big = [n for n in hidden if n > MAX_HIDDEN]
    if too_big:
        raise UsageError(f"--hidden {too_big[0]} is above the kernels' maximum {MAX_HIDDEN}")
    poison_outputs(True)  # unwritten outputs show up as NaN
    specs = [NormSpec(op, direction, dt, dt, n, bias=op == "layernorm")
             for op in ("rmsnorm", "layernorm") for direction in ("fwd", "bwd") for dt in dtypes for n in hidden]
    header = (f"{'backend':<10} {'op':<10} {'dir':<4} {'dtype':<9} {'N':>6} {'max err':>10} {'tol':>8} "
              f"{'compile s':>9}  result")
    print(f"autonorm check on {device}" + (" (cupy: its CUDA C++ on the CPU)" if args.cupy_on_cpu else ""))
    print(header)
    print("-" * len(header))
    failures = total = 0
    for name in names:
        backend = get_backend(name)
        on_cpu = args.cupy_on_cpu and name == "cupy"
        if on_cpu:
            reason = None if shutil.which("g++") else "g++ is not on PATH (it builds the CUDA C++ for the CPU)"
        else:
            reason = backend.unavailable_reason() or (
                None if backend.supports_device(device) else f"does not run on {device}")
        if reason:
            print(f"{name:<10} skipped: {reason}")
            continue
        host_kernel = _host_kernels(backend, specs) if on_cpu else None
        for spec in specs:
            total += 1
            started = time.perf_counter()
            try:
                if on_cpu:
                    kernel = host_kernel(spec)
                else:
                    kernel = backend.compile(spec, backend.heuristic(spec), device)
                compile_s = time.perf_counter() - started
                result = verify.check_kernel(spec, kernel, args.rows, "cpu" if on_cpu else device)
                err, tol, ok = result.max_error, result.tolerance, result.ok
                status = "pass" if ok else "FAIL"
            except (AutonormError, RuntimeError, ValueError, TypeError) as exc:
                compile_s, err, tol, ok = time.perf_counter() - started, float("nan"), float("nan"), False
                status = f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            failures += not ok
            print(f"{name:<10} {spec.op:<10} {spec.direction:<4} {spec.x_dtype:<9} {spec.hidden:>6} {err:>10.2e} "
                  f"{tol:>8.0e} {compile_s:>9.2f}  {status}", flush=True)
    print(f"{total - failures} passed, {failures} failed")
    if total == 0:
        print("autonorm check: nothing ran: every backend was skipped", file=sys.stderr)
        return 1
    return 1 if failures else 0


def _host_kernels(backend, specs):
    """spec -> the CuPy kernel of its heuristic config on the CPU; the first request builds every spec's kernel
    in one g++ call (its time shows on that spec's line, an error on every spec's)."""
    from .. import cuda_host
    from ..errors import AutonormError

    built = {}

    def kernel(spec):
        if not built:
            try:
                built.update(zip(specs, cuda_host.compile_kernels([(s, backend.heuristic(s)) for s in specs])))
            except AutonormError as exc:
                built.update(dict.fromkeys(specs, exc))
        if isinstance(built[spec], Exception):
            raise built[spec]
        return built[spec]

    return kernel
