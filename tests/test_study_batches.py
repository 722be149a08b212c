"""A budgeted study's batches: the next one is predicted from each candidate's seconds, not the last batch's wall."""
from dataclasses import dataclass
from typing import ClassVar

import pytest
from fakes import TorchBackedFake

from autonorm.config import Config, knob
from autonorm.measure import Timing
from autonorm.spec import NormSpec
from autonorm.tune import StudyOptions, StudyRunner, make_storage

pytest.importorskip("optuna")
SPEC = NormSpec("rmsnorm", "fwd", "float32", "float32", 64)


@dataclass(frozen=True)
class GridConfig(Config):
    backend: ClassVar[str] = "fake"
    a: int = knob((1, 2, 3, 4, 5, 6))
    b: int = knob((1, 2, 3, 4, 5, 6))


class GridBackend(TorchBackedFake):
    config_cls = GridConfig


class FirstIsSlowTimer:
    """The study's first timing costs 1 s of the scripted clock (as a first compile and the pool's start
    would), every later one 0.05 s."""

    def __init__(self):
        self.now, self.count = 0.0, 0

    def clock(self):
        return self.now

    def measure(self, spec, kernel, rows):
        self.now += 1.0 if self.count == 0 else 0.05
        self.count += 1
        config = getattr(kernel, "config", None)
        us = 100.0 if config is None else 10.0 + config.a + config.b
        return Timing(us, us * 0.97, us * 1.03, 10)

    def interleaved(self, spec, kernels, rows):
        return [self.measure(spec, k, rows) for k in kernels]

    def describe(self):
        return {"timer": "scripted"}


def test_one_slow_first_candidate_does_not_end_the_study_after_its_first_batch(tmp_path):
    timer = FirstIsSlowTimer()
    options = StudyOptions(trials=30, time_budget=1.5, compile_workers=4, compile_baseline=False, verify=False,
                           race=False)
    runner = StudyRunner(SPEC, 8, {"fake": GridBackend()}, timer, options,
                         storage=make_storage(None, tmp_path / "j.journal"), name="s", clock=timer.clock)
    result = runner.run()
    # batch 1 (4 candidates) ends at 1.15 s; the median candidate, 0.05 s, predicts 0.2 s for the next
    # batch, so two more batches fit (1.35 s, 1.55 s predicted past 1.5 s after the second)
    assert result.measured == 8
