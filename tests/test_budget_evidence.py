"""scripts/budget_evidence.py: the budget-vs-exhaustive evidence run, its report and its load gate.

The two `autonorm tune` runs are replaced by phases that write a database as the tuner would (the
real command runs in the slow test); the re-timing is real where the winners are torch eager."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from autonorm.config import NoConfig
from autonorm.db import Entry, Record, RecordKey, TuningDB, now_iso
from autonorm.measure import CpuTimer
from autonorm.spec import NormSpec

ROOT = Path(__file__).resolve().parent.parent
DEVICE = {"name": "Test CPU", "slug": "test-cpu", "kind": "cpu", "compute_capability": None, "sm_count": 2,
          "l2_bytes": 0, "copy_gbps": 20.0}
VERSIONS = {"autonorm": "0.1.0", "torch": "2.0", "triton": None, "cupy": None, "numba": None, "cuda": None,
            "driver": None}
GRID = {"ops": ["rmsnorm"], "directions": ["fwd"], "dtypes": ["float32"], "hidden": [64, 128], "rows": [8],
        "backends": ["numba-cpu", "torch"]}


@pytest.fixture(scope="module")
def be():
    from fakes import load_script

    return load_script("budget_evidence")


def _record(hidden: int, backend: str, config, us: float, completeness: str) -> Record:
    key = RecordKey.of(NormSpec("rmsnorm", "fwd", "float32", "float32", hidden, **NormSpec.feature_kwargs("weight")), 8)
    entry = Entry(backend, config, us, us * 0.9, us * 1.1, 1.0, None)
    return Record(key, entry, baselines={"torch_eager": entry.to_json(), "torch_compile": None}, template_hash="t1",
                  trials=10,
                  date=now_iso(), completeness=completeness)


class FakePhases:
    """The two tuning runs: each writes its database (winners given per hidden size) and reports a wall time."""

    def __init__(self, exhaustive: dict, budget: dict, walls=(100.0, 18.0)):
        self.winners = {"exhaustive": exhaustive, "budget": budget}
        self.walls = dict(zip(("exhaustive", "budget"), walls))
        self.calls = []

    def __call__(self, folder: Path, flags: list) -> dict:
        self.calls.append((folder.name, flags))
        folder.mkdir(parents=True)
        db = TuningDB(DEVICE, VERSIONS, {"timer": "fake"})
        for hidden, (backend, config, us) in self.winners[folder.name].items():
            db.upsert(_record(hidden, backend, config, us, "exhaustive" if folder.name == "exhaustive" else "budget"))
        if db.records:  # as `autonorm tune`: no database when the budget fitted no study
            db.save(folder / "test-cpu.json")
        return {"command": "autonorm tune " + " ".join(flags), "wall_s": self.walls[folder.name], "exit": 0}


def _watch(be, loads):
    """A LoadWatch reading scripted (load average, others' runnable threads), the last one repeated."""
    readings = iter(loads)
    last = [loads[-1]]

    def read():
        last[0] = next(readings, last[0])
        return last[0]
    ticks = iter(range(0, 10_000, 10))
    return be.LoadWatch(read=read, interval_s=3600, clock=lambda: float(next(ticks)))


def test_a_quiet_run_writes_the_doc_with_both_winners_retimed_interleaved(be, tmp_path):
    torch_winner = ("torch", NoConfig(), 50.0)
    phases = FakePhases({64: torch_winner, 128: torch_winner}, {64: torch_winner, 128: torch_winner})
    retime = functools.partial(be.retime_pair, timer=CpuTimer(warmup_s=0.0, rep_s=0.01, min_reps=3, max_reps=20))
    results = be.evidence(GRID, tmp_path / "work", watch=_watch(be, [(0.4, 0.0)]), run_phase=phases, retime=retime)

    assert [c[0] for c in phases.calls] == ["exhaustive", "budget"]
    exhaustive_flags, budget_flags = phases.calls[0][1], phases.calls[1][1]
    assert exhaustive_flags[exhaustive_flags.index("--trials") + 1] == str(be.EXHAUSTIVE_TRIALS)
    assert budget_flags[budget_flags.index("--budget") + 1] == "20.0s"  # a fifth of the exhaustive 100 s
    assert "--trials" not in budget_flags  # the user's command: default trials
    assert results["wall_ratio"] == pytest.approx(0.18)
    assert results["load"]["valid"] and results["within_2pct"] == 2 and results["studies_compared"] == 2
    for study in results["studies"]:
        assert study["same_config"] and study["retimed_budget_us"] > 0 and study["retimed_best_us"] > 0
    assert json.loads((tmp_path / "work" / "results.json").read_text())["within_2pct"] == 2

    written = be.write(results, tmp_path)
    assert [p.name for p in written] == ["budget-vs-exhaustive.md", "budget-vs-exhaustive.json"]
    doc = written[0].read_text()
    assert "NOT VALID" not in doc and "Within 2% of the exhaustive best: 2 of 2 studies (100%" in doc
    assert "autonorm tune --ops rmsnorm" in doc and "| 100 s | - |" in doc
    assert "| 18 s (18.00% of the exhaustive; budget 20.0 s) | - |" in doc
    assert json.loads(written[1].read_text())["load"]["before"] == 0.4


def test_a_slower_winner_or_a_left_out_study_is_not_within_two_percent(be, tmp_path):
    from autonorm.backends.numba_cpu import NumbaCpuConfig

    best, other = (NumbaCpuConfig(rows_per_task=rpt, vector_width=1, threads=0, fastmath=True) for rpt in (8, 16))
    phases = FakePhases({64: ("numba-cpu", best, 40.0), 128: ("numba-cpu", best, 80.0)},
                        {64: ("numba-cpu", other, 41.0)})  # N=128 left out by the plan
    timed = {other: 105.0, best: 100.0}  # the re-timing: the budget winner is 5% slower

    def retime(spec, rows, budget_entry, best_entry):
        return timed[budget_entry.config], timed[best_entry.config]
    results = be.evidence(GRID, tmp_path / "work", watch=_watch(be, [(0.3, 0.0)]), run_phase=phases, retime=retime)
    by_n = {s["study"].split("N=")[1].split()[0]: s for s in results["studies"]}
    assert by_n["64"]["ratio"] == pytest.approx(1.05) and not by_n["64"]["within"]
    assert by_n["128"]["budget"] is None and not by_n["128"]["within"]
    assert results["within_2pct"] == 0 and results["share_within_2pct"] == 0.0
    doc = be.markdown(results)
    assert "no record (left out by the plan)" in doc and "goals not met" in doc


def test_a_budget_that_fitted_no_study_leaves_every_study_out(be, tmp_path):
    phases = FakePhases({64: ("torch", NoConfig(), 50.0)}, {})
    results = be.evidence(GRID, tmp_path / "work", watch=_watch(be, [(0.3, 0.0)]), run_phase=phases,
                          retime=lambda spec, rows, b, e: (50.0, 50.0))
    assert [s["budget"] for s in results["studies"]] == [None] and results["within_2pct"] == 0


def test_a_loaded_machine_gets_no_doc_or_one_marked_not_valid(be, tmp_path):
    torch_winner = ("torch", NoConfig(), 50.0)
    phases = FakePhases({64: torch_winner}, {64: torch_winner})
    loads = [(0.5, 0.0), (2.8, 2.4), (3.1, 2.6)]  # quiet at the start, then others keep 2.5 threads busy
    results = be.evidence(GRID, tmp_path / "work", watch=_watch(be, loads), run_phase=phases,
                          retime=lambda spec, rows, b, e: (50.0, 50.0))
    assert not results["load"]["valid"]
    assert "other processes kept" in results["load"]["why_not_valid"][0]
    assert be.write(results, tmp_path / "docs") == [] and not (tmp_path / "docs").exists()
    (tmp_path / "docs").mkdir()
    md, _ = be.write(results, tmp_path / "docs", write_invalid=True)
    assert md.read_text().startswith("> **NOT VALID**: other processes kept")
    assert (tmp_path / "work" / "results.json").is_file()  # the measurements are kept either way


def test_the_load_gate_averages_other_processes_over_a_minute_and_checks_the_start(be):
    watch = _watch(be, [(0.2, 0.0)])
    watch.samples = [(t, 0.2 if t == 0 else 2.0, 3.0 if t == 50 else 0.0) for t in range(0, 130, 10)]
    assert watch.others_max() == pytest.approx(0.5)  # one busy sample in each minute holding it: a burst passes
    assert watch.summary()["valid"]
    watch.samples = [(t, load, 2.0 if 40 <= t <= 100 else 0.0) for t, load, _ in watch.samples]
    assert watch.others_max() == pytest.approx(2.0)  # busy for a whole minute
    assert "other processes kept 2.00 threads" in watch.summary()["why_not_valid"][0]
    watch.samples = [(0.0, 1.9, 0.0), (10.0, 2.0, 0.0)]  # a run shorter than a minute: its own mean
    assert watch.others_max() == 0.0 and "at the start" in watch.summary()["why_not_valid"][0]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_the_runs_own_processes_are_its_descendants_grandchildren_included(be, tmp_path):
    import os
    import signal
    import subprocess
    import time

    ready = tmp_path / "grandchild.pid"
    child = subprocess.Popen(["sh", "-c", f"sleep 30 & echo $! > {ready}.tmp; mv {ready}.tmp {ready}; wait"])
    try:
        while not ready.exists():
            time.sleep(0.01)
        grandchild = int(ready.read_text())
        family = be._family(os.getpid())
        assert {os.getpid(), child.pid, grandchild} <= family
        assert os.getppid() not in family
    finally:
        if ready.exists():
            os.kill(int(ready.read_text()), signal.SIGKILL)
        child.kill()
        child.wait()


def test_an_earlier_exhaustive_run_is_reused_only_for_the_same_grid(be, tmp_path):
    torch_winner = ("torch", NoConfig(), 50.0)
    first = FakePhases({64: torch_winner, 128: torch_winner}, {64: torch_winner, 128: torch_winner})
    quick = dict(retime=lambda spec, rows, b, e: (50.0, 50.0))
    be.evidence(GRID, tmp_path / "one", watch=_watch(be, [(0.1, 0.0)]), run_phase=first, **quick)
    again = FakePhases({}, {64: torch_winner, 128: torch_winner}, walls=(0.0, 15.0))
    results = be.evidence(GRID, tmp_path / "two", reuse=tmp_path / "one" / "exhaustive",
                          watch=_watch(be, [(0.1, 0.0)]), run_phase=again, **quick)
    assert [c[0] for c in again.calls] == ["budget"]  # the exhaustive run is not repeated
    assert results["exhaustive"]["reused"] and results["exhaustive"]["wall_s"] == 100.0
    assert "(reused, " in be.markdown(results)
    with pytest.raises(SystemExit, match="tuned another grid"):
        be.evidence({**GRID, "hidden": [64]}, tmp_path / "three", reuse=tmp_path / "one" / "exhaustive",
                    watch=_watch(be, [(0.1, 0.0)]), run_phase=again, **quick)


def test_the_rank_verdict_drops_a_model_no_better_than_the_heuristic_distance(be):
    rc = be.rank_correlation
    rows = [rc.SpecRho("a", 8, 30, 0.5, 0.1), rc.SpecRho("b", 8, 30, 0.4, 0.2), rc.SpecRho("c", 8, 30, -0.1, 0.3)]
    assert rc.verdict(rows).startswith("verdict: keep the cost model")
    assert rc.verdict(rows[1:] + [rc.SpecRho("d", 8, 30, 0.0, 0.2)]).startswith("verdict: drop the cost model")
    assert "higher rho on 1 of 3" in rc.verdict(rows[1:] + [rc.SpecRho("d", 8, 30, 0.0, 0.2)])


@pytest.mark.slow
def test_the_real_commands_tune_twice_and_correlate_from_the_journal(be, tmp_path):
    """Both `autonorm tune` runs for real (torch alone: one candidate per study), then the report."""
    grid = {**GRID, "hidden": [64], "backends": ["torch"]}
    # a budget in seconds: start-up is most of these runs, and a fifth of the exhaustive one would fit no study
    results = be.evidence(grid, tmp_path, watch=be.LoadWatch(limit=1e9), budget_s=300)
    assert results["exhaustive"]["exit"] == 0 and results["budget"]["exit"] == 0
    assert results["exhaustive"]["cpu_s"] > 0 and results["exhaustive"]["wall_s"] > 0
    assert results["studies"][0]["exhaustive"]["completeness"] == "exhaustive"
    assert results["studies"][0]["within"]  # torch eager against itself
    assert results["rank_correlation"][0]["candidates"] == 1


def test_the_rank_correlation_follows_each_measured_candidate_to_its_place_in_the_models_order(be):
    import torch

    from autonorm.backends import get_backend
    from autonorm.tune import SearchSpace, rank

    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", 1024, **NormSpec.feature_kwargs("weight"))
    space = SearchSpace(spec, {"numba-cpu": get_backend("numba-cpu"), "torch": get_backend("torch")},
                        torch.device("cpu"))
    facts = rank.DeviceFacts("cpu", 2, 20.0)
    order = rank.ranked(space, 1024, facts)[::7]  # a sample, timed as the model predicts: rho +1
    as_predicted = {c.key: 10.0 + i for i, c in enumerate(order)}
    row = be.rank_correlation.spec_rho(space, 1024, facts, as_predicted)
    assert row.candidates == len(order) and row.model == pytest.approx(1.0)
    reversed_times = {c.key: 10.0 - i for i, c in enumerate(order)}
    assert be.rank_correlation.spec_rho(space, 1024, facts, reversed_times).model == pytest.approx(-1.0)


class OrderedTimer:
    """A scripted interleaved timer: kernel `k` takes times[k] µs, the one timed first in a round `first_cost`
    times that, and each round's times are multiplied by the next of `bursts` (other load)."""

    def __init__(self, times: dict, first_cost: float, bursts: list):
        self.times, self.first_cost, self.bursts, self.orders = times, first_cost, iter(bursts), []

    def interleaved(self, spec, kernels, rows):
        from autonorm.measure import Timing

        burst = next(self.bursts)
        self.orders.append([k.name for k in kernels])
        medians = [self.times[k.name] * burst * (self.first_cost if i == 0 else 1.0) for i, k in enumerate(kernels)]
        return [Timing(m, m, m, 10) for m in medians]


def test_the_winners_are_retimed_in_both_orders_and_a_burst_of_load_does_not_decide(be, monkeypatch):
    import autonorm.backends as registry

    class Named:
        def __init__(self, config):
            self.name = config

    monkeypatch.setattr(registry, "get_backend", lambda name: type("B", (), {
        "compile": staticmethod(lambda spec, config, device: Named(config))}))
    budget, best = Entry("fake", "budget", 1, 1, 1, 1, None), Entry("fake", "best", 1, 1, 1, 1, None)
    # Equal kernels; going first costs 30%; the second pair's rounds ran under a 5x burst on the budget's side.
    timer = OrderedTimer({"budget": 100.0, "best": 100.0}, first_cost=1.3, bursts=[1, 1, 1, 1, 1, 1])
    b_us, e_us = be.retime_pair(None, 8, budget, best, timer=timer)
    assert timer.orders == [["budget", "best"], ["best", "budget"]] * be.RETIME_PAIRS
    assert b_us / e_us == pytest.approx(1.0)  # one round would say 1.3 (or 1/1.3)

    times = {"budget": 100.0, "best": 100.0}
    skewed = OrderedTimer(times, first_cost=1.0, bursts=[1, 1, 1, 1, 1, 1])
    # A burst of other load while the budget's kernel ran, in one pair only: the median pair is unaffected.
    skewed.interleaved = (lambda orig: lambda spec, kernels, rows: (
        [t if k.name == "best" or len(skewed.orders) not in (3, 4) else type(t)(t.median_us * 5, 0, 0, 1)
         for k, t in zip(kernels, orig(spec, kernels, rows))]))(skewed.interleaved)
    b_us, e_us = be.retime_pair(None, 8, budget, best, timer=skewed)
    assert b_us / e_us == pytest.approx(1.0)


def test_a_budgeted_run_a_fraction_of_a_second_past_a_fifth_does_not_meet_the_time_goal(be, tmp_path):
    # 176.6 s of 881.3 s is 20.04%: rounded to 0.2 before the comparison, it read as met.
    winner = ("torch", NoConfig(), 50.0)
    phases = FakePhases({64: winner, 128: winner}, {64: winner, 128: winner}, walls=(881.3, 176.6))

    def retime(spec, rows, budget_entry, best_entry):
        return 50.0, 50.0
    results = be.evidence(GRID, tmp_path / "work", watch=_watch(be, [(0.3, 0.0)]), run_phase=phases, retime=retime)
    doc = be.markdown(results)
    assert results["within_2pct"] == 2 and "in 20.04% of the exhaustive wall time" in doc and "goals not met" in doc
