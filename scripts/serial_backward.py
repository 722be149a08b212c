"""numba-cpu's backward launches at each rows_per_task, on one thread and on all, timed as the tuner times them.

    python scripts/serial_backward.py                 # the 8 backward specs of the budget evidence's grid, 1024 rows
    python scripts/serial_backward.py --rounds 5 --rows 4096

A backward task zeroes, fills and sums one fp32 dW (dB) partial row, so rows_per_task sets the partials' traffic;
numba-cpu's serial seed (`Backend.seed_configs`) takes the fewest tasks from these figures. Every launch of a spec
shares one compiled source, and the CPU timer (`autonorm.measure.CpuTimer`, every call after a torch op) times them
interleaved, in rounds; each cell is the median of the rounds' medians over the spec's best.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
from datetime import datetime, timezone

import torch

from autonorm.backends import get_backend
from autonorm.measure import CpuTimer
from autonorm.spec import NormSpec

ROWS_PER_TASK = (16, 32, 64, 128, 256)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", default="1024,4096")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    numba, timer = get_backend("numba-cpu"), CpuTimer()
    launches = [(threads, rpt) for threads in (1, 0) for rpt in ROWS_PER_TASK]
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; load {os.getloadavg()[0]:.2f}; rows={args.rows}; "
          f"torch {torch.__version__} on {torch.get_num_threads()} threads; python {sys.version.split()[0]}")
    print("cells: time over the spec's best; t1 = one thread, t0 = all; r = rows_per_task")
    for op in ("rmsnorm", "layernorm"):
        for dtype in args.dtypes.split(","):
            for hidden in map(int, args.hidden.split(",")):
                spec = NormSpec(op, "bwd", dtype, dtype, hidden, bias=op == "layernorm")
                heuristic = numba.heuristic(spec)  # its launches: the same source, other threads and rows per task
                configs = [dataclasses.replace(heuristic, threads=t, rows_per_task=r) for t, r in launches]
                kernels = [numba.compile(spec, config, "cpu") for config in configs]
                medians = [[] for _ in launches]
                for _ in range(args.rounds):
                    for m, timing in zip(medians, timer.interleaved(spec, kernels, args.rows)):
                        m.append(timing.median_us)
                us = [statistics.median(m) for m in medians]
                best = min(us)
                cells = " ".join(f"t{t}r{r}={u / best:.3f}" for (t, r), u in zip(launches, us))
                print(f"{spec.short()}: best {best:.0f} us; {cells}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
