"""The full finish's rounds: a study's finalists re-timed interleaved until the close ones have had `ROUNDS` looks.

The search times candidates one after another, so a minute of other load can move a candidate's
timing by half (a 2-core VM measured one launch variant at 743 µs in one run and 1,408 µs in the
next). An interleaved re-timing is fair between the kernels it holds, but one round still leaves a
few percent to chance between launch variants of one kernel. So the finish runs rounds:

1. Every finalist and the torch baselines, interleaved (the baselines' timings are this round's). The first
   round may hold more finalists than carry on (`keep`): those the search could not tell from its best, whose
   order it took minutes apart; one interleaved round reorders them fairly, and only the `keep` fastest of it
   go on (the others leave as below, before the clearly slower ones).
2. A finalist whose p20 is above the round's best one's p80 is clearly slower: it leaves, keeping
   its timing from the round it left. The rest are re-timed together, the order rotated each round
   so that no kernel always runs first after another library's threads.
3. After `ROUNDS` rounds, when one finalist is left, or when the next round would end past the run's
   deadline (`--budget`), the survivors are ranked by the median of
   their round medians, each recorded with the round that gave its median. A finalist left alone
   is re-timed while its round fails the noise gate (`quality.judge`), up to `quality.RETRIES`
   more times, as a single round's gate would; the rounds never exceed that count or `ROUNDS`.

The result is deterministic given the timings, so a scripted timer tests it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from . import quality

ROUNDS = 3  # interleaved rounds a close finalist gets; the first one also times the baselines


@dataclass
class Result:
    order: list          # the finalists' indices, best first: survivors by their median, then the ones that left
    timings: dict        # index -> the Timing recorded for it (finalists and baselines)
    outcome: quality.Outcome  # the last round's verdict and the number of rounds


def _median_round(timings: list):
    """The round whose median is the median of the rounds' (the lower one of an even count)."""
    ranked = sorted(timings, key=lambda t: t.median_us)
    return ranked[(len(ranked) - 1) // 2]


def run(retime: Callable[[list], list], names: Sequence[str], search: Sequence[dict | None], finalists: int,
        rounds: int = ROUNDS, retries: int = quality.RETRIES,
        time_left: Callable[[], float] = lambda: math.inf, keep: int | None = None) -> Result:
    """`retime(indices)` times those kernels interleaved, in that order, and returns their Timings. Indices below
    `finalists` are the finalists, the others the baselines; `names` and `search` (each one's search timing, or
    None) are by index, for the noise gate. `time_left()`: seconds to the run's deadline (`--budget`); a round
    after the first that would end past it is not begun, and the rounds so far decide. `keep`: at most this many
    finalists go on after the first round, its fastest (None: every one not clearly slower)."""
    baselines = list(range(finalists, len(names)))
    alive, left = list(range(finalists)), []  # left: (round it left, index), in the order they left
    looks: dict[int, list] = {i: [] for i in range(len(names))}
    done = 0
    while True:
        timed = alive + (baselines if done == 0 else [])
        shift = done % len(timed)
        timed = timed[shift:] + timed[:shift]
        before = time_left()
        timings = retime(timed)
        per_kernel_s = (before - time_left()) / len(timed)
        done += 1
        for i, t in zip(timed, timings):
            looks[i].append(t)
        verdict = quality.judge([names[i] for i in timed], timings, [search[i] for i in timed])
        best = min(alive, key=lambda i: looks[i][-1].median_us)
        slower = [i for i in alive if looks[i][-1].p20_us > looks[best][-1].p80_us]
        close = sorted((i for i in alive if i not in slower), key=lambda i: looks[i][-1].median_us)
        cut = close[keep:] if done == 1 and keep is not None else []
        left += [(done, i) for i in cut + sorted(slower, key=lambda i: looks[i][-1].median_us)]
        alive = [i for i in alive if i not in slower and i not in cut]
        needed = 1 if len(alive) == 1 else rounds  # a finalist left alone needs no more looks
        # Noise is retried within the same number of rounds a single round's gate would take (1 + retries): on a
        # machine whose noise persists (9 of 16 studies of a quiet 2-core run did), more rounds only spend the
        # later studies' time.
        if (done >= needed and verdict.ok) or done >= max(rounds, 1 + retries):
            break
        if time_left() < per_kernel_s * len(alive):  # the budget says stop
            break
    recorded = {i: _median_round(looks[i]) for i in alive}
    recorded.update({i: looks[i][-1] for _, i in left})
    recorded.update({i: looks[i][0] for i in baselines})
    order = sorted(alive, key=lambda i: recorded[i].median_us) + [i for _, i in sorted(left, key=lambda p: -p[0])]
    return Result(order, recorded, quality.Outcome([recorded[i] for i in range(len(names))], verdict, done))
