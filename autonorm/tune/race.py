"""Racing: how many repetitions a candidate gets, decided by how it compares with the best one so far.

A fixed protocol times every candidate for the same window, though most of a space is
clearly slower than the incumbent after a handful of calls. The race:

1. A candidate with no incumbent to race (the study's first) is the reference: timed in full,
   the timer's own repetition count (`TimingRun.cap`, sized by time in its warm-up).
2. Any other gets a first look of `first_reps`. If its p20 is above the incumbent's p80 by
   more than `margin`, it is a clear loser: recorded with those few repetitions, never extended.
3. A contender is extended, doubling its repetitions, until its p20-p80 interval and the
   incumbent's separate with it slower ("slower"), it reaches the cap, or the study's time is
   up ("budget"). One that beats the incumbent is timed to the cap whatever its interval:
   it becomes the reference the next candidates race against. At the cap, the verdict says
   whether its interval ended below the incumbent's ("faster") or overlapping it ("tied").

Nothing else of the protocol changes: each sample is the timer's (L2 flush or input
rotation), the finalists are still re-timed interleaved (finalize.py) and that re-timing
still passes the noise gate (quality.py). The race is deterministic given the samples, so a
scripted timer tests it. A timer without `start` (a replay table, a test's fake) is timed
with its `measure`, verdict "fixed".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import TuneOptionError
from ..measure import Timing

FIRST_REPS = 5  # the first look: enough for a p20 and a p80 that one stray sample does not set
# A first look's p20 this far above the incumbent's p80 is a loser whatever more samples show; closer
# ones are contenders. 5% is about the run-to-run spread of a norm kernel on a quiet CPU or GPU.
MARGIN = 0.05


@dataclass(frozen=True)
class RacePolicy:
    first_reps: int = FIRST_REPS
    margin: float = MARGIN
    max_reps: int | None = None  # a cap below the timer's own count (None: the timer's)

    def __post_init__(self):
        if not (isinstance(self.first_reps, int) and self.first_reps >= 1):
            raise TuneOptionError(f"race first_reps={self.first_reps!r}: must be a whole number >= 1")
        if not (isinstance(self.margin, (int, float)) and self.margin >= 0):
            raise TuneOptionError(f"race margin={self.margin!r}: must be a fraction >= 0")
        if self.max_reps is not None and not (isinstance(self.max_reps, int) and self.max_reps >= 1):
            raise TuneOptionError(f"race max_reps={self.max_reps!r}: must be a whole number >= 1, or None")


@dataclass(frozen=True)
class RaceResult:
    timing: Timing
    verdict: str  # reference, dropped, slower, faster, tied, budget or fixed (module docstring)

    def to_json(self) -> dict:
        """The trial's `race` attribute."""
        return {"reps": self.timing.reps, "verdict": self.verdict}


def _slower(t: Timing, incumbent: Timing) -> bool:
    return t.p20_us > incumbent.p80_us


def _faster(t: Timing, incumbent: Timing) -> bool:
    return t.p80_us < incumbent.p20_us


def race(run, incumbent: Timing | None, policy: RacePolicy = RacePolicy(),
         out_of_time: Callable[[], bool] = lambda: False) -> RaceResult:
    """Time the warmed-up kernel of `run` (a measure.TimingRun) against `incumbent`, the best timing so far."""
    cap = max(1, min(run.cap, policy.max_reps or run.cap))
    if incumbent is None:
        return RaceResult(run.extend(cap), "reference")
    t = run.extend(min(policy.first_reps, cap))
    if t.p20_us > incumbent.p80_us * (1 + policy.margin):
        return RaceResult(t, "dropped")
    extended = False
    while t.reps < cap:
        # Separation counts only after an extension: a first look inside the margin is a contender.
        if extended and _slower(t, incumbent):
            return RaceResult(t, "slower")
        if out_of_time():
            return RaceResult(t, "budget")
        t = run.extend(min(t.reps, cap - t.reps))
        extended = True
    return RaceResult(t, "faster" if _faster(t, incumbent) else "slower" if _slower(t, incumbent) else "tied")


class Racer:
    """Races each candidate of a study against the study's best so far on one timer."""

    def __init__(self, timer, policy: RacePolicy = RacePolicy(), out_of_time: Callable[[], bool] = lambda: False):
        self.timer, self.policy, self.out_of_time = timer, policy, out_of_time

    def time(self, spec, kernel, rows: int, incumbent: Timing | None) -> RaceResult:
        if not hasattr(self.timer, "start"):
            return RaceResult(self.timer.measure(spec, kernel, rows), "fixed")
        return race(self.timer.start(spec, kernel, rows), incumbent, self.policy, self.out_of_time)
