"""Transfer across shapes: anchors are searched first and deeper, their neighbours start from their winners.

Within one grid, the studies of one problem (op, direction, dtypes, features) form a
table of hidden sizes by rows buckets. Along each axis some values are anchors
(`spaced`): the smallest, the largest, and every value at least `HIDDEN_FACTOR` (hidden)
or `ROWS_FACTOR` (rows buckets) above the anchor before it. A study whose hidden size
and rows bucket are both anchors is an anchor study (tier 0); one with one of them off
the anchors is tier 1, with both off tier 2. Studies run by tier, so every study runs
after its sources: the nearest studies of a lower tier below and above it along the
hidden axis (same rows bucket) and along the rows axis (same hidden size). A study with
no source in the grid is an anchor.

A neighbour (tier 1 or 2) times its sources' winners first, mapped into its own space,
then stops after `NEIGHBOUR_PATIENCE` candidates without gain; the plan wants no more
than `NEIGHBOUR_SEARCH` candidates of it beyond its seeds, so the budget it would have
taken goes to the anchors, which keep the full search.

Records tuned on other GPUs may seed any study: the databases (shipped, the user's folder,
AUTONORM_DB_PATH) of other devices of this one's compute capability, and of the newest
generation below it. Like every seed, such a record is only a first candidate to time:
its stored time is never used. Each seed keeps where it came from; the study stores it
(user attribute `seed_sources`) and the plan prints it.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass

from .. import db_sources
from ..spec import NormSpec, rows_bucket
from .space import Candidate, SearchSpace

HIDDEN_FACTOR = 4    # hidden anchors at least 4x apart: the default grid's 768, 4096 and 8192
# The default grid's rows buckets are already 4x to 64x apart: at 4x each would be an anchor. At 16x: 1, 64,
# 1024 and 16384, and 4096 a neighbour. Neither factor is measured to be the best one.
ROWS_FACTOR = 16
NEIGHBOUR_PATIENCE = 4  # a neighbour stops after this many candidates past its seeds without a gain
NEIGHBOUR_SEARCH = 2 * NEIGHBOUR_PATIENCE  # candidates past its seeds the plan gives a neighbour time for


def problem(spec: NormSpec) -> tuple:
    """What a study shares with the studies it may transfer from or to: all of its spec but the hidden size."""
    return spec.op, spec.direction, spec.x_dtype, spec.w_dtype, spec.features


def spaced(values, factor: float) -> frozenset:
    """The anchors among `values`: the smallest, the largest, and each one at least `factor` times the
    anchor before it."""
    ordered = sorted(set(values))
    picks = [ordered[0]]
    for value in ordered[1:]:
        if value >= picks[-1] * factor:
            picks.append(value)
    return frozenset(picks + [ordered[-1]])


@dataclass(frozen=True)
class Role:
    """A study's place in the transfer: its tier (0 for an anchor) and the (hidden, rows bucket) of the
    studies of its problem whose winners seed it."""

    tier: int
    sources: tuple = ()

    @property
    def anchor(self) -> bool:
        return self.tier == 0

    def describe(self) -> str:
        if self.anchor:
            return "anchor"
        return "from " + ", ".join(f"N={h} R={r}" for h, r in self.sources)


def roles(shapes: list) -> list[Role]:
    """The Role of each (spec, rows) of `shapes`, in their order."""
    keys = [(problem(spec), spec.hidden, rows_bucket(rows)) for spec, rows in shapes]
    anchors = {}
    for prob in {k[0] for k in keys}:
        anchors[prob] = (spaced([h for p, h, _ in keys if p == prob], HIDDEN_FACTOR),
                         spaced([r for p, _, r in keys if p == prob], ROWS_FACTOR))
    tier = {k: (k[1] not in anchors[k[0]][0]) + (k[2] not in anchors[k[0]][1]) for k in keys}
    found = []
    for prob, hidden, bucket in keys:
        mine = tier[(prob, hidden, bucket)]
        lower = [(h, r) for p, h, r in tier if p == prob and tier[(p, h, r)] < mine]
        sources = (_nearest_both_sides(hidden, [h for h, r in lower if r == bucket], lambda h: (h, bucket))
                   + _nearest_both_sides(bucket, [r for h, r in lower if h == hidden], lambda r: (hidden, r)))
        found.append(Role(mine, tuple(sources)) if sources else Role(0))
    return found


def _nearest_both_sides(value: int, others: list, shape) -> list:
    below = [o for o in others if o < value]
    above = [o for o in others if o > value]
    picks = [o for o in (max(below, default=None), min(above, default=None)) if o is not None]
    return [shape(o) for o in sorted(picks, key=lambda o: abs(math.log2(o / value)))]  # nearest first


def run_order(found: list[Role]) -> list[int]:
    """Indices of the studies in the order they run: by tier, so that sources run before their neighbours."""
    return sorted(range(len(found)), key=lambda i: found[i].tier)


def arrange(jobs: list) -> tuple[list, list[Role]]:
    """A grid's jobs (tuples that start with spec and rows) in the order they run, and their roles."""
    found = roles([(job[0], job[1]) for job in jobs])
    order = run_order(found)
    return [jobs[i] for i in order], [found[i] for i in order]


# -- seeds -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Seed:
    """A first candidate to time and where it came from ("heuristic", "earlier winner", "anchor N=.. R=..",
    "same-arch <device>", "previous-gen <device>", "cost model" or "near the heuristic" (`rank.first_to_time`);
    "(nearest valid)" when mapped into the study's space)."""

    candidate: Candidate
    source: str


def map_into(space: SearchSpace, cand: Candidate) -> Candidate | None:
    """`cand` itself when `space` holds it, else its backend's valid config of `space` nearest to it in steps
    over each knob's declared domain (the other shape's values may be absent from this space, so its own
    knob values cannot measure the distance); None when its backend has no config in `space`."""
    configs = space.configs.get(cand.backend)
    if not configs:
        return None
    if cand.config in configs:
        return cand
    domain = type(cand.config).domain()

    def steps(config):
        return sum(abs(values.index(getattr(config, k)) - values.index(getattr(cand.config, k)))
                   for k, values in domain.items())
    return Candidate(cand.backend, min(configs, key=steps))


def study_seeds(space: SearchSpace, seeds: list[Seed]) -> list[Seed]:
    """`seeds` mapped into `space`, in their order, each candidate once (its sources joined by " + ")."""
    merged: dict[str, Seed] = {}
    for seed in seeds:
        mapped = map_into(space, seed.candidate)
        if mapped is None:
            continue
        source = seed.source if mapped == seed.candidate else f"{seed.source} (nearest valid)"
        known = merged.get(mapped.key)
        merged[mapped.key] = Seed(mapped, source if known is None else f"{known.source} + {source}")
    return list(merged.values())


def remember(winners: dict, spec: NormSpec, rows: int, record) -> None:
    """Keep a finished study's winner (its Record; None when it has none) for the studies that transfer from it."""
    if record is not None:
        winners[(problem(spec), spec.hidden, rows_bucket(rows))] = Candidate(record.winner.backend,
                                                                            record.winner.config)


def transferred(role: Role, spec: NormSpec, winners: dict) -> list[Seed]:
    """The winners of `role`'s sources that have one by now (`winners`, filled by `remember`), nearest source
    first (along hidden, then along rows)."""
    kind = "anchor" if role.tier == 1 else "neighbour"  # a tier-2 study's sources are tier-1 studies
    return [Seed(winners[(problem(spec), h, r)], f"{kind} N={h} R={r}")
            for h, r in role.sources if (problem(spec), h, r) in winners]


# Seeds a GPU neighbour keeps whatever its sources' winners: torch eager, whose search timing is the light
# finish's baseline (`finalize.py`).
ALWAYS_KEPT = ("torch",)


def _heuristic_only(seed: Seed) -> bool:
    return {part.removesuffix(" (nearest valid)") for part in seed.source.split(" + ")} == {"heuristic"}


def lean_seeds(seeds: list[Seed], moved: list[Seed]) -> list[Seed]:
    """A GPU neighbour's own seeds beside its sources' winners (`moved`): every seed that is not only a
    heuristic (an earlier winner, another GPU's record), torch eager's heuristic (ALWAYS_KEPT), and the
    heuristics of the backends a source's winner belongs to; the other backends' heuristics are left to the
    search (on a GPU each seed costs a compile and an audit). Without `moved` (its sources left out or failed)
    all of `seeds`."""
    if not moved:
        return seeds
    kept = {s.candidate.backend for s in moved} | set(ALWAYS_KEPT)
    return [s for s in seeds if not _heuristic_only(s) or s.candidate.backend in kept]


def lean_count(seeds: list[Seed], sources: int) -> int:
    """The most seeds `lean_seeds` leaves a neighbour with `sources` sources, their winners included, known
    before any winner is: each source's winner and at most one more backend's heuristic a source."""
    kept = sum(not _heuristic_only(s) or s.candidate.backend in ALWAYS_KEPT for s in seeds)
    return kept + sources + min(sources, len(seeds) - kept)


def options_for(options, moved: list[Seed], seeds: int):
    """The StudyOptions of a study: one that starts from its sources' winners (`moved`, from `transferred`)
    stops after NEIGHBOUR_PATIENCE candidates past its `seeds` without a gain; any other (an anchor, or a
    neighbour whose sources have no winner: left out by the budget, or every candidate failed) keeps the
    full search."""
    if not moved:
        return options
    return dataclasses.replace(options, patience=NEIGHBOUR_PATIENCE, patience_after=seeds)


def provenance(seeds: list[Seed]) -> list[dict]:
    """Where each seed came from, as the study stores it (user attribute `seed_sources`)."""
    return [{"candidate": s.candidate.key, "source": s.source} for s in seeds]


def sources_summary(seeds: list[Seed]) -> str:
    """Where a study's seeds come from, for the plan: 'heuristic x2, earlier winner, same-arch nvidia-h100-pcie'."""
    kinds = Counter(part.removesuffix(" (nearest valid)") for s in seeds for part in s.source.split(" + "))
    return ", ".join(kind if n == 1 else f"{kind} x{n}" for kind, n in kinds.items())


def from_tables(spec: NormSpec, rows: int, tables: list) -> list[Seed]:
    """One seed per (label, DeviceTable) of `tables`: the winner of its record for this key, else of its
    nearest record of the same problem (hidden first, then rows, in log distance)."""
    from ..db import RecordKey

    key = RecordKey.of(spec, rows_bucket(rows))
    seeds = []
    for label, table in tables:
        near = sorted(table.by_problem(key), key=lambda kr: (abs(math.log2(kr[0].hidden / key.hidden)),
                                                             abs(math.log2(kr[0].rows_bucket / key.rows_bucket)),
                                                             -kr[0].hidden, -kr[0].rows_bucket))
        if near:
            winner = near[0][1].winner
            seeds.append(Seed(Candidate(winner.backend, winner.config), label))
    return seeds


def seed_tables(device: dict) -> list:
    """(label, DeviceTable) of the databases that may seed a study on `device`: other GPUs of its compute
    capability ("same-arch <slug>"), then those of the newest generation below it ("previous-gen <slug>")."""
    tables = [(f"same-arch {t.device.get('slug')}", t) for t in db_sources.same_architecture(device)]
    return tables + [(f"previous-gen {t.device.get('slug')}", t) for t in previous_generation(device)]


def _cc(value) -> tuple | None:
    try:
        major, minor = str(value).split(".")
        return int(major), int(minor)
    except (TypeError, ValueError):
        return None


def previous_generation(device: dict) -> list:
    """Tables of the GPUs with the newest compute capability below `device`'s (by slug, for a stable order)."""
    mine = _cc(device.get("compute_capability"))
    if device.get("kind") != "cuda" or mine is None:
        return []
    gpus = {(db.device.get("slug"), _cc(db.device.get("compute_capability")))
            for _, db in db_sources.files() if db.device.get("kind") == "cuda"}
    older = [cc for _, cc in gpus if cc is not None and cc < mine]
    if not older:
        return []
    slugs = sorted(slug for slug, cc in gpus if cc == max(older))
    return [t for t in (db_sources.table(s) for s in slugs) if t is not None and t.records]


# -- the plan --------------------------------------------------------------------------------------------
def shape_plans(plans: list, found: list[Role], seeds: list, lean: bool = False) -> None:
    """Mark each StudyPlan with its role and where its `seeds` (a list of Seed per plan) come from; a neighbour
    counts its sources among its seeds and wants no more than NEIGHBOUR_SEARCH candidates past them, which
    leaves the rest of the budget to the anchors. `lean` (on a GPU): a neighbour's seeds are `lean_seeds`',
    counted as `lean_count` bounds them."""
    for plan, role, known in zip(plans, found, seeds):
        plan.role, plan.seeds_from = role.describe(), sources_summary(known)
        if role.anchor or plan.status != "run":
            continue
        plan.seeds = lean_count(known, len(role.sources)) if lean else plan.seeds + len(role.sources)
        plan.wanted = min(plan.wanted, plan.seeds + NEIGHBOUR_SEARCH)
