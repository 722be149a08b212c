"""A static cost model: each spec's candidates ranked before anything is timed.

The tuner times the best-ranked candidates first (after the heuristics and the
database's earlier winner), so that a study cut by its budget has timed the likely
winners. The model uses only facts known without a measurement:

- the bytes one call moves (`NormSpec.bytes_moved`: every row tensor read or written
  once) over the device's copy bandwidth: the time of a kernel at the memory floor;
- how much of the device a config keeps busy: its parallel units (rows / the config's
  rows per task or program) against the device's workers (CPU cores, or a GPU's SMs
  times `BLOCKS_PER_SM`, the blocks one SM needs resident to hide memory latency);
  a CPU config asking for more threads than cores is oversubscribed;
- a fixed cost per parallel unit on a CPU (a task's scheduling);
- among configs the first three cannot tell apart (within `TIE`), the distance from
  the backend's heuristic, which encodes what was measured when it was written.

What it does not know: vector width, fastmath, unrolling, registers. Those are left
to the measurement (TPE); on a GPU a candidate that spills or cannot launch is failed by
the audit before it is compiled for timing (`SearchSpace.unfit`).

How well it ranks is measured by Spearman's rho of measured medians against its order and
against the distance from the heuristic alone (`spec_rho`); a model that does not rank
better than the heuristic is dropped (`verdict`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from ..spec import NormSpec
from .space import Candidate, SearchSpace

# The knob that sets how many rows one parallel unit (task, program, block) handles, per backend.
ROWS_KNOBS = ("rows_per_task", "ROWS_PER_PROGRAM", "rows")
BLOCKS_PER_SM = 4   # resident blocks a GPU SM needs to hide memory latency (a rule of thumb, not measured here)
TASK_US = 1.0       # a Numba CPU task's scheduling cost (workqueue), per task
TIE = 1.05          # predictions within 5% are a tie, broken by the distance from the heuristic
RANKED = 8          # candidates that need a compile, timed after the seeds before TPE takes over (--budget)


@dataclass(frozen=True)
class DeviceFacts:
    """What the model knows of a device: its kind, cores or SMs, and copy bandwidth (GB/s)."""

    kind: str
    workers: int
    copy_gbps: float

    @classmethod
    def of(cls, ident: dict, copy_gbps: float | None) -> "DeviceFacts":
        kind = ident["kind"]
        units = max(1, int(ident.get("sm_count") or 1))
        # Without a measured bandwidth every candidate shares the same floor: the ranking is unchanged.
        return cls(kind, units * (BLOCKS_PER_SM if kind == "cuda" else 1), copy_gbps or 10.0)


def _rows_per_unit(config) -> int:
    return next((getattr(config, k) for k in ROWS_KNOBS if hasattr(config, k)), 1)


def predict_us(spec: NormSpec, rows: int, cand: Candidate, facts: DeviceFacts) -> float:
    """The model's time (µs) of one call: the memory floor stretched by the idle share of the device,
    plus the per-task cost on a CPU."""
    floor_us = spec.bytes_moved(rows) / (facts.copy_gbps * 1e3)
    units = math.ceil(rows / _rows_per_unit(cand.config))
    workers = facts.workers
    oversubscribed = 1.0
    threads = getattr(cand.config, "threads", 0) if facts.kind == "cpu" else 0
    if threads:
        workers = min(threads, facts.workers)
        oversubscribed = max(1.0, threads / facts.workers)
    busy = min(units, workers) / facts.workers
    task_us = TASK_US * units / min(units, workers) if facts.kind == "cpu" else 0.0
    return floor_us / busy * oversubscribed + task_us


def heuristic_distance(space: SearchSpace, cand: Candidate, heuristic) -> int:
    """Steps between `cand` and its backend's heuristic config over the ordinal knobs (0: it is the heuristic).

    A knob `cand`'s other knobs pin (no other value of it is valid with them) is no choice and counts no steps:
    numba-cpu's one-thread forward takes one rows_per_task, so it is a step from a parallel heuristic (its
    thread count), not six; counted by value, a budgeted study never reached it, though it was the best launch
    of a 1024 x 1024 forward on 2 cores by 1.2x."""
    knobs = space.knobs.get(cand.backend, {})
    return sum(abs(knobs[k].index(getattr(cand.config, k)) - knobs[k].index(getattr(heuristic, k)))
               for k in _moved_knobs(space, cand, heuristic))


def _heuristics(space: SearchSpace) -> dict:
    heuristics = {}
    for name in space.configs:
        try:
            heuristics[name] = space.backends[name].heuristic(space.spec)
        except Exception:  # a backend without a heuristic for this spec: no tie-break for it
            heuristics[name] = None
    return heuristics


def ranked(space: SearchSpace, rows: int, facts: DeviceFacts) -> list[Candidate]:
    """Every candidate of `space`, the model's best first."""
    heuristics = _heuristics(space)

    def score(cand):
        predicted = predict_us(space.spec, rows, cand, facts)
        return (round(math.log(max(predicted, 1e-9)) / math.log(TIE)),
                heuristic_distance(space, cand, heuristics[cand.backend]))
    return sorted(space.candidates(), key=score)


def _moved_knobs(space: SearchSpace, cand: Candidate, heuristic) -> tuple[str, ...]:
    """The knobs (choices, as `heuristic_distance` counts them) in which `cand` differs from its heuristic."""
    if heuristic is None or heuristic not in space.configs.get(cand.backend, ()):
        return ()
    return tuple(k for k in space.knobs[cand.backend] if getattr(cand.config, k) != getattr(heuristic, k)
                 and space.is_choice(cand.backend, cand.config, k))


def nearest_to_heuristics(space: SearchSpace) -> list[Candidate]:
    """Every candidate of `space`, the ones fewest knob steps from their backend's heuristic first; at equal steps,
    one candidate of each set of knobs moved before a second of any, so that a few candidates try every knob.

    In enumeration order alone the two rows_per_task neighbours of numba-cpu's parallel heuristic came before its
    serial launch (also one step, the thread count), and a budgeted forward study on two cores that timed two
    candidates after its seeds never timed the launch that was the best of all four such studies' spaces
    (docs/benchmarks/budget-vs-exhaustive.md)."""
    heuristics = _heuristics(space)
    seen: dict[tuple, int] = {}

    def order(cand):
        h = heuristics[cand.backend]
        steps = heuristic_distance(space, cand, h)
        group = (steps, cand.backend, _moved_knobs(space, cand, h))
        seen[group] = seen.get(group, -1) + 1  # the candidate's place among its group's, in enumeration order
        return steps, seen[group]
    return sorted(space.candidates(), key=order)


@functools.lru_cache(maxsize=65536)
def _source_sha(backend, spec: NormSpec, config) -> str | None:
    try:
        return backend.render(spec, config).sha256
    except Exception:  # a backend that renders nothing: every config is its own compile
        return None


def compile_key(space: SearchSpace, cand: Candidate) -> str | None:
    """What one compile serves: the rendered source's hash, which keys every backend's compile cache. Knobs a
    template leaves out (numba-cpu's rows per task and threads: 27 configs share each of its 8 sources) change
    only the launch, so a candidate whose source is already compiled costs its timing alone. None for a backend
    with nothing to compile (`Backend.compiles`: torch), whose "source" names its spec: were it a source, every
    study's torch seed would be one new to the run, priced as a compile it never waits for."""
    backend = space.backends[cand.backend]
    if not getattr(backend, "compiles", True):
        return None
    sha = _source_sha(backend, space.spec, cand.config)
    return f"{cand.backend}:{sha}" if sha is not None else cand.key


def compile_keys(space: SearchSpace, cands) -> set[str]:
    """The compile keys of `cands` that name a compile (`compile_key`; torch's none)."""
    return {compile_key(space, c) for c in cands} - {None}


def first_to_time(space: SearchSpace, rows: int, facts: DeviceFacts, seeds: list) -> tuple[list[Candidate], str]:
    """The candidates a budgeted study times right after its `seeds` (Candidates), and the name of their order.

    First every candidate that shares a seed's compiled source (no compile to pay), then RANKED more, each
    list in the order of its device: on a CPU the distance from the heuristic, since the model ranked worse
    than it there while numba-cpu's parallel kernels ran on Numba's pool (mean Spearman's rho -0.03 to +0.03
    against +0.26 to +0.32 over 16 specs in five exhaustive runs on a quiet VM); on torch's OpenMP team it ranks
    better (+0.53 and +0.54 against +0.36 and +0.24, two runs), and whether its order finds the best sooner there
    is not measured yet (docs/benchmarks/budget-vs-exhaustive.md). On a GPU, where it is unmeasured, the model."""
    if facts.kind == "cpu":
        order, name = nearest_to_heuristics(space), "near the heuristic"
    else:
        order, name = ranked(space, rows, facts), "cost model"
    seeded = {c.key for c in seeds}
    compiled = compile_keys(space, [c for c in seeds if c.backend in space.backends])
    order = [c for c in order if c.key not in seeded]
    free = [c for c in order if compile_key(space, c) in compiled]
    return free + [c for c in order if compile_key(space, c) not in compiled][:RANKED], name


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


@dataclass
class SpecRho:
    spec: str
    rows: int
    candidates: int
    model: float      # rho(model's order, measured median)
    distance: float   # rho(distance from the heuristic, measured median)


def spec_rho(space: SearchSpace, rows: int, facts: DeviceFacts, measured: dict) -> SpecRho:
    """Both correlations over the candidates of `space` that `measured` (candidate key -> median µs) holds."""
    order = {c.key: i for i, c in enumerate(ranked(space, rows, facts))}
    heuristics = _heuristics(space)
    cands = [space.named(k) for k in measured if space.named(k) is not None]
    times = [measured[c.key] for c in cands]
    distance = [heuristic_distance(space, c, heuristics[c.backend]) for c in cands]
    return SpecRho(space.spec.short(), rows, len(cands), spearman([order[c.key] for c in cands], times),
                   spearman(distance, times))


def verdict(rows: list[SpecRho]) -> str:
    """Keep or drop the model: it must rank better than the heuristic distance alone on most specs and on average."""
    if not rows:
        return "verdict: none (no spec measured)"
    better = sum(r.model > r.distance for r in rows)
    mean_model = sum(r.model for r in rows) / len(rows)
    mean_distance = sum(r.distance for r in rows) / len(rows)
    keep = better * 2 > len(rows) and mean_model > mean_distance
    head = ("keep the cost model: it ranks better than the heuristic distance alone" if keep else
            "drop the cost model: it does not rank better than the heuristic distance alone")
    return (f"verdict: {head} (higher rho on {better} of {len(rows)} specs; mean rho {mean_model:+.2f} "
            f"vs {mean_distance:+.2f})")
