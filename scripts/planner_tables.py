"""Search-efficiency tables from an exhaustive `autonorm tune` run, with the budgeted planner's order beside them.

    python scripts/planner_tables.py --storage WORK/run-<time>/exhaustive/.autonorm-journal/<slug>.optuna.journal

Every study of the journal timed its whole space, so its medians are a table (candidate key -> µs):
kernel_tuner's "simulation mode" then judges each search on it without timing noise. Per study,
how many candidates each order times before one lands within 2% of the table's best, and how many
distinct kernel sources it compiled by then (`rank.compile_key`: on the CPU a compile costs about
2 s and a timing a fraction of a second, so compiles are most of a search's wall time):

- planner: what `autonorm tune --budget` times: the heuristic seeds, then `rank.first_to_time`
  (candidates sharing a seed's compiled source, then the ranked ones), then TPE (replayed);
- TPE: what `autonorm tune` times without a budget: the heuristic seeds, then TPE (replayed with
  `--trials`' default stopping rules; "not within N" when it stops first);
- random: the space in a random order (median over 20 orders);
- transfer: where the journal holds the same problem at another hidden size, the planner again with
  that study's best (mapped into this space, as `autonorm tune --budget` seeds a neighbour) timed
  right after the heuristics.

`scripts/budget_evidence.py` runs this on its exhaustive half and puts the table in its report.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rank_correlation  # noqa: E402  (the script beside this one)

WITHIN = 1.02
TPE_TRIALS = 60  # `autonorm tune`'s default --trials
RANDOM_ORDERS = 20


def to_target(order: list, table: dict, keys_of) -> tuple[int, int] | None:
    """(candidates timed, distinct compile keys) when `order` first reaches 2% of the table's best; None if never."""
    best, compiled = min(table.values()), set()
    for i, key in enumerate(order, 1):
        compiled.add(keys_of(key))
        if table.get(key, float("inf")) <= WITHIN * best:
            return i, len(compiled)
    return None


def planner_to_target(space, rows: int, facts, table: dict, keys_of, transferred=()) -> tuple[int, int] | None:
    """`--budget`'s order on `table`: heuristic seeds (and `transferred` Candidates), the first-to-time candidates,
    then TPE replayed from there for `--trials`' default more (None: not reached by then)."""
    from autonorm.tune import rank
    from autonorm.tune.replay import replay
    from autonorm.tune.run import heuristic_seeds

    own = [c for c in heuristic_seeds(space.backends, space.spec) if space.named(c.key) is not None]
    seeds = own + [c for c in transferred if c.key not in {s.key for s in own}]
    first, _ = rank.first_to_time(space, rows, facts, seeds)
    order = [c.key for c in seeds + first]
    found = to_target(order, table, keys_of)
    if found is None:  # not reached by the planner's own order: TPE continues from it
        tail = replay(space.spec, rows, space.backends, table, 0, extra_seeds=seeds[len(own):] + first,
                      n_trials=len(order) + TPE_TRIALS)
        found = to_target(order + [k for k in tail if k not in set(order)], table, keys_of)
    return found


def study_row(space, rows: int, facts, table: dict, tpe_seeds: int = 2, transferred=()) -> dict:
    """The orders' (trials, compiles) to 2% for one study's table; `transferred`: another hidden size's best."""
    from autonorm.tune import rank
    from autonorm.tune.replay import replay

    by_key = {c.key: c for c in space.candidates()}
    table = {k: v for k, v in table.items() if k in by_key}

    def keys_of(key):
        # torch, with nothing to compile, counts as one "compile" of its own, as it always has in these tables
        return (rank.compile_key(space, by_key[key]) or key) if key in by_key else key

    planner = planner_to_target(space, rows, facts, table, keys_of)
    moved = planner_to_target(space, rows, facts, table, keys_of, transferred) if transferred else None
    tpe = [to_target(replay(space.spec, rows, space.backends, table, seed, n_trials=TPE_TRIALS), table, keys_of)
           for seed in range(tpe_seeds)]
    keys = sorted(table)
    shuffled = []
    for seed in range(RANDOM_ORDERS):
        random.Random(seed).shuffle(keys)
        shuffled.append(to_target(list(keys), table, keys_of))
    best_key = min(table, key=table.get)
    return {"study": space.spec.short(), "rows": rows, "space": len(table), "best_us": round(table[best_key], 2),
            "best": by_key[best_key].short(), "within_2pct": sum(v <= WITHIN * table[best_key] for v in table.values()),
            "sources": len({keys_of(k) for k in table}), "planner": planner, "tpe": tpe,
            "random_median": [statistics.median(x[i] for x in shuffled) for i in (0, 1)],
            "transfer": moved, "transfer_from": [c.short() for c in transferred]}


def rows_from_storage(journal: Path, tpe_seeds: int = 2) -> list[dict]:
    import optuna

    from autonorm.tune import transfer

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    studies = list(rank_correlation.measured_studies(journal))
    out = []
    for space, rows, facts, measured in studies:
        moved = []
        for other, other_rows, _, other_measured in studies:
            if (transfer.problem(other.spec) == transfer.problem(space.spec) and other_rows == rows
                    and other.spec.hidden != space.spec.hidden and other_measured):
                best = other.named(min(other_measured, key=other_measured.get))
                mapped = transfer.map_into(space, best) if best is not None else None
                moved += [mapped] if mapped is not None else []
        out.append(study_row(space, rows, facts, measured, tpe_seeds, moved))
    return out


def _cell(found) -> str:
    return "not reached" if found is None else f"{found[0]} ({found[1]})"


def markdown(rows: list[dict]) -> str:
    lines = ["| study | rows | space (sources) | table's best | within 2% | planner: trials (compiles) to 2% | "
             f"TPE, --trials {TPE_TRIALS}: per replay seed | random: median of {RANDOM_ORDERS} orders | "
             "planner seeded with the other hidden size's best |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tpe = ", ".join(_cell(t) if t else f"not within {TPE_TRIALS}" for t in r["tpe"])
        rnd = r["random_median"]
        lines.append(f"| {r['study']} | {r['rows']} | {r['space']} ({r['sources']}) | {r['best_us']} µs: "
                     f"{r['best']} | {r['within_2pct']} | {_cell(r['planner'])} | {tpe} | "
                     f"{rnd[0]:.0f} ({rnd[1]:.0f}) | "
                     + (f"{_cell(r['transfer'])}: {', '.join(r['transfer_from'])} |" if r["transfer_from"] else "- |"))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--storage", type=Path, required=True, help="an exhaustive run's journal")
    p.add_argument("--tpe-seeds", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    rows = rows_from_storage(args.storage, args.tpe_seeds)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
