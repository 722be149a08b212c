"""numba-cpu's launches at each rows_per_task, on one thread and on all, timed as the tuner times them.

    python scripts/rows_per_task.py                   # the 16 specs of the budget evidence's grid, 1024 rows
    python scripts/rows_per_task.py --directions bwd --rows-per-task 16,32,64,128,256 --rounds 5 --rows 4096

A task is the unit a thread claims (a call of the serial kernel on its rows, on torch's OpenMP team), and a
backward task also zeroes, fills and sums one fp32 dW (dB) partial row: rows_per_task trades the per-task cost
against the balance of the threads' last tasks. numba-cpu's heuristic and its second seed (`Backend.seed_configs`)
take their rows per task from these figures. Every launch of a spec shares one compiled source, and the CPU timer
(`autonorm.measure.CpuTimer`, every call after a torch op) times them interleaved, in rounds; each cell is the median
of the rounds' medians over the spec's best.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import statistics
import sys
from datetime import datetime, timezone

import torch

from autonorm.backends import get_backend
from autonorm.measure import CpuTimer
from autonorm.spec import NormSpec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", default="1024,4096")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--directions", default="fwd,bwd")
    p.add_argument("--rows-per-task", default="4,8,16,32,64,128,256")
    p.add_argument("--threads", default="1,0", help="the launches' threads (0: all)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    from autonorm.backends.numba_cpu import parallel_pool

    numba, timer = get_backend("numba-cpu"), CpuTimer()
    launches = [(threads, rpt) for threads in map(int, args.threads.split(","))
                for rpt in map(int, args.rows_per_task.split(","))]
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; load {os.getloadavg()[0]:.2f}; rows={args.rows}; "
          f"torch {torch.__version__} on {torch.get_num_threads()} threads; python {sys.version.split()[0]}; "
          f"parallel kernels on {parallel_pool()}")
    print("cells: time over the spec's best; t1 = one thread, t0 = all; r = rows_per_task")
    for op, direction, dtype, hidden in itertools.product(("rmsnorm", "layernorm"), args.directions.split(","),
                                                          args.dtypes.split(","), map(int, args.hidden.split(","))):
            spec = NormSpec(op, direction, dtype, dtype, hidden, bias=op == "layernorm")
            heuristic = numba.heuristic(spec)  # its launches: the same source, other threads and rows per task
            configs = [dataclasses.replace(heuristic, threads=t, rows_per_task=r) for t, r in launches]
            # a launch the space leaves out (a forward on one thread: one rows_per_task stands for all)
            valid = [not type(heuristic).is_valid(spec, c) for c in configs]
            configs = [c for c, ok in zip(configs, valid) if ok]
            names = [f"t{c.threads}r{c.rows_per_task}" for c in configs]
            kernels = [numba.compile(spec, config, "cpu") for config in configs]
            medians = [[] for _ in configs]
            for _ in range(args.rounds):
                for m, timing in zip(medians, timer.interleaved(spec, kernels, args.rows)):
                    m.append(timing.median_us)
            us = [statistics.median(m) for m in medians]
            best = min(us)
            cells = " ".join(f"{n}={u / best:.3f}" for n, u in zip(names, us))
            print(f"{spec.short()}: best {best:.0f} us; {cells}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
