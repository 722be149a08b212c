"""How a study searches and records: one frozen object, built once per run and passed to every study.

`autonorm tune` builds it from its command line, the dispatcher's tune-on-miss and
the GPU session from `StudyOptions.quick()`; a grid planned with `--budget` gives
each study its share with `dataclasses.replace(options, time_budget=share)`. The
defaults live here and nowhere else. Plain data: no torch, no Optuna, so that
`autonorm tune --help` can state them.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable

from ..errors import TuneOptionError
from .presets import DEFAULTS, QUICK

WINDOWS = ("full", "short")  # the names of measure.CUDA_WINDOWS (this module imports no torch)


def default_compile_workers() -> int:
    """Workers compiling candidates ahead of the (serial) timer: up to 4, never more than the cores."""
    return min(4, os.cpu_count() or 1)


@dataclass(frozen=True)
class StudyOptions:
    """What every study of a run shares; each field is checked when the object is made."""

    trials: int = DEFAULTS["trials"]  # distinct candidates evaluated per study (a space this small is exhaustive)
    time_budget: float = DEFAULTS["time_budget"]  # seconds one study may search (its finish comes on top)
    patience: int | None = None  # TPE trials without a 0.5% gain that end a study; None: max(10, trials // 3)
    # Candidates evaluated before patience counts; None: the seeds and STARTUP_TRIALS more, and no patience in an
    # exhaustive space. A study seeded from its neighbours' winners sets it to its seeds (`transfer.py`): it
    # stops when they stop improving, whatever its space.
    patience_after: int | None = None
    compile_workers: int = field(default_factory=default_compile_workers)
    finalists: int = 3  # the best candidates re-timed, interleaved with the torch baselines (finalize.py)
    compile_baseline: bool = True  # time torch.compile beside the finalists (torch eager always is)
    strict: bool = False  # refuse to record a study whose measurements stay noisy (else: flagged low-confidence)
    seed: int = 0  # the sampler's seed
    sampler: Callable | None = None  # seed -> an Optuna sampler; None: the tuner's own (study.make_sampler)
    verify: bool = True  # check each candidate against the reference before timing it; off only for a replay
    race: bool = True  # clear losers get a few repetitions, close ones more (tune/race.py); off: every one the same
    windows: str = "full"  # the timer's warm-up and repetition windows (measure.CUDA_WINDOWS); --budget: "short"
    # The finish re-times only finalists within noise of the winner, and none when the winner is clear
    # (finalize.py); --budget turns it on. Off: every study re-times its finalists with the torch baselines.
    light_finish: bool = False
    # a grid (`tune_grid`) compiles in worker processes that fill the backends' disk caches (tune/compile_pool.py);
    # off, and for a StudyRunner run on its own: threads
    compile_processes: bool = True
    # The last study a --budget run plans: nothing after it can absorb an overrun, so it predicts its next batch
    # by its slowest candidate and the run's slowest compile so far, not their medians (study.py).
    ends_run: bool = False
    # Under --budget on a CPU: what a study's first batch (its seeds) is charged for its wait, whatever the timer
    # waited: the run's expected seeds' waits spread evenly over its studies (`run.seed_compile_charge`). A source's
    # first compile serves every later study that shares it, so the run pays the difference (study.py). None: the
    # wait itself.
    seed_compile_s: float | None = None
    # Under --budget: the study's first candidates that its plan's floor pays for (its seeds). They are timed
    # whatever the share says, stopped only by the run's deadline; an overrun is taken from the later studies
    # (run._share). Cut to its share, a 4096-wide backward whose seeds' checks cost twice the plan's estimate
    # timed two of its three seeds and recorded a launch 1.12x slower than the third.
    floor_trials: int = 0

    def __post_init__(self):
        for name in ("trials", "compile_workers", "finalists"):
            _require(name, getattr(self, name), _is_int(getattr(self, name)) and getattr(self, name) >= 1,
                     "a whole number >= 1")
        _require("patience", self.patience, self.patience is None or (_is_int(self.patience) and self.patience >= 1),
                 "a whole number >= 1, or None for the default")
        _require("patience_after", self.patience_after,
                 self.patience_after is None or (_is_int(self.patience_after) and self.patience_after >= 0),
                 "a whole number >= 0, or None for the default")
        budget = self.time_budget
        _require("time_budget", budget, isinstance(budget, (int, float)) and not isinstance(budget, bool)
                 and not math.isnan(budget) and budget >= 0, "seconds >= 0")
        charge = self.seed_compile_s
        _require("seed_compile_s", charge, charge is None or (isinstance(charge, (int, float))
                 and not isinstance(charge, bool) and not math.isnan(charge) and charge >= 0), "seconds >= 0, or None")
        _require("seed", self.seed, _is_int(self.seed), "a whole number")
        _require("floor_trials", self.floor_trials, _is_int(self.floor_trials) and self.floor_trials >= 0,
                 "a whole number >= 0")
        _require("windows", self.windows, self.windows in WINDOWS, f"one of {', '.join(WINDOWS)}")
        for name in ("compile_baseline", "strict", "verify", "race", "compile_processes", "light_finish", "ends_run"):
            _require(name, getattr(self, name), isinstance(getattr(self, name), bool), "True or False")
        _require("sampler", self.sampler, self.sampler is None or callable(self.sampler),
                 "a function of the seed that returns an Optuna sampler, or None")

    @classmethod
    def quick(cls, **changes) -> StudyOptions:
        """`autonorm tune --quick`'s options: the trial and time budgets of its preset."""
        return cls(**{"trials": QUICK["trials"], "time_budget": QUICK["time_budget"], **changes})


def budgeted(device_type: str) -> dict:
    """What a run under a budget (`autonorm tune --budget`, the GPU session's tune phase) changes in its options:
    the timer's short windows and, on a GPU, the light finish (racing and the interleaved re-check of close
    finalists keep the protocol; docs/benchmarks/gpu-plan.md). Not the light finish on a CPU: its compile workers
    share the cores the kernels are timed on, so a search timing can be off by more than its interval shows (a
    budgeted run recorded numba-cpu's 534 us search timing over torch eager, which re-timed interleaved at 581 us
    against numba-cpu's 883: docs/benchmarks/budget-vs-exhaustive.md)."""
    return {"windows": "short", "light_finish": device_type == "cuda"}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(name: str, value, ok: bool, meaning: str) -> None:
    if not ok:
        error = TuneOptionError(f"tuner option {name}={value!r}: must be {meaning}")
        error.option, error.meaning = name, meaning  # a command line names its own flag for it
        raise error
