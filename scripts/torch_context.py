"""A CPU kernel timed alone and timed as it runs in a torch program (right after a torch op).

    python scripts/torch_context.py                       # 4096-wide LayerNorm fp32 forward, 1024 rows
    python scripts/torch_context.py --op rmsnorm --dtype bfloat16 --hidden 1024

    python scripts/torch_context.py --pool numba          # the parallel kernel on Numba's pool instead

After each op, torch's OpenMP threads spin for a while (libgomp's default wait policy) on the cores that
another thread pool then wants, so a parallel numba-cpu kernel on Numba's pool that follows a torch op is
slower than the same kernel timed back to back with itself; on torch's own team (where torch runs on GNU
OpenMP, the default) it is not. `autonorm.measure.CpuTimer` times every call after a torch op
(`AfterTorchOp`); this script shows what that changes: each kernel timed both ways, in interleaved rounds
(the two protocols alternate, so drift hits both), with the median of each.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from datetime import datetime, timezone

import torch

from autonorm.backends import get_backend
from autonorm.measure import CpuTimer
from autonorm.spec import NormSpec


def kernels(spec: NormSpec) -> dict:
    """The 2-thread heuristic numba-cpu kernel, its serial launch, and torch eager."""
    numba, eager = get_backend("numba-cpu"), get_backend("torch")
    heuristic, serial = numba.seed_configs(spec)
    return {f"numba-cpu[{heuristic.short()}]": numba.compile(spec, heuristic, "cpu"),
            f"numba-cpu[{serial.short()}]": numba.compile(spec, serial, "cpu"),
            "torch eager": eager.compile(spec, eager.heuristic(spec), "cpu")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--op", default="layernorm", choices=("rmsnorm", "layernorm"))
    p.add_argument("--direction", default="fwd", choices=("fwd", "bwd"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--pool", default="default", choices=("default", "numba"),
                   help="where the parallel kernel runs: as autonorm chooses, or on Numba's pool")
    args = p.parse_args(argv)
    if args.pool == "numba":
        from autonorm.backends.numba_cpu import _TorchTeam

        _TorchTeam.looked = True  # as where torch has no OpenMP team: Numba's pool
    from autonorm.backends.numba_cpu import parallel_pool
    spec = NormSpec(args.op, args.direction, args.dtype, args.dtype, args.hidden,
                    bias=args.op == "layernorm")
    timers = {"alone": CpuTimer(context=lambda: None), "after a torch op": CpuTimer()}
    ks = kernels(spec)
    medians = {(name, how): [] for name in ks for how in timers}
    started = datetime.now(timezone.utc)
    for _ in range(args.rounds):
        for how, timer in timers.items():
            for name, kernel in ks.items():
                medians[name, how].append(timer.measure(spec, kernel, args.rows).median_us)
    print(f"{spec.short()} rows={args.rows}; {started:%Y-%m-%d %H:%M} UTC; load {os.getloadavg()[0]:.2f}; "
          f"torch {torch.__version__} on {torch.get_num_threads()} threads; python {sys.version.split()[0]}; "
          f"parallel kernels on {parallel_pool()}")
    print(f"{'kernel':<60} {'alone us':>10} {'after torch us':>15} {'ratio':>6}")
    for name in ks:
        alone, after = (statistics.median(medians[name, how]) for how in timers)
        print(f"{name:<60} {alone:>10.0f} {after:>15.0f} {after / alone:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
