"""How many trials does the tuner's search need to come within 2% of the exhaustive best?

1. Measure (or load, with --table) the exhaustive table of one spec: every valid
   config of the candidate backends, timed with the real protocol.
2. Replay the tuner's search (the same StudyRunner, TPE after the heuristic seeds)
   against that table with several sampler seeds: a replay timer answers from
   the table, so the search is judged without timing noise (kernel_tuner's
   "simulation mode"). Random search over the same table is the reference.
3. Print (and with --md append) a markdown table: space size, the exhaustive
   best, and trials-to-within-2% as median / worst over seeds, as % of the space.
4. Replay `autonorm tune --trials BUDGET` with its stopping rules: trials spent
   and how far its winner is from the exhaustive best.
5. With --transfer-table (a neighbouring shape's saved table), repeat 2 and 4
   with that table's best config added to the seeds: the experiment behind the
   tuner not seeding studies with neighbours' winners.

    python scripts/search_efficiency.py --op rmsnorm --hidden 4096 --rows 1024 \
        --save-table docs/benchmarks/search-efficiency-table-rmsnorm-4096.json
    python scripts/search_efficiency.py --hidden 4096 --rows 1024 --seeds 20 \
        --table docs/benchmarks/search-efficiency-table-rmsnorm-4096.json \
        --transfer-table docs/benchmarks/search-efficiency-table-rmsnorm-2048.json

Goal: within 2% of the exhaustive best in at most 20% of the space.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import warnings
from pathlib import Path

import optuna
import torch

from autonorm import measure
from autonorm.device import identity
from autonorm.spec import NormSpec
from autonorm.tune import Candidate, SearchSpace, native_backends
from autonorm.tune.replay import replay
from autonorm.verify import check_candidate

WITHIN = 1.02


def exhaustive_table(spec, rows, backends, device) -> dict:
    """candidate key -> median µs for every valid candidate (failures left out)."""
    timer = measure.timer_for(device)
    table = {}
    space = SearchSpace(spec, backends)
    for i, cand in enumerate(space.candidates()):
        try:
            kernel = backends[cand.backend].compile(spec, cand.config, device)
        except Exception as exc:
            print(f"  {cand.short()}: compile failed ({exc})", file=sys.stderr)
            continue
        if check_candidate(spec, kernel, rows, device) is not None:
            print(f"  {cand.short()}: wrong result, left out", file=sys.stderr)
            continue
        table[cand.key] = timer.measure(spec, kernel, rows).median_us
        print(f"  [{i + 1}/{len(space)}] {cand.short()}: {table[cand.key]:.1f} us", file=sys.stderr)
    return table


def trials_to_target(order, table, best) -> int:
    for i, key in enumerate(order, 1):
        if table.get(key, float("inf")) <= WITHIN * best:
            return i
    return len(order) + 1


def multivariate_tpe(seed):
    """The sampler compared with the tuner's: multivariate, grouped TPE with 10 startup trials."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=10, multivariate=True,
                                          group=True)


SAMPLERS = {"tuner": None, "multivariate": multivariate_tpe}
SAMPLER = None  # --sampler


def replay_tpe(spec, rows, backends, table, seed, extra_seeds=()) -> int:
    order = replay(spec, rows, backends, table, seed, extra_seeds, sampler=SAMPLER)
    return trials_to_target(order, table, min(table.values()))


def budgeted(spec, rows, backends, table, seeds, n_trials, extra_seeds=()) -> str:
    """'trials spent median / worst, gap of the winner to the exhaustive best median / worst'."""
    best = min(table.values())
    spent, gaps = [], []
    for seed in range(seeds):
        order = replay(spec, rows, backends, table, seed, extra_seeds, n_trials=n_trials, sampler=SAMPLER)
        spent.append(len(order))
        gaps.append(100 * (min(table.get(k, float("inf")) for k in order) / best - 1))
    return (f"{statistics.median(spent):.0f} / {max(spent)} trials, winner {statistics.median(gaps):.1f}% / "
            f"{max(gaps):.1f}% off the best")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", default="rmsnorm")
    p.add_argument("--direction", default="fwd")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--backends", default="numba-cpu,torch")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--table", help="load the exhaustive table from this JSON instead of measuring")
    p.add_argument("--save-table", help="write the measured exhaustive table here")
    p.add_argument("--md", help="append the result row to this markdown file")
    p.add_argument("--budget", type=int, default=40,
                   help="also replay `autonorm tune --trials BUDGET` (its patience rule included) and report "
                        "the trials it spends and how far its winner is from the exhaustive best")
    p.add_argument("--transfer-table", action="append", default=[], metavar="JSON",
                   help="a neighbouring shape's saved table: its best config seeds the search as "
                        "`autonorm tune --transfer` would seed it (repeatable); adds a second TPE row")
    p.add_argument("--sampler", choices=list(SAMPLERS), default="tuner",
                   help="replay with the tuner's sampler (independent TPE, 5 startup trials) or multivariate, "
                        "grouped TPE with 10 startup trials")
    args = p.parse_args(argv)
    global SAMPLER
    SAMPLER = SAMPLERS[args.sampler]
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = NormSpec(args.op, args.direction, args.dtype, args.dtype, args.hidden)
    backends = native_backends(device, args.backends.split(","))
    if args.table:
        table = json.loads(Path(args.table).read_text())["table"]
    else:
        table = exhaustive_table(spec, args.rows, backends, device)
        if args.save_table:
            Path(args.save_table).parent.mkdir(parents=True, exist_ok=True)
            Path(args.save_table).write_text(json.dumps(
                {"spec": spec.to_dict(), "rows": args.rows, "device": identity(device)["name"],
                 "table": table}, indent=1))
    if args.seeds == 0:
        return 0  # --seeds 0: measure (and save) the table only; replay it later with --table
    size = len(SearchSpace(spec, backends))
    best_key = min(table, key=table.get)
    tpe = [replay_tpe(spec, args.rows, backends, table, seed) for seed in range(args.seeds)]
    transfer, sources = [], []
    for path in args.transfer_table:
        other = json.loads(Path(path).read_text())
        backend, config = json.loads(min(other["table"], key=other["table"].get))
        transfer.append(Candidate(backend, backends[backend].config_cls.from_dict(config)))
        sources.append(f"N={other['spec']['hidden']} rows={other['rows']}")
    tpe_t = ([replay_tpe(spec, args.rows, backends, table, seed, transfer) for seed in range(args.seeds)]
             if transfer else [])
    keys = list(table)
    rnd = []
    for seed in range(args.seeds):
        random.Random(seed).shuffle(keys)
        rnd.append(trials_to_target(keys, table, table[best_key]))
    within = sum(v <= WITHIN * table[best_key] for v in table.values())

    def cell(values):
        med, worst = statistics.median(values), max(values)
        return f"{med:.0f} ({100 * med / size:.0f}%) / {worst} ({100 * worst / size:.0f}%)"

    row = (f"| {identity(device)['name']} | {spec.short()} rows={args.rows} | {size} | "
           f"{table[best_key]:.1f} us: {best_key} | {within} | {cell(tpe)} | {cell(rnd)} |")
    header = ("| device | spec | space | exhaustive best | configs within 2% | TPE trials to 2%: median / worst "
              f"({args.seeds} seeds) | random search: median / worst |\n|---|---|---|---|---|---|---|")
    if transfer:
        row += (f"\n| {identity(device)['name']} | {spec.short()} rows={args.rows}, seeded with the best of "
                f"{', '.join(sources)} | {size} | {table[best_key]:.1f} us: {best_key} | {within} | {cell(tpe_t)} | "
                f"{cell(rnd)} |")
    print(header)
    print(row)
    plain = budgeted(spec, args.rows, backends, table, args.seeds, args.budget)
    print(f"\n--trials {args.budget}, heuristic seeds: {plain}")
    if transfer:
        seeded = budgeted(spec, args.rows, backends, table, args.seeds, args.budget, transfer)
        print(f"--trials {args.budget}, plus the best of {', '.join(sources)}: {seeded}")
    if args.md:
        path = Path(args.md)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("# Search efficiency\n\nTrials the tuner's search (TPE after the heuristic seeds, "
                            "replayed on a measured exhaustive table) needs to come within 2% of the exhaustive "
                            "best. Goal: at most 20% of the space. Produced by `scripts/search_efficiency.py`.\n\n"
                            + header + "\n")
        with path.open("a") as f:
            f.write(row + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
