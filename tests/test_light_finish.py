"""`autonorm tune --budget`'s lighter study: the timer's short windows and the light finish.

The light finish re-times, interleaved, only the finalists whose search interval reaches the winner's
(torch eager among them when it does); a clear winner whose search timing passes the noise gate is
recorded from its search timing, with torch eager's search timing as the baseline. A scripted timer
gives each config a known interval, so which finish runs is exact.
"""
import functools
from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from fakes import FakeBackendBase

from autonorm import measure
from autonorm.backends.torch_eager import TorchBackend
from autonorm.cli import tune as tune_cli
from autonorm.config import Config, knob
from autonorm.errors import TuneOptionError
from autonorm.measure import Timing
from autonorm.spec import NormSpec
from autonorm.tune import StudyOptions, StudyRunner, make_storage, tune_grid
from autonorm.tune import plan as planner
from autonorm.tune.options import WINDOWS

pytest.importorskip("optuna")

SPEC = NormSpec("rmsnorm", "fwd", "float32", "float32", 64)


@dataclass(frozen=True)
class UsConfig(Config):
    backend: ClassVar[str] = "fake"
    us: int = knob((10, 11, 30))  # the config's search median, µs


class UsBackend(FakeBackendBase):
    config_cls = UsConfig

    def heuristic(self, spec):
        return UsConfig(30)

    def build(self, source, spec, config, device):
        kernel = functools.partial(TorchBackend().build(None, spec, None, device))
        kernel.config = config  # the timer's script reads it
        return kernel


class IntervalTimer:
    """Search timings of median `us` (config knob; torch eager: `torch_us`) and p20-p80 of +-`width`; records
    each interleaved re-timing's kernels."""

    def __init__(self, torch_us=50.0, width=0.03, torch_width=None):
        self.torch_us, self.width, self.retimed = torch_us, width, []
        self.torch_width = width if torch_width is None else torch_width

    def _us(self, kernel):
        config = getattr(kernel, "config", None)
        return self.torch_us if config is None else float(config.us)

    def measure(self, spec, kernel, rows):
        us = self._us(kernel)
        width = self.width if getattr(kernel, "config", None) is not None else self.torch_width
        return Timing(us, us * (1 - width), us * (1 + width), 10)

    def interleaved(self, spec, kernels, rows):
        self.retimed.append(sorted(self._us(k) for k in kernels))
        return [Timing(self._us(k), self._us(k) * 0.99, self._us(k) * 1.01, 10) for k in kernels]

    def describe(self):
        return {"timer": "interval"}


def study(tmp_path, timer, light=True):
    options = StudyOptions(trials=10, time_budget=600, compile_workers=1, compile_baseline=False,
                           light_finish=light)
    return StudyRunner(SPEC, 16, {"fake": UsBackend(), "torch": TorchBackend()}, timer, options,
                       storage=make_storage(None, tmp_path / "j.journal"), name="s", copy_gbps=10.0).run()


def test_a_clear_winner_is_recorded_from_the_search_without_a_retiming(tmp_path):
    # 10 us +-1% is clear of 11 us +-1%, 30 us and torch's 50 us
    timer = IntervalTimer(width=0.01)
    record = study(tmp_path, timer).record
    assert timer.retimed == []
    assert record.winner.median_us == 10.0 and record.baselines["torch_eager"]["median_us"] == 50.0
    assert record.quality == {"confidence": "high", "spread": pytest.approx(1.01 / 0.99, abs=1e-3), "retimed": False}
    assert [e.median_us for e in record.runners_up] == [11.0, 30.0, 50.0]


def test_without_the_light_finish_the_finalists_are_always_retimed(tmp_path):
    timer = IntervalTimer(width=0.01)
    study(tmp_path, timer, light=False)
    assert timer.retimed == [[10.0, 11.0, 30.0, 50.0]]  # 3 finalists and torch


def test_finalists_within_noise_are_retimed_interleaved_and_no_others(tmp_path):
    # 10 us +-6% reaches 11 us +-6%: those two are re-timed; 30 us and torch eager keep their search timings
    timer = IntervalTimer(width=0.06)
    record = study(tmp_path, timer).record
    assert timer.retimed == [[10.0, 11.0]]
    assert record.quality["attempts"] == 1 and record.baselines["torch_eager"]["median_us"] == 50.0


def test_torch_eager_within_noise_of_the_winner_is_retimed_with_it(tmp_path):
    timer = IntervalTimer(torch_us=10.1, width=0.01)
    record = study(tmp_path, timer).record
    assert timer.retimed == [[10.0, 10.1]]
    assert record.baselines["torch_eager"]["median_us"] == 10.1


def test_a_noisy_torch_eager_search_timing_is_retimed_not_kept_as_the_baseline(tmp_path):
    # eager at 50 us +-60% (p80/p20 = 4) is far from the winner, but its search timing fails the spread test
    timer = IntervalTimer(width=0.01, torch_width=0.6)
    record = study(tmp_path, timer).record
    assert timer.retimed == [[10.0, 50.0]]
    assert record.baselines["torch_eager"]["p80_us"] == pytest.approx(50.0 * 1.01)  # the re-timing's


def test_a_noisy_clear_winner_still_goes_through_the_noise_gate(tmp_path):
    timer = IntervalTimer(width=0.45)  # p80/p20 = 1.45/0.55 > the gate's 1.5: re-timed, every close one with it
    study(tmp_path, timer)
    assert timer.retimed and timer.retimed[0][0] == 10.0


def test_the_plan_sizes_the_light_finish_as_two_timings_of_the_windows_in_use():
    short = {**measure.CUDA_WINDOWS["short"]}
    full = {**measure.CUDA_WINDOWS["full"]}
    light = planner.Costs.estimate(short, compile_baseline=False, light_finish=True)
    heavy = planner.Costs.estimate(full, compile_baseline=False)
    assert light.time_s == pytest.approx((short["warmup_ms"] + short["rep_ms"]) / 1e3 + planner.VERIFY_S)
    # the finish re-times checked candidates: its timings carry no reference check
    assert light.finish_s == pytest.approx(planner.LIGHT_FINISH_TIMINGS * (light.time_s - planner.VERIFY_S))
    assert heavy.finish_s == pytest.approx(planner.FINISH_TIMINGS * (heavy.time_s - planner.VERIFY_S))
    assert heavy.time_s > light.time_s


def test_budget_picks_the_short_windows_and_on_a_gpu_the_light_finish_on_the_command_line():
    args = SimpleNamespace(trials=None, time_budget=None, patience=None, compile_workers=None, quick=False,
                           compile_baseline=False, no_compile_baseline=False, strict=False, budget=None)
    plain = tune_cli.options_from_args(args)
    budgeted = tune_cli.options_from_args(SimpleNamespace(**{**vars(args), "budget": 480.0}), "cuda")
    on_cpu = tune_cli.options_from_args(SimpleNamespace(**{**vars(args), "budget": 480.0}), "cpu")
    assert (plain.windows, plain.light_finish) == ("full", False)
    assert (budgeted.windows, budgeted.light_finish) == ("short", True)
    # a CPU's compile workers share the timed cores: its finalists are always re-timed interleaved
    assert on_cpu.light_finish is False


def test_the_grid_builds_its_timer_with_the_options_windows(tmp_path, monkeypatch):
    asked = []

    def timer_for(device, windows="full"):
        asked.append(windows)
        return IntervalTimer(width=0.01)
    monkeypatch.setattr(measure, "timer_for", timer_for)
    options = StudyOptions(trials=2, time_budget=60, compile_workers=1, compile_baseline=False, windows="short")
    tune_grid([SPEC], [16], {"torch": TorchBackend()}, torch.device("cpu"), options, db_path=tmp_path / "db.json",
              storage=make_storage(None, tmp_path / "j.journal"), lock_path=None, results=[], copy_gbps=10.0)
    assert asked == ["short"]


def test_unknown_windows_are_refused_by_name():
    with pytest.raises(TuneOptionError, match="windows='tiny'"):
        StudyOptions(windows="tiny")
    with pytest.raises(ValueError, match="timer windows 'tiny'"):
        measure.timer_for("cpu", "tiny")
    assert set(measure.CUDA_WINDOWS) == set(WINDOWS)  # the options' names are the timer's
