"""`autonorm grids`: print a benchmark or tuning grid (autonorm/grids.py) as data for shell loops."""
from __future__ import annotations

import json

from ..grids import GRIDS, get, recorded_studies


def add_arguments(parser) -> None:
    parser.add_argument("what", choices=("tune-batches", "bench-cases", "summary"),
                        help="tune-batches: one JSON object of `autonorm tune` arguments a line; bench-cases: "
                             "one `op direction dtype ROWSxN` a line; summary: the grid's size")
    parser.add_argument("--grid", default="standard", choices=sorted(GRIDS))
    parser.add_argument("--skip-recorded", metavar="DB", help="tune-batches: leave out studies this database holds")


def main(args) -> int:
    grid = get(args.grid)
    if args.what == "tune-batches":
        recorded = recorded_studies(args.skip_recorded) if args.skip_recorded else frozenset()
        # One JSON object per line: shell loops read it with a small python one-liner or jq.
        for b in grid.tune_batches(recorded):
            print(json.dumps(b))
    elif args.what == "bench-cases":
        for spec, rows in grid.bench_cases():
            print(f"{spec.op} {spec.direction} {spec.x_dtype} {rows}x{spec.hidden}")
    else:
        batches = grid.tune_batches()
        print(f"grid {grid.name}: {len(grid.specs())} specs, {sum(b['studies'] for b in batches)} tuning studies "
              f"in {len(batches)} batches, {len(grid.bench_cases())} bench cases")
    return 0
