"""`autonorm tune --budget`: the plan's numbers, the budget split, stopping at the budget, resume, ranked order.

A fake backend whose config has a rows-per-block knob (so the cost model can tell
configs apart) and a scripted timer that advances a scripted clock by a fixed time
per candidate (and per finish): the budget, the deadline and each study's time all
count on that clock, so what a budget buys is exact whatever the machine's load.
"""
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from fakes import TorchBackedFake

from autonorm.backends.torch_eager import TorchBackend
from autonorm.config import Config, knob
from autonorm.db import TuningDB
from autonorm.measure import Timing
from autonorm.spec import NormSpec
from autonorm.tune import Candidate, SearchSpace, StudyOptions, make_storage, rank, tune_grid
from autonorm.tune import plan as planner

pytest.importorskip("optuna")

SPECS = [NormSpec("rmsnorm", "fwd", "float32", "float32", 64), NormSpec("rmsnorm", "fwd", "float32", "float32", 128)]
ROWS = 64
SLEEP_S = 0.05  # the scripted clock's cost of one candidate
COSTS = planner.Costs({"fake": 0.0, "torch": 0.0}, time_s=SLEEP_S, finish_s=0.2)


@dataclass(frozen=True)
class RowsConfig(Config):
    backend: ClassVar[str] = "fake"
    rows: int = knob((1, 4, 16, 64))
    b: int = knob((1, 2))


class RowsBackend(TorchBackedFake):
    config_cls = RowsConfig


class ScriptedClockTimer:
    """Each search timing advances the clock by SLEEP_S (a finish by COSTS.finish_s) and returns the config's
    known cost; records the order it timed."""

    def __init__(self):
        self.timed, self.interleaved_calls, self.now = [], 0, 0.0

    def clock(self):
        return self.now

    @staticmethod
    def _us(kernel):
        config = getattr(kernel, "config", None)
        return 50.0 if config is None else 10.0 + abs(config.rows - 8) + config.b

    def measure(self, spec, kernel, rows):
        self.now += SLEEP_S
        self.timed.append((spec.hidden, getattr(kernel, "config", "torch")))
        us = self._us(kernel)
        return Timing(us, us * 0.97, us * 1.03, 10)

    def interleaved(self, spec, kernels, rows):
        self.interleaved_calls += 1
        self.now += COSTS.finish_s
        return [Timing(self._us(k), self._us(k) * 0.97, self._us(k) * 1.03, 10) for k in kernels]

    def describe(self):
        return {"timer": "scripted"}


def backends():
    return {"fake": RowsBackend(), "torch": TorchBackend()}


@pytest.fixture(autouse=True)
def fake_is_a_backend(monkeypatch):
    """Databases rebuild each config through its backend: the fake must be one by name."""
    from autonorm import backends as registry

    monkeypatch.setitem(registry.BACKENDS, "fake", "tests:RowsBackend")
    monkeypatch.setitem(registry._instances, "fake", RowsBackend())


def tune(tmp_path, budget_s, timer, shown=None, n_trials=40, costs=COSTS):
    results = []
    options = StudyOptions(trials=n_trials, time_budget=600, compile_workers=1, compile_baseline=False)
    db = tune_grid(SPECS, [ROWS], backends(), torch.device("cpu"), options, db_path=tmp_path / "db.json",
                   storage=make_storage(None, tmp_path / "j.journal"), lock_path=None, results=results,
                   copy_gbps=10.0, timer=timer, budget_s=budget_s, elapsed=lambda: 0.0, costs=costs,
                   show_plan=(shown.append if shown is not None else None), clock=timer.clock)
    return db, results


def _plans(n_trials=40, complete=()):
    jobs = [(spec, ROWS, f"study-{spec.hidden}", SearchSpace(spec, backends()), ["seed-a", "seed-b"])
            for spec in SPECS]
    return planner.study_plans(jobs, COSTS, n_trials, {f"study-{h}": ("converged", {}) for h in complete})


# --- the plan ---------------------------------------------------------------------------------------
def test_the_plan_gives_every_study_its_floor_then_shares_the_rest_by_the_search_it_wants():
    plans = _plans(n_trials=40)
    assert [p.space for p in plans] == [9, 9] and [p.wanted for p in plans] == [9, 9]
    floor = 2 * SLEEP_S + 0.2
    assert plans[0].floor_s == pytest.approx(floor)
    plan = planner.split(plans, budget_s=1.0, spent_s=0.2)
    # 0.8 s to share: floors first, the remaining 0.8 - 2 floors split equally (equal spaces)
    extra = (0.8 - 2 * floor) / 2
    assert [p.search_s for p in plan.studies] == pytest.approx([2 * SLEEP_S + extra] * 2)
    assert plan.studies[0].planned == int((2 * SLEEP_S + extra) / SLEEP_S)


def test_a_study_gets_no_more_than_its_space_and_the_excess_goes_to_the_others():
    plans = _plans(n_trials=40)
    plans[0].wanted = 4  # a small space: 4 candidates at most
    plan = planner.split(plans, budget_s=10.0, spent_s=0.0)
    assert plan.studies[0].search_s == pytest.approx(4 * SLEEP_S)
    assert plan.studies[1].search_s == pytest.approx(9 * SLEEP_S)  # all it can use; the rest stays unspent


def test_studies_whose_floor_does_not_fit_are_left_out_with_the_reason():
    plan = planner.split(_plans(), budget_s=0.4, spent_s=0.0)
    assert [p.status for p in plan.studies] == ["run", "left out"]
    assert plan.studies[1].why == "its seeds and finish need 0.3 s, 0.1 s of the budget were left"
    text = planner.format_plan(plan)
    assert "1 studies to run" in text and "1 left out" in text and "left out: its seeds and finish need" in text


def test_the_seconds_kept_for_the_end_are_given_to_no_study():
    fits = planner.split(_plans(), budget_s=0.65, spent_s=0.0)
    assert [p.status for p in fits.studies] == ["run", "run"]
    kept = planner.split(_plans(), budget_s=0.65, spent_s=0.0, end_s=0.1)
    assert [p.status for p in kept.studies] == ["run", "left out"]  # 0.55 s left: one floor of 0.3 s fits
    assert "0.2 s of the budget were left" in kept.studies[1].why
    assert planner.Costs.estimate({"warmup_s": 0.05, "rep_s": 0.25}, False).end_s == planner.END_S > 0


def test_the_grid_ends_the_seconds_kept_for_the_end_before_the_budget(tmp_path):
    shown, timer = [], ScriptedClockTimer()
    costs = planner.Costs(COSTS.compile_s, COSTS.time_s, COSTS.finish_s, end_s=0.5)
    tune(tmp_path, 1.3, timer, shown, costs=costs)
    assert "kept for the end" in shown[0]
    assert 0.6 < timer.now <= 1.3 - 0.5  # the studies' deadline is the budget less what the end needs


def test_a_study_complete_in_the_storage_is_planned_as_complete_and_costs_nothing():
    plan = planner.split(_plans(complete=[64]), budget_s=0.35, spent_s=0.0)
    assert [p.status for p in plan.studies] == ["complete", "run"]
    assert "1 complete from an earlier run" in planner.format_plan(plan)


# --- the cost model ---------------------------------------------------------------------------------
def test_the_cost_model_penalizes_an_idle_device_and_oversubscribed_threads():
    spec = SPECS[0]
    facts = rank.DeviceFacts("cpu", workers=4, copy_gbps=10.0)
    one_task, four_tasks = (rank.Candidate("fake", RowsConfig(r, 1)) for r in (64, 16))
    # one task keeps 1 of 4 cores busy: 4x the memory floor (each pays one task's scheduling)
    assert rank.predict_us(spec, 64, one_task, facts) - rank.TASK_US == pytest.approx(
        4 * (rank.predict_us(spec, 64, four_tasks, facts) - rank.TASK_US))

    @dataclass(frozen=True)
    class Threads(Config):
        backend: ClassVar[str] = "fake"
        rows: int = knob((16,))
        threads: int = knob((0, 4, 8))
    t = {n: rank.predict_us(spec, 64, rank.Candidate("fake", Threads(16, n)), facts) for n in (0, 4, 8)}
    assert t[0] == t[4] < t[8]


def test_ties_are_broken_by_the_distance_from_the_heuristic():
    space = SearchSpace(SPECS[0], {"fake": RowsBackend()})
    order = rank.ranked(space, ROWS, rank.DeviceFacts("cpu", workers=1, copy_gbps=10.0))
    # one worker: every config fills it, so the fewest tasks first; b is invisible to the model, so the
    # two configs of 64 rows per task tie and the nearer the heuristic (rows=1, b=1) comes first
    assert [c.config for c in order[:3]] == [RowsConfig(64, 1), RowsConfig(64, 2), RowsConfig(16, 1)]


# --- the run: budget, resume, order -----------------------------------------------------------------
def test_the_budget_stops_the_grid_records_say_budget_and_the_same_command_continues(tmp_path):
    shown, first = [], ScriptedClockTimer()
    _, results = tune(tmp_path, 0.9, first, shown)
    assert shown and "2 studies to run" in shown[0]
    assert [r.completeness for r in results] == ["budget", "budget"]
    assert all(r.record.completeness == "budget" and r.trials < 9 for r in results)
    saved = TuningDB.load(tmp_path / "db.json")
    assert {r.completeness for r in saved.records.values()} == {"budget"}

    again = ScriptedClockTimer()
    _, resumed = tune(tmp_path, 0.9, again)
    assert not set(first.timed) & set(again.timed)  # nothing timed twice
    assert all(b.trials > a.trials for a, b in zip(results, resumed))


def test_a_complete_study_is_taken_from_the_storage_without_timing(tmp_path):
    _, results = tune(tmp_path, 60.0, ScriptedClockTimer(), n_trials=4)  # a small trial budget with room to spare
    assert [r.completeness for r in results] == ["budget", "budget"]  # the trial budget, not patience
    timer, shown = ScriptedClockTimer(), []
    tune(tmp_path, 60.0, timer, shown, n_trials=4)  # the same trial budget again: nothing left to time
    assert timer.timed == [] and timer.interleaved_calls == 0 and "its 4 trials were spent" in shown[0]
    _, done = tune(tmp_path, 60.0, ScriptedClockTimer(), n_trials=40)
    assert [r.completeness for r in done] == ["exhaustive", "exhaustive"]
    timer, shown = ScriptedClockTimer(), []
    _, again = tune(tmp_path, 60.0, timer, shown, n_trials=40)
    assert timer.timed == [] and timer.interleaved_calls == 0
    assert "2 complete from an earlier run" in shown[0]
    assert [r.record.winner.config for r in again] == [r.record.winner.config for r in done]


def test_on_a_cpu_the_candidates_nearest_the_heuristic_are_timed_right_after_the_seeds(tmp_path):
    timer = ScriptedClockTimer()
    tune(tmp_path, 5.0, timer)  # room for every candidate: the whole order is seen
    spec = SPECS[0]
    space = SearchSpace(spec, backends())
    seeds = [RowsConfig.heuristic(spec), "torch"]
    nearest = [c.config for c in rank.nearest_to_heuristics(space)
               if c.config not in (RowsConfig.heuristic(spec),) and c.backend == "fake"][:rank.RANKED]
    timed = [config for hidden, config in timer.timed if hidden == spec.hidden]
    assert timed[:2] == seeds
    assert len(nearest) == 7 and timed[2:] == nearest  # the 7 candidates left after the seeds, nearest first
    steps = [rank.heuristic_distance(space, Candidate("fake", c), RowsConfig.heuristic(spec)) for c in nearest]
    assert steps == sorted(steps) and steps[0] == 1


def test_on_a_gpu_the_cost_models_best_follow_the_seeds():
    from autonorm.tune.run import _with_ranked
    from autonorm.tune.transfer import Seed

    spec = SPECS[0]
    space = SearchSpace(spec, backends())
    facts = rank.DeviceFacts("cuda", workers=4 * 132, copy_gbps=3000.0)
    seed = Seed(space.candidates()[0], "heuristic")
    chosen = _with_ranked([seed], space, ROWS, facts)
    model = [c for c in rank.ranked(space, ROWS, facts) if c.key != seed.candidate.key][:rank.RANKED]
    assert [s.candidate for s in chosen[1:]] == model and {s.source for s in chosen[1:]} == {"cost model"}


def test_db_show_prints_completeness_and_databases_without_it_still_load(tmp_path, capsys):
    import json

    from autonorm.cli import main
    from autonorm.errors import DatabaseError

    tune(tmp_path, 0.9, ScriptedClockTimer())
    path = tmp_path / "db.json"
    assert main(["db", "show", str(path)]) == 0
    assert capsys.readouterr().out.count(" trials (budget), ") == 2
    doc = json.loads(path.read_text())
    for rec in doc["records"]:
        del rec["completeness"]  # as written before the field existed
    old = tmp_path / "old.json"
    old.write_text(json.dumps(doc))
    assert all(r.completeness is None for r in TuningDB.load(old).records.values())
    doc["records"][0]["completeness"] = "nearly"
    old.write_text(json.dumps(doc))
    with pytest.raises(DatabaseError, match="nearly"):
        TuningDB.load(old)


def test_tune_budget_on_the_command_line_prints_the_plan_and_refuses_bad_durations(tmp_path, capsys, monkeypatch):
    from autonorm import measure
    from autonorm.cli import main

    monkeypatch.setattr(measure, "copy_bandwidth", lambda device: 10.0)
    monkeypatch.setattr(planner, "process_age_s", lambda: 5.0)  # this process's age is pytest's, not tune's
    tiny = ["tune", "--ops", "rmsnorm", "--directions", "fwd", "--dtypes", "fp32", "--hidden", "64", "--rows", "8",
            "--trials", "2", "--backends", "torch", "--no-compile-baseline", "--no-progress",
            "--out", str(tmp_path / "db")]
    assert main([*tiny, "--budget", "10m"]) == 0
    out, err = capsys.readouterr()
    assert ("plan: budget 600 s, 5 s spent on start-up and the bandwidth probe, 3 s kept for the end; "
            "1 studies to run") in err
    assert "1 (0 failed) exhaustive" in out  # torch alone: a space of one
    for bad in ("0", "10x", "-5m", "inf"):
        assert main([*tiny, f"--budget={bad}"]) == 2
        assert "is no duration" in capsys.readouterr().err
    assert main([*tiny, "--budget", "10m", "--time-budget", "5"]) == 2
    assert "give it or --time-budget" in capsys.readouterr().err
    monkeypatch.setattr(planner, "process_age_s", lambda: 30.0)  # start-up took the whole budget
    assert main([*tiny, "--out", str(tmp_path / "none"), "--budget", "20s"]) == 1
    err = capsys.readouterr().err
    assert "left out: its seeds and finish need" in err and "Give a larger --budget" in err
    assert not (tmp_path / "none").exists() or not list((tmp_path / "none").glob("*.json"))


def test_the_rank_correlation_script_computes_spearmans_rho_with_ties():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    try:
        from rank_correlation import spearman
    finally:
        sys.path.pop(0)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [9, 7, 5, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(3 ** 0.5 / 2)  # tied ranks are averaged


def test_a_specs_row_count_studies_share_one_search_space(tmp_path, monkeypatch):
    from autonorm.tune import run, study

    built = []

    class CountedSpace(SearchSpace):
        def __init__(self, spec, *args, **kwargs):
            built.append(spec)
            super().__init__(spec, *args, **kwargs)

    monkeypatch.setattr(run, "SearchSpace", CountedSpace)
    monkeypatch.setattr(study, "SearchSpace", CountedSpace)
    options = StudyOptions(trials=4, time_budget=600, compile_workers=1, compile_baseline=False)
    timer, results = ScriptedClockTimer(), []
    tune_grid(SPECS, [ROWS, 4 * ROWS], backends(), torch.device("cpu"), options, db_path=tmp_path / "db.json",
              storage=make_storage(None, tmp_path / "j.journal"), lock_path=None, results=results, copy_gbps=10.0,
              timer=timer, budget_s=60.0, elapsed=lambda: 0.0, costs=COSTS, clock=timer.clock)
    assert len(results) == 4 and all(r.record is not None for r in results)
    assert sorted(s.hidden for s in built) == [s.hidden for s in SPECS]  # each spec's space built once


def test_under_a_budget_the_torch_compile_baseline_is_left_out_unless_asked_and_the_plan_says_so():
    import argparse

    from autonorm.cli import tune as tune_cli
    from autonorm.cli.args import UsageError

    parser = argparse.ArgumentParser()
    tune_cli.add_arguments(parser)

    def baseline(*argv):
        return tune_cli.options_from_args(parser.parse_args(list(argv))).compile_baseline

    assert [baseline("--budget", "8m"), baseline("--budget", "8m", "--compile-baseline")] == [False, True]
    assert [baseline(), baseline("--no-compile-baseline")] == [True, False]  # without --budget: on unless refused
    with pytest.raises(UsageError, match="not both"):
        baseline("--compile-baseline", "--no-compile-baseline")
    # The plan says the baseline is left out and how to ask for it; a plan with it says nothing of the kind.
    plan = planner.split(_plans(), 60.0, 0.0)
    assert planner.format_plan(plan, compile_baseline=False).splitlines()[-1] == planner.BASELINE_LEFT_OUT
    assert "--compile-baseline" in planner.BASELINE_LEFT_OUT
    assert planner.BASELINE_LEFT_OUT not in planner.format_plan(plan)


class SlowFinishTimer(ScriptedClockTimer):
    """A finish that takes three times what the plan expects (a loaded machine, a slow storage)."""

    def interleaved(self, spec, kernels, rows):
        self.now += 2 * COSTS.finish_s
        return super().interleaved(spec, kernels, rows)


def test_a_finish_slower_than_planned_shrinks_the_later_studies_not_the_budget(tmp_path):
    timer = SlowFinishTimer()
    _, results = tune(tmp_path, 1.8, timer)
    assert len(results) == 2 and all(r.record is not None for r in results)
    assert results[0].outside_search_s >= 3 * COSTS.finish_s  # the first study learns it
    assert timer.now <= 1.8  # the last study's share leaves room for a finish as slow as the first one's


def _options_of_each_study(monkeypatch) -> list:
    """The StudyOptions each study of the next `tune` runs with, in run order."""
    from autonorm.tune import run, study

    seen = []

    class Spy(study.StudyRunner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.options)

    monkeypatch.setattr(run, "StudyRunner", Spy)
    return seen


def test_only_the_last_study_the_plan_runs_predicts_its_batches_by_the_slowest(tmp_path, monkeypatch):
    seen = _options_of_each_study(monkeypatch)
    tune(tmp_path, 1.8, ScriptedClockTimer())
    assert [o.ends_run for o in seen] == [False, True]


def test_each_study_times_its_seeds_whatever_its_share(tmp_path, monkeypatch):
    # The plan's floor pays for a study's seeds (every backend's heuristic here); the share pays for the rest.
    seen = _options_of_each_study(monkeypatch)
    tune(tmp_path, 1.8, ScriptedClockTimer())
    assert [o.floor_trials for o in seen] == [len(backends())] * 2


def test_on_a_cpu_each_study_is_charged_the_runs_seed_sources_spread_over_its_studies(tmp_path, monkeypatch):
    # Each spec's fake heuristic renders its own source and torch compiles nothing: two sources over two studies,
    # one compile each (a compile per seed, torch's too, would be two each), at the plan's figure before the run
    # has waited for a compile, then at the median wait (the fake compiles in a thread at once: next to none).
    seen = _options_of_each_study(monkeypatch)
    costs = planner.Costs({"fake": 0.1, "torch": 0.0}, time_s=SLEEP_S, finish_s=0.2)
    plans = planner.study_plans([(spec, ROWS, f"s{spec.hidden}", SearchSpace(spec, backends()), ["a", "b"])
                                 for spec in SPECS], costs, 40, {})
    tune(tmp_path, 1.8, ScriptedClockTimer(), costs=costs)
    charged = [o.seed_compile_s for o in seen]
    assert charged[0] == pytest.approx(plans[0].compile_s) and 0 <= charged[1] < charged[0] / 2


def _one_source_jobs() -> list:
    """Jobs of SPECS whose fake heuristic renders one source for both (no hidden size, as numba-cpu), with a torch
    seed each, as `tune_grid` plans them."""
    from autonorm.render import Source
    from autonorm.tune.transfer import Seed

    class OneSourceBackend(RowsBackend):
        def render(self, spec, config):
            return Source.of(f"fake {config!r}", "")

    jobs = []
    for spec in SPECS:
        space = SearchSpace(spec, {"fake": OneSourceBackend(), "torch": TorchBackend()})
        jobs.append((spec, ROWS, f"s{spec.hidden}", space,
                     [Seed(Candidate("fake", RowsConfig.heuristic(spec)), "heuristic"),
                      Seed(Candidate("torch", space.configs["torch"][0]), "heuristic")]))
    return jobs


def test_a_source_that_serves_several_studies_is_charged_once_over_the_run():
    from autonorm.tune import run

    costs = planner.Costs({"fake": 1.0, "torch": 0.0}, time_s=SLEEP_S, finish_s=0.2)
    jobs = _one_source_jobs()
    plans = planner.study_plans(jobs, costs, 40, {})
    shared = run.seed_compile_charge(jobs, plans)
    assert shared == pytest.approx(plans[0].compile_s / 2)
    # once the run has waited for seeds, the medians of its waits are the figures, not the plan's: one study of the
    # two compiles the source, the other waits for the checks of a known one
    waits = [(True, 2.0), (True, 9.0), (True, 4.0), (False, 0.5), (False, 1.5), (False, 1.0)]
    assert run.seed_compile_charge(jobs, plans, waits) == pytest.approx((4.0 + 1.0) / 2)
    plans[1].status = "left out"
    assert run.seed_compile_charge(jobs, plans) == pytest.approx(plans[0].compile_s)


def test_a_cpu_plan_counts_a_seed_compile_only_for_a_source_no_earlier_study_compiles():
    costs = planner.Costs({"fake": 1.0, "torch": 0.0}, time_s=SLEEP_S, finish_s=0.2)
    jobs = _one_source_jobs()
    shared = planner.study_plans(jobs, costs, 40, {}, shared_sources=True)
    # the first study compiles the one source, the second none; torch's seed never: timings only besides
    assert [p.seed_compiles for p in shared] == [1, 0]
    assert [p.floor_s for p in shared] == pytest.approx([2 * SLEEP_S + p.compile_s * c + 0.2
                                                         for p, c in zip(shared, (1, 0))])
    each = planner.study_plans(jobs, costs, 40, {})  # a GPU run's plan: a compile per seed
    assert all(p.seed_compiles is None and p.floor_s == pytest.approx(2 * p.candidate_s + 0.2) for p in each)
    # a budget that fits both floors counted once, not both counted per seed
    budget = sum(p.floor_s for p in shared) + 0.01
    assert [p.status for p in planner.split(shared, budget, 0.0).studies] == ["run", "run"]
    assert "left out" in [p.status for p in planner.split(each, budget, 0.0).studies]
