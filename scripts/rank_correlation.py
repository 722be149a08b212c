"""How well the tuner's static cost model ranks candidates: Spearman's rho against measured times.

    python scripts/rank_correlation.py --hidden 4096 --rows 1024 [--sample 40] [--backend numba-cpu]

Times a sample of the spec's candidates (every one with --sample 0) with the tuner's
timer, then prints the rank correlation of the measured medians with (a) the cost
model's order (`autonorm.tune.rank.ranked`) and (b) the distance from the backend's
heuristic alone, which is the model's tie-break: a model that does not beat (b) adds
nothing and should be dropped. The load average is printed beside the numbers: on a
loaded machine they mean little (docs/benchmarks/planner.md).
"""
from __future__ import annotations

import argparse
import random
import sys

import torch


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho of two equally long lists (average ranks for ties)."""
    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else 0.0


def main(argv=None) -> int:
    from autonorm import measure
    from autonorm.backends import get_backend
    from autonorm.device import identity
    from autonorm.spec import NormSpec
    from autonorm.tune import SearchSpace, rank
    from autonorm.tune.quality import load_average

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--op", default="rmsnorm", choices=("rmsnorm", "layernorm"))
    p.add_argument("--direction", default="fwd", choices=("fwd", "bwd"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--backend", default="numba-cpu")
    p.add_argument("--sample", type=int, default=40, help="candidates timed, drawn at random (0: all)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = torch.device("cuda" if args.backend in ("triton", "cupy", "numba") else "cpu")
    spec = NormSpec(args.op, args.direction, args.dtype, args.dtype, args.hidden,
                    **NormSpec.feature_kwargs("weight" if args.op == "rmsnorm" else "weight+bias"))
    backend = get_backend(args.backend)
    space = SearchSpace(spec, {args.backend: backend}, device)
    facts = rank.DeviceFacts.of(identity(device), measure.copy_bandwidth(device))
    order = {c.key: i for i, c in enumerate(rank.ranked(space, args.rows, facts))}
    cands = space.candidates()
    if args.sample:
        cands = random.Random(args.seed).sample(cands, min(args.sample, len(cands)))
    timer = measure.timer_for(device)
    heuristic = backend.heuristic(spec)
    measured, model, distance = [], [], []
    print(f"{spec.short()} rows={args.rows}: timing {len(cands)} of {len(space)} candidates; {load_average()}",
          file=sys.stderr)
    for cand in cands:
        kernel = backend.compile(spec, cand.config, device)
        measured.append(timer.measure(spec, kernel, args.rows).median_us)
        model.append(order[cand.key])
        distance.append(rank.heuristic_distance(space, cand, heuristic))
    print(f"{spec.short()} rows={args.rows} {args.backend}: {len(cands)} candidates; "
          f"rho(model, measured) {spearman(model, measured):+.2f}; "
          f"rho(heuristic distance, measured) {spearman(distance, measured):+.2f}; {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
