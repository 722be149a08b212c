"""Transfer across shapes: which studies are anchors, the order they run in, the seeds a neighbour takes from
them (mapped into its own space), its short patience, records of other GPUs as seeds that are re-measured,
and the plan's roles.

A fake backend whose block knob must stay at most hidden / 2 (so an anchor's winner can be invalid for a
smaller neighbour) and a scripted timer whose cost is lowest at block = hidden / 2, rows = 4, unroll = 2,
advancing a scripted clock by a fixed time per candidate: what runs when is exact whatever the machine's load.
"""
import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from test_budget import COSTS, RowsBackend, ScriptedClockTimer

from autonorm import db_sources
from autonorm.backends.torch_eager import TorchBackend
from autonorm.config import Config, knob
from autonorm.db import Entry, Record, RecordKey
from autonorm.spec import NormSpec
from autonorm.tune import SearchSpace, StudyOptions, make_storage, transfer, tune_grid
from autonorm.tune.space import Candidate

pytest.importorskip("optuna")


def spec(hidden: int, direction: str = "fwd") -> NormSpec:
    return NormSpec("rmsnorm", direction, "float32", "float32", hidden)


@dataclass(frozen=True)
class BlockConfig(Config):
    backend: ClassVar[str] = "fake"
    block: int = knob((32, 64, 128, 256, 512))
    rows: int = knob((2, 4))
    unroll: int = knob((1, 2))

    @classmethod
    def is_valid(cls, spec, config):
        return None if config.block <= spec.hidden // 2 else f"block {config.block} above hidden / 2"


class BlockBackend(RowsBackend):  # its kernels are torch's, each tagged with its config for the timer
    config_cls = BlockConfig


def backends():
    return {"fake": BlockBackend(), "torch": TorchBackend()}


# --- anchors and order ------------------------------------------------------------------------------
def test_anchors_are_the_smallest_the_largest_and_each_value_a_factor_above_the_one_before():
    assert transfer.spaced([768, 1024, 2048, 4096, 5120, 8192], 4) == {768, 4096, 8192}
    assert transfer.spaced([1, 64, 1024, 4096, 16384], 16) == {1, 64, 1024, 16384}
    assert transfer.spaced([512], 4) == {512}


def test_neighbours_run_after_the_studies_they_take_seeds_from():
    shapes = [(spec(h), r) for h in (256, 512, 1024) for r in (64, 128, 1024)]
    found = transfer.roles(shapes)
    by_shape = {(s.hidden, r): role for (s, r), role in zip(shapes, found)}
    # hidden anchors 256 and 1024 (factor 4), rows anchors 64 and 1024 (factor 16)
    assert {k for k, role in by_shape.items() if role.anchor} == {(256, 64), (256, 1024), (1024, 64), (1024, 1024)}
    assert by_shape[(512, 64)].sources == ((256, 64), (1024, 64))
    assert by_shape[(256, 128)].sources == ((256, 64), (256, 1024))  # along rows: same hidden, nearest first
    assert by_shape[(512, 128)].tier == 2
    assert by_shape[(512, 128)].sources == ((256, 128), (1024, 128), (512, 64), (512, 1024))
    order = [shapes[i] for i in transfer.run_order(found)]
    ran = set()
    for s, r in order:
        assert set(by_shape[(s.hidden, r)].sources) <= ran
        ran.add((s.hidden, r))
    assert [(s.hidden, r) for s, r in order[:4]] == [(256, 64), (256, 1024), (1024, 64), (1024, 1024)]


def test_each_problem_has_its_own_anchors_and_a_study_without_sources_is_an_anchor():
    shapes = [(spec(256), 64), (spec(512), 64), (spec(1024), 64), (spec(512, "bwd"), 64)]
    found = transfer.roles(shapes)
    assert [r.anchor for r in found] == [True, False, True, True]  # the backward's only shape is its anchor
    assert found[1].describe() == "from N=256 R=64, N=1024 R=64"
    assert found[0].describe() == "anchor"


# --- seeds ------------------------------------------------------------------------------------------
def test_a_config_invalid_in_the_neighbours_space_maps_to_its_nearest_valid_config():
    space = SearchSpace(spec(256), backends())  # block at most 128
    valid = Candidate("fake", BlockConfig(64, 2, 2))
    assert transfer.map_into(space, valid) is valid
    mapped = transfer.map_into(space, Candidate("fake", BlockConfig(512, 4, 2)))
    assert mapped == Candidate("fake", BlockConfig(128, 4, 2))
    assert transfer.map_into(SearchSpace(spec(256), {"torch": TorchBackend()}), valid) is None  # no fake here


def test_seeds_are_mapped_kept_in_order_and_each_candidate_is_timed_once_with_all_its_sources():
    space = SearchSpace(spec(256), backends())
    seeds = transfer.study_seeds(space, [
        transfer.Seed(Candidate("fake", BlockConfig(512, 4, 2)), "anchor N=1024 R=64"),
        transfer.Seed(Candidate("fake", BlockConfig(32, 2, 1)), "heuristic"),
        transfer.Seed(Candidate("fake", BlockConfig(128, 4, 2)), "same-arch gpu-b"),
    ])
    assert [(s.candidate.config, s.source) for s in seeds] == [
        (BlockConfig(128, 4, 2), "anchor N=1024 R=64 (nearest valid) + same-arch gpu-b"),
        (BlockConfig(32, 2, 1), "heuristic")]
    assert transfer.sources_summary(seeds) == "anchor N=1024 R=64, same-arch gpu-b, heuristic"


def _record(hidden: int, bucket: int, config: BlockConfig, median_us: float = 0.001) -> Record:
    key = RecordKey.of(spec(hidden), bucket)
    return Record(key, Entry("fake", config, median_us, median_us, median_us, 1.0, None), template_hash="fake-1")


def _table(slug: str, cc: str, *records: Record) -> db_sources.DeviceTable:
    return db_sources.DeviceTable({"slug": slug, "kind": "cuda", "compute_capability": cc},
                                  {r.key: r for r in records})


def test_a_table_seeds_its_record_for_the_key_else_its_nearest_of_the_same_problem():
    exact, near, far = BlockConfig(64, 2, 1), BlockConfig(128, 2, 1), BlockConfig(256, 4, 2)
    table = _table("gpu-b", "9.0", _record(512, 64, exact), _record(1024, 64, near), _record(4096, 1024, far))
    assert [s.candidate.config for s in transfer.from_tables(spec(512), 64, [("same-arch gpu-b", table)])] == [exact]
    seeds = transfer.from_tables(spec(1024), 50, [("same-arch gpu-b", table)])  # 50 rows: bucket 64
    assert [(s.candidate.config, s.source) for s in seeds] == [(near, "same-arch gpu-b")]
    assert transfer.from_tables(spec(1024, "bwd"), 64, [("same-arch gpu-b", table)]) == []  # another problem


def test_seed_tables_are_the_same_architecture_then_the_newest_generation_below(monkeypatch):
    tables = {"a100": _table("a100", "8.0", _record(512, 64, BlockConfig(32, 2, 1))),
              "l40": _table("l40", "8.9", _record(512, 64, BlockConfig(32, 2, 1))),
              "h100-pcie": _table("h100-pcie", "9.0", _record(512, 64, BlockConfig(32, 2, 1))),
              "b200": _table("b200", "10.0", _record(512, 64, BlockConfig(32, 2, 1)))}

    class File:
        def __init__(self, device):
            self.device = device
    monkeypatch.setattr(db_sources, "files", lambda: [(None, File(t.device)) for t in tables.values()])
    monkeypatch.setattr(db_sources, "table", tables.get)
    monkeypatch.setattr(db_sources, "same_architecture", lambda device: [tables["h100-pcie"]])
    h100 = {"slug": "h100-sxm", "kind": "cuda", "compute_capability": "9.0"}
    assert [label for label, _ in transfer.seed_tables(h100)] == ["same-arch h100-pcie", "previous-gen l40"]
    assert transfer.previous_generation({"kind": "cuda", "compute_capability": "8.0"}) == []
    assert transfer.previous_generation({"kind": "cpu", "compute_capability": None}) == []


# --- the plan ---------------------------------------------------------------------------------------
def test_a_neighbour_is_planned_short_with_its_sources_among_its_seeds():
    from autonorm.tune import plan as planner

    costs = planner.Costs({"fake": 0.0, "torch": 0.0}, time_s=0.05, finish_s=0.2)
    shapes = [(spec(h), 64) for h in (256, 512, 1024)]
    jobs = [(s, r, f"study-{s.hidden}", SearchSpace(s, backends()), ["heuristic-a", "heuristic-b"])
            for s, r in shapes]
    plans = planner.study_plans(jobs, costs, 60, {})
    found = transfer.roles(shapes)
    heuristic = transfer.Seed(Candidate("fake", BlockConfig(32, 2, 1)), "heuristic")
    transfer.shape_plans(plans, found, [[heuristic, heuristic]] * 3)
    assert [p.role for p in plans] == ["anchor", "from N=256 R=64, N=1024 R=64", "anchor"]
    assert plans[1].seeds_from == "heuristic x2"
    assert [p.wanted for p in plans] == [len(jobs[0][3]), 2 + 2 + transfer.NEIGHBOUR_SEARCH, len(jobs[2][3])]
    assert plans[1].seeds == 4
    assert math.isclose(planner.split(plans, 100.0, 0.0).studies[1].search_s, plans[1].wanted * 0.05)


def test_the_time_a_neighbour_does_not_want_goes_to_the_anchors():
    from autonorm.tune import plan as planner

    shapes = [(spec(h), 64) for h in (256, 512, 1024)]
    found = transfer.roles(shapes)

    def planned(shaped: bool) -> list:
        # spaces of 200 with a trial budget of 60, as numba-cpu's on the default grid: every study wants 60
        plans = [planner.StudyPlan(s, r, f"study-{s.hidden}", 200, 2, 60, 0.0, 0.05, 0.2) for s, r in shapes]
        if shaped:
            transfer.shape_plans(plans, found, [[]] * 3)
        return planner.split(plans, 4.0, 0.0).studies
    plain, shaped = planned(False), planned(True)
    assert sum(p.search_s for p in plain) == pytest.approx(sum(p.search_s for p in shaped))  # the whole budget
    assert shaped[1].search_s <= (4 + transfer.NEIGHBOUR_SEARCH) * 0.05 < plain[1].search_s
    assert shaped[0].search_s > plain[0].search_s and shaped[2].search_s > plain[2].search_s


# --- a grid run: anchors, then a neighbour seeded from them -----------------------------------------
def cost_us(config) -> float:
    """Lowest at the largest block a shape allows (block 512 needs hidden 1024), rows 4 and unroll 2."""
    return 10.0 + (9 - math.log2(config.block)) + abs(math.log2(config.rows) - 2) + (config.unroll != 2)


class BlockTimer(ScriptedClockTimer):
    """test_budget's scripted clock and timer, with `cost_us` for the fake's configs (torch: 50 us)."""

    @staticmethod
    def _us(kernel):
        config = getattr(kernel, "config", None)
        return 50.0 if config is None else cost_us(config)


ROWS = 64
TRIALS = 24  # every space of these shapes (13 to 21 candidates with torch) is exhaustive: anchors time it all


def tune(folder, hiddens, timer, shown, trials=TRIALS):
    results = []
    options = StudyOptions(trials=trials, time_budget=600, compile_workers=1, compile_baseline=False)
    tune_grid([spec(h) for h in hiddens], [ROWS], backends(), torch.device("cpu"), options,
              db_path=folder / "db.json", storage=make_storage(None, folder / "j.journal"), lock_path=None,
              results=results, copy_gbps=10.0, timer=timer, budget_s=30.0, elapsed=lambda: 0.0,
              costs=COSTS, show_plan=shown.append, clock=timer.clock)
    return results


def register_fake(mp):
    """Databases rebuild each config through its backend: the fake must be one by name."""
    from autonorm import backends as registry

    mp.setitem(registry.BACKENDS, "fake", "tests:BlockBackend")
    mp.setitem(registry._instances, "fake", BlockBackend())


@dataclass
class GridRun:
    folder: object
    timer: BlockTimer
    shown: list
    results: list

    def winner(self, hidden):
        return next(r.record.winner.config for r in self.results if r.spec.hidden == hidden)

    def timed(self, hidden):
        return [config for h, config in self.timer.timed if h == hidden]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """One budgeted run over hidden 256, 512 and 1024 (anchors 256 and 1024, 4x apart; 512 their neighbour)."""
    with pytest.MonkeyPatch.context() as mp:
        register_fake(mp)
        run = GridRun(tmp_path_factory.mktemp("grid"), BlockTimer(), [], [])
        run.results = tune(run.folder, [256, 512, 1024], run.timer, run.shown)
    return run


def test_anchors_run_before_their_neighbours(grid):
    hiddens = [hidden for hidden, _ in grid.timer.timed]
    assert hiddens.index(512) > max(i for i, h in enumerate(hiddens) if h in (256, 1024))
    assert [r.spec.hidden for r in grid.results] == [256, 1024, 512]


def test_a_neighbour_first_times_its_anchors_winners_mapped_into_its_space(grid):
    assert grid.winner(256) == BlockConfig(128, 4, 2) and grid.winner(1024) == BlockConfig(512, 4, 2)
    # block 512 is invalid at hidden 512 (at most 256): the nearest valid config is block 256, the rest kept
    assert grid.timed(512)[:2] == [BlockConfig(128, 4, 2), BlockConfig(256, 4, 2)]


def test_a_neighbour_stops_after_its_short_patience(grid):
    # its seeds: the 2 anchors' winners and the 2 heuristics (fake, torch); no later candidate beats the
    # mapped winner (the best of its space), so it stops NEIGHBOUR_PATIENCE candidates later, exhaustive space
    # or not, where the anchors timed every candidate of theirs
    assert len(grid.timed(512)) == 4 + transfer.NEIGHBOUR_PATIENCE
    assert {r.spec.hidden: r.completeness for r in grid.results} == {256: "exhaustive", 1024: "exhaustive",
                                                                     512: "converged"}
    assert grid.winner(512) == BlockConfig(256, 4, 2)


def test_the_plan_names_the_anchors_and_where_each_neighbour_takes_its_seeds_from(grid):
    lines = {line.split()[3]: line for line in grid.shown[0].splitlines() if line.startswith("rmsnorm")}
    assert "anchor" in lines["N=256"] and "anchor" in lines["N=1024"]
    assert "from N=256 R=64, N=1024 R=64" in lines["N=512"] and "anchor" not in lines["N=512"]
    assert "heuristic x2" in lines["N=512"]


def test_each_study_stores_where_its_seeds_came_from(grid):
    import optuna

    storage = make_storage(None, grid.folder / "j.journal")
    sources = {s.user_attrs["spec"]["hidden"]: [seed["source"] for seed in s.user_attrs["seed_sources"]]
               for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    assert sources[512][:4] == ["anchor N=256 R=64", "anchor N=1024 R=64 (nearest valid)", "heuristic", "heuristic"]
    assert sources[256][:2] == ["heuristic", "heuristic"]


def test_a_same_arch_record_seeds_the_search_and_is_measured_again(tmp_path, monkeypatch):
    register_fake(monkeypatch)
    stored = BlockConfig(64, 2, 1)
    table = _table("gpu-b", "9.0", _record(512, ROWS, stored, median_us=0.001))
    monkeypatch.setattr(db_sources, "same_architecture", lambda device: [table])
    timer = BlockTimer()
    record = tune(tmp_path, [512], timer, [], trials=6)[0].record
    assert timer.timed[0] == (512, stored)  # its first candidate (no earlier winner here)
    entries = [record.winner, *record.runners_up]
    assert all(e.median_us >= 10.0 for e in entries)  # the stored 0.001 us never enters the record
    assert all(e.median_us == pytest.approx(cost_us(e.config)) for e in entries if e.backend == "fake")


def test_a_bad_patience_after_is_refused_by_name():
    from autonorm.errors import TuneOptionError

    for bad in (-1, 2.5, True):
        with pytest.raises(TuneOptionError, match="patience_after"):
            StudyOptions(patience_after=bad)
    assert StudyOptions(patience_after=0).patience_after == 0


def test_only_a_study_that_starts_from_its_sources_winners_is_cut_short():
    role = transfer.Role(1, ((256, 64), (1024, 64)))
    options = StudyOptions(trials=40)
    assert transfer.options_for(options, transfer.transferred(role, spec(512), {}), 2) is options  # no winner yet
    winners = {}
    transfer.remember(winners, spec(256), 64, _record(256, 64, BlockConfig(128, 4, 2)))
    moved = transfer.transferred(role, spec(512), winners)
    assert moved == [transfer.Seed(Candidate("fake", BlockConfig(128, 4, 2)), "anchor N=256 R=64")]
    short = transfer.options_for(options, moved, 3)
    assert (short.patience, short.patience_after, short.trials) == (transfer.NEIGHBOUR_PATIENCE, 3, 40)
