"""The numba-cpu kernels against torch eager, torch.compile and the fresh-output floor, in one process.

    THP_MEM_ALLOC_ENABLE=1 python scripts/cpu_floor.py [--reps 10] [--warmup 2] [--json PATH] [--ops ...]
        [--dtypes ...] [--directions ...] [--shapes 8192x4096 ...]

For each cell (RMSNorm / LayerNorm with a weight, fwd / bwd, fp32 / bf16, 8192x4096 and 65536x512:
16 cells by default) it times, interleaved round-robin on the same rotated input sets as
`autonorm bench` (`CpuTimer.time_calls`): autonorm forced to numba-cpu (its heuristic config),
torch eager, torch.compile and the floor. Every call allocates its outputs, as users' calls do;
so does the floor, the cheapest call that writes a fresh output of the same size:
  forward   torch.empty_like(x).copy_(x)  (read x, write a fresh y)
  backward  torch.add(dy, x)               (read dy and x, write a fresh dx)
It prints one markdown table (median us, x eager, x compile, x floor: above 1.0 autonorm is faster
than eager / compile, and the x floor column is autonorm's time over the floor's), the load average
before and after, and the versions. torch.compile's compile runs outside the timed region (the
first calls of every input set), and a cell where Dynamo compiled inside it drops that column.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

os.environ["AUTONORM_BACKEND"] = "numba-cpu"  # before autonorm reads it: time the numba-cpu kernels

from autonorm import device as device_mod  # noqa: E402
from autonorm.bench.providers import build_case, make_sets  # noqa: E402
from autonorm.bench.run import compiles_so_far, timer_for  # noqa: E402
from autonorm.spec import NormSpec  # noqa: E402

SHAPES = ((8192, 4096), (65536, 512))


def _shape(text: str) -> tuple[int, int]:
    """'8192x4096' -> (8192, 4096)."""
    try:
        rows, hidden = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected ROWSxHIDDEN, e.g. 8192x4096") from None
    if rows < 1 or hidden < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r}: rows and hidden size must be positive")
    return rows, hidden


def floor_call(spec, sets):
    """The fresh-output floor of `spec`: a callable taking an input-set index."""
    if spec.direction == "fwd":
        return lambda i: torch.empty_like(sets[i]["x"]).copy_(sets[i]["x"])
    return lambda i: torch.add(sets[i]["dy"], sets[i]["x"])


def cell(spec, rows, timer, device):
    """{impl: Timing} of one cell: autonorm[numba-cpu], torch, torch.compile (if it did not recompile), floor."""
    n_sets = timer.n_sets(spec, rows)
    impls, _choice, notes = build_case(spec, rows, device, n_sets, ["autonorm", "torch", "torch.compile"])
    for name, note in notes.items():
        print(f"  {spec.op}.{spec.direction} {spec.x_dtype} {rows}x{spec.hidden}: {name} {note}", file=sys.stderr)
    sets = make_sets(spec, rows, device, n_sets)
    impls["floor"] = floor_call(spec, sets)
    compiled = compiles_so_far()
    timings = timer.time_calls(impls, n_sets)
    if compiles_so_far() != compiled:
        timings.pop("torch.compile", None)
    return timings


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", nargs="+", default=["rmsnorm", "layernorm"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--directions", nargs="+", default=["fwd", "bwd"])
    ap.add_argument("--shapes", nargs="+", type=_shape, default=list(SHAPES), help="ROWSxHIDDEN cells")
    ap.add_argument("--reps", type=int, default=10, help="timed calls per implementation and cell")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per implementation and cell")
    ap.add_argument("--json", help="also write the cells as JSON here")
    args = ap.parse_args(argv)

    device = torch.device("cpu")
    timer = timer_for(device, args.reps, args.warmup)
    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc)
    print("| case | autonorm µs (p20–p80) | eager µs | compile µs | floor µs | × eager | × compile | × floor |")
    print("|---|---|---|---|---|---|---|---|")
    out = []
    for op in args.ops:
        for direction in args.directions:
            for dtype in args.dtypes:
                for rows, hidden in args.shapes:
                    spec = NormSpec(op, direction, dtype, dtype, hidden, **NormSpec.feature_kwargs("weight"))
                    t = {name.split("[")[0]: v for name, v in cell(spec, rows, timer, device).items()}
                    mine = t["autonorm"].median_us
                    other = {k: (t[k].median_us if k in t else None) for k in ("torch", "torch.compile", "floor")}
                    row = {"case": f"{op}.{direction} {dtype} {rows}x{hidden}", "autonorm_us": mine,
                           "p20_us": t["autonorm"].p20_us, "p80_us": t["autonorm"].p80_us,
                           **{f"{k}_us": v for k, v in other.items()},
                           "x_eager": other["torch"] / mine,
                           "x_compile": other["torch.compile"] / mine if other["torch.compile"] else None,
                           "x_floor": mine / other["floor"]}
                    out.append(row)
                    cmp = f"{row['x_compile']:.2f}" if row["x_compile"] else "–"
                    print(f"| {row['case']} | {mine:.0f} ({row['p20_us']:.0f}–{row['p80_us']:.0f}) | "
                          f"{other['torch']:.0f} | {other['torch.compile'] or 0:.0f} | {other['floor']:.0f} | "
                          f"{row['x_eager']:.2f} | {cmp} | {row['x_floor']:.2f} |", flush=True)
    from autonorm.backends.numba_cpu import parallel_pool

    meta = {"start": started.isoformat(timespec="seconds"),
            "end": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_1m": [load_before[0], os.getloadavg()[0]], "parallel_pool": parallel_pool(),
            "versions": {k: v for k, v in device_mod.software_versions().items() if v},
            "reps": args.reps, "warmup": args.warmup, "thp": os.environ.get("THP_MEM_ALLOC_ENABLE")}
    print(f"\n{json.dumps(meta)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**meta, "cells": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
