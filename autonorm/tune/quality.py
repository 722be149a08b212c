"""Is a study's measurement trustworthy enough to record? The gate the tuner applies before it records a winner.

A loaded or drifting machine shows up in two ways, both seen in practice on a shared
2-core VM (one study's search best was 409 us, its interleaved re-timing ~16 ms, and
a baseline's p20-p80 spanned 906-44,973 us):

- spread: a timing's p80/p20 is wide, so its median means little;
- disagreement: a finalist re-timed (interleaved with the others and the baselines)
  differs from its own search timing by a large factor, so the machine changed between
  the search and the re-timing, and the ranking of the two phases cannot be trusted.

`gate` re-times while either symptom persists (up to `RETRIES` more times) and returns
the last timings with a verdict; the tuner records a noisy result flagged low-confidence
(with the load average) or, with `autonorm tune --strict`, refuses to record it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

# A quiet CPU or GPU times a norm kernel with p80/p20 well under 1.2; 1.5 leaves room for an
# ordinary busy desktop and still catches the bursts that produced the examples above.
SPREAD_LIMIT = 1.5
# Search and re-timing use the same timer on the same inputs, but their protocols differ a little
# (interleaving wakes each kernel once per block), which moves microsecond-sized kernels most. Beyond 2x
# apart, the machine changed between the two (another tenant, clocks, thermal).
AGREEMENT_LIMIT = 2.0
RETRIES = 2  # re-timings after the first; each costs about one interleaved finalist round


def spread(timing) -> float:
    """p80/p20 of a Timing (or its JSON dict): 1.0 is perfectly steady."""
    p20, p80 = (timing["p20_us"], timing["p80_us"]) if isinstance(timing, dict) else (timing.p20_us, timing.p80_us)
    return p80 / p20 if p20 > 0 else float("inf")


def load_average() -> str:
    """The 1/5/15-minute load average and the core count, for warnings (\"unknown\" where the OS has none)."""
    try:
        one, five, fifteen = os.getloadavg()
    except (AttributeError, OSError):
        return "load average unknown"
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} cores"


@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)
    worst_spread: float = 1.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self, most: int = 3) -> str:
        """The first `most` problems, and how many more (the record keeps them all)."""
        more = len(self.problems) - most
        return "; ".join(self.problems[:most]) + (f"; and {more} more" if more > 0 else "")


def judge(names: Sequence[str], retimed: Sequence, search: Sequence[dict | None], *,
          spread_limit: float = SPREAD_LIMIT, agreement_limit: float = AGREEMENT_LIMIT) -> Verdict:
    """Problems of one re-timing: `retimed[i]` is candidate `names[i]`'s Timing, `search[i]` its search timing
    (a JSON dict) or None when it had none (the torch.compile baseline)."""
    verdict = Verdict(worst_spread=max((spread(t) for t in retimed), default=1.0))
    for name, timing, before in zip(names, retimed, search):
        s = spread(timing)
        if s > spread_limit:
            verdict.problems.append(f"{name} spread p80/p20 {s:.2f} > {spread_limit}")
        if before is not None and before["median_us"] > 0 and timing.median_us > 0:
            ratio = timing.median_us / before["median_us"]
            if not 1 / agreement_limit <= ratio <= agreement_limit:
                verdict.problems.append(f"{name} re-timed at {timing.median_us:.1f} us vs {before['median_us']:.1f} us "
                                        f"in the search (x{ratio:.2f})")
    return verdict


@dataclass
class Outcome:
    timings: list
    verdict: Verdict
    attempts: int

    def to_json(self) -> dict:
        """The record's `quality` field."""
        doc = {"confidence": "high" if self.verdict.ok else "low",
               "spread": round(min(self.verdict.worst_spread, 1e6), 3), "attempts": self.attempts}
        if not self.verdict.ok:
            doc["problems"] = self.verdict.problems
            doc["load"] = load_average()
        return doc


def gate(retime: Callable[[], list], names: Sequence[str], search: Sequence[dict | None], *,
         retries: int = RETRIES, **limits) -> Outcome:
    """Time with `retime()`, again while the verdict finds problems (at most `retries` more times)."""
    timings = retime()
    verdict = judge(names, timings, search, **limits)
    attempts = 1
    while not verdict.ok and attempts <= retries:
        timings = retime()
        verdict = judge(names, timings, search, **limits)
        attempts += 1
    return Outcome(timings, verdict, attempts)
