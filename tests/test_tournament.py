"""The full finish's rounds (autonorm/tune/tournament.py) and its contenders (finalize.py), with scripted re-timings."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import pytest
from fakes import TorchBackedFake

from autonorm.backends.torch_eager import TorchBackend
from autonorm.config import Config, knob
from autonorm.measure import Timing
from autonorm.spec import NormSpec
from autonorm.tune import quality, tournament


class Rounds:
    """Scripted interleaved re-timings: round r gives kernel i the median script[r][i] (p20/p80 +-2%); a kernel
    missing from a round's script keeps its last median. Records each round's order."""

    def __init__(self, script):
        self.script, self.orders = script, []

    def __call__(self, indices):
        row = self.script[min(len(self.orders), len(self.script) - 1)]
        self.orders.append(list(indices))
        return [Timing(row[i], row[i] * 0.98, row[i] * 1.02, 10) for i in indices]


def _run(script, finalists, baselines=1, **kw):
    names = [f"k{i}" for i in range(finalists)] + [f"base{i}" for i in range(baselines)]
    search = [{"median_us": 100.0, "p20_us": 98.0, "p80_us": 102.0}] * finalists + [None] * baselines
    timer = Rounds(script)
    return tournament.run(timer, names, search, finalists, **kw), timer


def test_clear_losers_leave_after_the_first_round_and_close_ones_get_every_round():
    # k0 and k1 within noise of each other every round; k2 clearly slower; the baseline timed once.
    result, timer = _run([[100, 101, 150, 300], [103, 100, 150, 300], [101, 100, 150, 300]], finalists=3)
    assert timer.orders[0] == [0, 1, 2, 3]  # every finalist and the baseline, in the first round
    assert sorted(timer.orders[1]) == [0, 1] and sorted(timer.orders[2]) == [0, 1]  # then the close ones only
    assert len(timer.orders) == tournament.ROUNDS
    assert timer.orders[1] != timer.orders[2]  # the order rotates between rounds
    # ranked by the median of their round medians: k1 (101, 100, 100) before k0 (100, 103, 101), though k0 was
    # the faster in the first round
    assert result.order == [1, 0, 2]
    assert result.timings[1].median_us == 100 and result.timings[0].median_us == 101
    assert result.timings[2].median_us == 150 and result.timings[3].median_us == 300
    assert result.outcome.attempts == tournament.ROUNDS and result.outcome.verdict.ok


def test_one_round_does_not_decide_between_close_finalists():
    # k1 looks 3% faster in the first round only; over three rounds k0 is the faster one.
    result, _ = _run([[103, 100, 300], [100, 104, 300], [100, 103, 300]], finalists=2)
    assert result.order == [0, 1]


def test_a_finalist_left_alone_stops_the_rounds():
    result, timer = _run([[100, 200, 300]], finalists=2)
    assert len(timer.orders) == 1 and result.order == [0, 1]


def test_noisy_rounds_go_on_up_to_the_retries_and_keep_the_verdict():
    names, search = ["a", "b"], [None, None]
    calls = []

    def wide(indices):
        calls.append(indices)
        return [Timing(100.0, 40.0, 400.0, 10) for _ in indices]
    result = tournament.run(wide, names, search, finalists=2)
    assert len(calls) == max(tournament.ROUNDS, 1 + quality.RETRIES)  # no more than a single round's gate
    assert not result.outcome.verdict.ok and result.outcome.attempts == len(calls)


@pytest.mark.parametrize("finalists", [1, 4])
def test_every_finalist_and_baseline_gets_a_recorded_timing(finalists):
    row = [100 + 10 * i for i in range(finalists)] + [500]
    result, _ = _run([row], finalists=finalists)
    assert sorted(result.order) == list(range(finalists))
    assert set(result.timings) == set(range(finalists + 1))
    assert [t.median_us for t in result.outcome.timings] == row


def test_a_round_that_would_end_past_the_deadline_is_not_begun():
    clock = {"now": 0.0}
    script = [[100, 101, 300], [101, 100, 300], [100, 101, 300]]

    def retime(indices):  # one second a kernel
        clock["now"] += len(indices)
        return Rounds(script)(indices)
    names, search = ["a", "b", "base"], [None, None, None]
    # round 1 (3 kernels) ends at 3 s; the next round of the 2 close ones would end at 5 s, past 4.5
    result = tournament.run(retime, names, search, 2, time_left=lambda: 4.5 - clock["now"])
    assert clock["now"] == 3 and result.outcome.attempts == 1 and sorted(result.order) == [0, 1]
    unbounded = tournament.run(retime, names, search, 2)
    assert unbounded.outcome.attempts == tournament.ROUNDS


def test_the_first_round_may_hold_more_finalists_than_go_on():
    # Five in the first round, three kept: k3 and k4 are within noise of the best but the slowest of the close
    # ones, so they leave (before k2, which is clearly slower); the three fastest go on together.
    result, timer = _run([[100, 101, 130, 102, 103, 300]] * 3, finalists=5, keep=3)
    assert timer.orders[0] == [0, 1, 2, 3, 4, 5]
    assert sorted(timer.orders[1]) == [0, 1, 3]
    assert result.order == [0, 1, 3, 4, 2]
    assert set(result.timings) == set(range(6))  # every finalist and the baseline still has a timing


# --- the contenders of a study's full finish (finalize.py) ------------------------------------------------
@dataclass(frozen=True)
class _UsConfig(Config):
    backend: ClassVar[str] = "fake"
    us: int = knob((100, 104, 108, 112, 300))  # the config's search median, µs


class _UsBackend(TorchBackedFake):
    config_cls = _UsConfig

    def heuristic(self, spec):
        return _UsConfig(300)


class _DriftTimer:
    """The search saw each config at its `us`; an interleaved re-timing shows the 112 µs one at 80 µs (it was timed
    in a slow minute of the search) and the others as the search saw them; torch eager at 500 µs."""

    def __init__(self):
        self.retimed = []

    def _us(self, kernel, interleaved):
        config = getattr(kernel, "config", None)
        if config is None:
            return 500.0
        return 80.0 if interleaved and config.us == 112 else float(config.us)

    def measure(self, spec, kernel, rows):
        us = self._us(kernel, False)
        return Timing(us, us * 0.99, us * 1.01, 10)

    def interleaved(self, spec, kernels, rows):
        self.retimed.append(sorted(self._us(k, False) for k in kernels))
        return [Timing(self._us(k, True), self._us(k, True) * 0.99, self._us(k, True) * 1.01, 10) for k in kernels]

    def describe(self):
        return {"timer": "drift"}


def test_the_full_finish_retimes_every_close_contender_not_only_the_search_top_three(tmp_path, monkeypatch):
    pytest.importorskip("optuna")
    from autonorm import backends as registry
    from autonorm.tune import StudyOptions, StudyRunner, finalize, make_storage

    monkeypatch.setitem(registry.BACKENDS, "fake", "tests:_UsBackend")
    monkeypatch.setitem(registry._instances, "fake", _UsBackend())
    timer = _DriftTimer()
    options = StudyOptions(trials=10, time_budget=600, compile_workers=1, compile_baseline=False)
    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", 64)
    result = StudyRunner(spec, 16, {"fake": _UsBackend(), "torch": TorchBackend()}, timer, options,
                         storage=make_storage(None, tmp_path / "j.journal"), name="s").run()
    # 100, 104, 108 and 112 are within 1.25x of the best search median, 300 is not; torch eager joins them.
    assert timer.retimed[0] == [100, 104, 108, 112, 500]
    assert result.record.winner.config == _UsConfig(112)  # the fastest when timed side by side
    assert finalize.CONTENDERS >= 4 and 108 <= 100 * finalize.CONTENDER_WITHIN < 300
    # Under --budget's deadline the first round holds the search's three best and torch eager only.
    budgeted = _DriftTimer()
    StudyRunner(spec, 16, {"fake": _UsBackend(), "torch": TorchBackend()}, budgeted, options,
                storage=make_storage(None, tmp_path / "b.journal"), name="b", deadline=time.monotonic() + 600).run()
    assert budgeted.retimed[0] == [100, 104, 108, 500]
