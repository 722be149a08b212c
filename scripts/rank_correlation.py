"""How well the tuner's static cost model ranks candidates: Spearman's rho against measured times.

    python scripts/rank_correlation.py --ops rmsnorm,layernorm --dtypes float32,bfloat16 --hidden 1024,4096 \\
        --rows 1024 [--sample 40] [--backend numba-cpu]
    python scripts/rank_correlation.py --storage OUT/.autonorm-journal/<slug>.optuna.journal

Per spec, the rank correlation of the measured medians with (a) the cost model's order
(`autonorm.tune.rank.ranked`, the order the tuner times candidates in) and (b) the
distance from the backend's heuristic alone, which is the model's tie-break. The first
form times a random sample of each spec's candidates (every one with --sample 0); the
second reads the medians an exhaustive `autonorm tune` already measured (every candidate
of every study in that storage, nothing timed again). Positive rho is good: the model's
first candidates are the fast ones.

The verdict line applies the rule the planner's model is held to: a model that does not
rank better than the heuristic alone is dropped. It ranks better when its rho is higher
on most specs and on average. The load average is printed beside the numbers: on a
loaded machine they mean little (docs/benchmarks/planner.md).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict
from pathlib import Path

# spearman is used by the tests and scripts beside this one through this module.
from autonorm.tune.rank import SpecRho, spearman, spec_rho, verdict  # noqa: F401


def timed(spec, rows: int, backend_name: str, sample: int, seed: int) -> SpecRho:
    """Time `sample` random candidates of `spec` (all with 0) on this machine and correlate."""
    import torch

    from autonorm import measure
    from autonorm.backends import get_backend
    from autonorm.device import identity
    from autonorm.tune import SearchSpace, rank

    device = torch.device("cuda" if backend_name in ("triton", "cupy", "numba") else "cpu")
    backend = get_backend(backend_name)
    space = SearchSpace(spec, {backend_name: backend}, device)
    facts = rank.DeviceFacts.of(identity(device), measure.copy_bandwidth(device))
    cands = space.candidates()
    if sample:
        cands = random.Random(seed).sample(cands, min(sample, len(cands)))
    timer = measure.timer_for(device)
    measured = {c.key: timer.measure(spec, backend.compile(spec, c.config, device), rows).median_us for c in cands}
    return spec_rho(space, rows, facts, measured)


def measured_studies(journal: Path):
    """(SearchSpace, rows, DeviceFacts, candidate key -> median µs) for each study in an `autonorm tune` journal,
    from the medians its trials recorded."""
    import optuna
    import torch
    from optuna.trial import TrialState

    from autonorm.backends import get_backend
    from autonorm.spec import NormSpec
    from autonorm.tune import SearchSpace, make_storage, rank

    if not journal.is_file():
        raise SystemExit(f"--storage {journal}: no such journal file (autonorm tune writes "
                         f"OUT/.autonorm-journal/<device-slug>.optuna.journal)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(None, journal)
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        attrs = summary.user_attrs
        if "spec" not in attrs:
            continue  # a study that never started
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        measured = {t.user_attrs["candidate"]: t.user_attrs["timing"]["median_us"]
                    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if "timing" in t.user_attrs and "candidate" in t.user_attrs}
        names = sorted({json.loads(k)[0] for k in measured})  # a candidate key is JSON [backend, config]
        device = torch.device("cpu" if attrs["device"]["kind"] == "cpu" else "cuda")
        space = SearchSpace(NormSpec(**attrs["spec"]), {n: get_backend(n) for n in names}, device)
        yield space, attrs["rows"], rank.DeviceFacts.of(attrs["device"], attrs["device"].get("copy_gbps")), measured


def from_storage(journal: Path) -> list[SpecRho]:
    """One SpecRho per study in an `autonorm tune` journal, from the medians its trials recorded."""
    return [spec_rho(space, rows, facts, measured) for space, rows, facts, measured in measured_studies(journal)]


def markdown(rows: list[SpecRho]) -> str:
    lines = ["| spec | rows | candidates | rho(model, measured) | rho(heuristic distance, measured) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r.spec} | {r.rows} | {r.candidates} | {r.model:+.2f} | {r.distance:+.2f} |" for r in rows]
    return "\n".join(lines)


def to_json(rows: list[SpecRho]) -> list[dict]:
    return [asdict(r) for r in rows]


def _specs(args):
    from autonorm.spec import NormSpec

    default_features = {"rmsnorm": "weight", "layernorm": "weight+bias"}
    return [NormSpec(op, d, dt, dt, n, **NormSpec.feature_kwargs(default_features[op]))
            for op in args.ops for d in args.directions for dt in args.dtypes for n in args.hidden]


def main(argv=None) -> int:
    from autonorm.tune.quality import load_average

    def names(text):
        return [v for v in text.split(",") if v]

    def ints(text):
        return [int(v) for v in names(text)]

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", type=names, default=["rmsnorm"], help="comma list of rmsnorm, layernorm")
    p.add_argument("--directions", type=names, default=["fwd"], help="comma list of fwd, bwd")
    p.add_argument("--dtypes", type=names, default=["float32"])
    p.add_argument("--hidden", type=ints, default=[4096])
    p.add_argument("--rows", type=ints, default=[1024])
    p.add_argument("--backend", default="numba-cpu")
    p.add_argument("--sample", type=int, default=40, help="candidates timed per spec, drawn at random (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--storage", type=Path, help="read the medians from this autonorm tune journal instead of timing")
    args = p.parse_args(argv)
    for op in args.ops:
        if op not in ("rmsnorm", "layernorm"):
            p.error(f"--ops {op}: rmsnorm or layernorm")
    print(f"before: {load_average()}", file=sys.stderr)
    if args.storage:
        rows = from_storage(args.storage)
    else:
        rows = []
        for spec in _specs(args):
            for n_rows in args.rows:
                rows.append(timed(spec, n_rows, args.backend, args.sample, args.seed))
                r = rows[-1]
                print(f"{r.spec} rows={r.rows}: {r.candidates} candidates; rho(model) {r.model:+.2f}; "
                      f"rho(heuristic distance) {r.distance:+.2f}", file=sys.stderr)
    print(markdown(rows))
    print(verdict(rows))
    print(f"after: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
