"""The benchmark and tuning grids of the GPU devices, as data: `standard` and its `quick` subset.

The tuner and `autonorm bench --grid` read these, so a grid is defined once. A grid names ops,
directions, dtypes and hidden sizes; rows are derived per hidden size:

- tuning rows: `tune_rows` (power-of-two buckets from 1 up), each capped so that
  one (rows, N) tensor holds at most `max_elements` elements (the backward pass
  keeps x, dy, dx and fp64 reference copies alive: 2^28 elements is 1 GiB in
  fp32 per tensor, which fits an 80 GB H100 with room to spare). When the cap
  cuts the list, the cap itself is added, so every N is tuned at its largest
  row count.
- bench rows: one "large" row count per N, `min(max_bench_rows, max_elements // N)`,
  the cells the performance goals speak of (quack's plots use the same shape of
  sweep: 32K x 256 ... 1K x 262K).

`autonorm grids tune-batches --grid standard` prints the `autonorm tune` argument
lists that tune the grid one batch at a time.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from .spec import NormSpec, rows_bucket


@dataclass(frozen=True)
class Grid:
    name: str
    ops: tuple[str, ...]
    directions: tuple[str, ...]
    dtypes: tuple[str, ...]
    hidden: tuple[int, ...]
    tune_rows: tuple[int, ...]
    max_elements: int = 1 << 28
    max_bench_rows: int = 32768

    def row_cap(self, n: int) -> int:
        return max(1, self.max_elements // n)

    def tune_rows_for(self, n: int) -> tuple[int, ...]:
        cap = self.row_cap(n)
        rows = [r for r in self.tune_rows if r <= cap]
        if cap < max(self.tune_rows) and cap not in rows:
            rows.append(cap)
        return tuple(rows)

    def bench_rows_for(self, n: int) -> int:
        return min(self.max_bench_rows, self.row_cap(n))

    def specs(self) -> list[NormSpec]:
        return [NormSpec(op, d, dt, dt, n) for op in self.ops for d in self.directions for dt in self.dtypes
                for n in self.hidden]

    def bench_cases(self) -> list[tuple[NormSpec, int]]:
        """(spec, rows) for every bench cell, in a stable order."""
        return [(s, self.bench_rows_for(s.hidden)) for s in self.specs()]

    def tune_batches(self, recorded: frozenset = frozenset()) -> list[dict]:
        """One `autonorm tune` invocation per (op, direction, dtype, row list): hidden sizes that share
        a row list are tuned by one process (process start and the copy-bandwidth probe cost seconds).

        `recorded` holds (op, direction, x_dtype, hidden, rows_bucket) studies a database already has:
        they are left out (a batch cut at a deadline then resumes where it stopped instead of giving
        its finished studies more time); a batch keeps its id, and `studies` counts what is left.
        """
        batches = []
        for op in self.ops:
            for d in self.directions:
                for dt in self.dtypes:
                    groups: dict[tuple, list[int]] = {}
                    for n in self.hidden:
                        groups.setdefault(self.tune_rows_for(n), []).append(n)
                    for rows, ns in groups.items():
                        bid = f"{op}-{d}-{dt}-N{ns[0]}" + (f"-{ns[-1]}" if len(ns) > 1 else "")
                        todo = {n: [r for r in rows if (op, d, dt, n, rows_bucket(r)) not in recorded] for n in ns}
                        ns_left = [n for n in ns if todo[n]]
                        rows_left = [r for r in rows if any(r in todo[n] for n in ns_left)]
                        batches.append({"id": bid, "ops": op, "directions": d, "dtypes": dt,
                                        "hidden": ",".join(map(str, ns_left)), "rows": ",".join(map(str, rows_left)),
                                        "studies": len(ns_left) * len(rows_left)})
        return batches


STANDARD = Grid(
    name="standard",
    ops=("rmsnorm", "layernorm"),
    directions=("fwd", "bwd"),
    dtypes=("bfloat16", "float16", "float32"),
    hidden=(256, 512, 768, 1024, 2048, 4096, 5120, 8192, 12288, 16384, 32768, 65536, 131072, 262144),
    # Buckets 1 ... 32768, every fourth power of two (1, 16, 256, 4096) plus the top two: the dispatcher
    # takes the nearest bucket (log distance) for the buckets in between.
    tune_rows=(1, 16, 256, 4096, 16384, 32768),
)

# A smoke subset: one dtype, three hidden sizes (a small N, the usual LLM size, one past Liger's limit),
# two row counts; minutes, not hours, on a GPU.
QUICK = Grid(
    name="quick",
    ops=("rmsnorm", "layernorm"),
    directions=("fwd", "bwd"),
    dtypes=("bfloat16",),
    hidden=(1024, 4096, 65536),
    tune_rows=(1, 4096),
)

GRIDS = {g.name: g for g in (STANDARD, QUICK)}


def get(name: str) -> Grid:
    try:
        return GRIDS[name]
    except KeyError:
        raise ValueError(f"unknown grid {name!r}; known: {', '.join(GRIDS)}") from None


def recorded_studies(db_path: str) -> frozenset:
    """(op, direction, x_dtype, hidden, rows_bucket) of every weight-only record in a tuning database.

    Read as plain JSON, only to skip work: a missing or unreadable file skips nothing (the tuner,
    which validates the database, then reports the problem itself).
    """
    try:
        with open(db_path) as f:
            records = json.load(f).get("records", [])
        return frozenset((k["op"], k["direction"], k["x_dtype"], k["hidden"], k["rows_bucket"])
                         for k in (r["key"] for r in records)
                         if k.get("features") == "weight" and k.get("w_dtype") == k.get("x_dtype"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return frozenset()
