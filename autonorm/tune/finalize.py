"""The end of a study: its best candidates re-timed, interleaved with the torch baselines, into a record.

The search ranks candidates by their own timings; before a winner is declared the
best few (and the torch candidate, so that a winner is never slower than torch)
are re-timed together, interleaved with torch eager and torch.compile, so that
drift hits all alike: in rounds that drop the clearly slower ones (tournament.py),
or under --budget on a GPU in one round of the close ones (the light finish).
`quality` judges each re-timing (spread, agreement with the search). One worker
per study finalizes it; the others take its record from the study.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .. import measure
from ..db import Entry, Record, RecordKey, now_iso
from ..spec import NormSpec, rows_bucket
from ..verify import check_candidate
from . import fleet, quality, tournament
from .space import Candidate

log = logging.getLogger("autonorm.tune")

# Without --budget, the full finish's first round also takes every candidate whose search median is within
# CONTENDER_WITHIN of the best one's, up to CONTENDERS in all: the search timed them one after another, so its
# order among close ones is partly the machine's drift (on a 2-core VM one launch variant measured 2,041 us in
# one run's search and 2,639 us in the next).
CONTENDERS = 6
CONTENDER_WITHIN = 1.25


@dataclass
class StudyResult:
    spec: NormSpec
    rows: int
    record: Record | None
    trials: int
    measured: int
    failed: dict = field(default_factory=dict)  # candidate key -> reason
    space_size: int = 0
    refused: str | None = None  # why a measured winner was not recorded (noisy, with strict=True)
    finalized_by: str | None = None  # another worker finalizes the study (its record: `autonorm db export`)
    completeness: str | None = None  # how complete the search was: exhaustive, converged or budget
    compile_s: dict = field(default_factory=dict)  # backend -> seconds compiling its candidates (compile_pool.py)
    timing_s: float = 0.0  # seconds the timer ran: the search's candidates and the finish's re-timing
    wall_s: float = 0.0  # the study's seconds from start to record
    outside_search_s: float = 0.0  # of wall_s, what the search's share does not cover: set-up and the finish

    @property
    def timing_share(self) -> float | None:
        """The fraction of the study's wall time spent timing (None for a study taken from the storage)."""
        return self.timing_s / self.wall_s if self.wall_s > 0 else None



def _entry(run, cand: Candidate, timing: measure.Timing) -> Entry:
    gbps = measure.gbps(run.spec, run.rows, timing.median_us)
    pct = 100 * gbps / run.copy_gbps if run.copy_gbps else None
    return Entry(cand.backend, cand.config, timing.median_us, timing.p20_us, timing.p80_us, gbps, pct)

def _baselines(run, need_eager: bool = True) -> dict:
    """Torch eager and torch.compile kernels (verified), timed with the finalists."""
    from ..backends.torch_eager import TorchBackend, compile_target

    eager = TorchBackend().build(None, run.spec, None, run.device)
    kernels = {"torch_eager": eager} if need_eager else {}
    if run.options.compile_baseline:
        try:
            # One graph per study: past Dynamo's recompile limit (8 per code object) a grid's later
            # studies would silently time eager.
            torch._dynamo.reset()
            compiled = torch.compile(compile_target(run.spec), dynamic=False)
            reason = check_candidate(run.spec, compiled, run.rows, run.device, full=False)
            if reason is None:
                compiled(*measure.make_inputs(run.spec, run.rows, run.device).args(run.spec))
                kernels["torch_compile"] = compiled
            else:
                log.warning("torch.compile baseline for %s is wrong (%s); not recorded", run.spec.short(), reason)
        except Exception as exc:
            log.warning("torch.compile baseline for %s failed: %s", run.spec.short(), exc)
    return kernels

def finish(run, study) -> StudyResult:
    """The study's result: the record of its best candidates, re-timed (by one worker per study)."""
    state = run.state(study)
    measured, failed, trials = state.measured, state.failed, state.done  # duplicates cost nothing
    result = StudyResult(run.spec, run.rows, None, trials, len(measured), failed, len(run.space))
    ranked = [(timing["median_us"], run.space.named(key)) for key, timing in measured.items()
              if run.space.named(key) is not None]
    ranked.sort(key=lambda pair: (pair[0], pair[1].key))  # ties by key: the same order in every worker
    if not ranked:
        return result
    # One finalizer per study: the first worker to get here after the search; the others take its record
    # from the study (or, while it is still re-timing, leave it to `autonorm db export`).
    with run.claim():
        role = fleet.finalizer_role(study, fleet.worker_id(), trials)
    if role == "stored":
        result.record = Record.from_json(study.user_attrs["record"], f"study {run.name}")
        return result
    if role != "mine":
        result.finalized_by = role
        return result
    _final_record(run, result, measured, failed, ranked, trials)
    if result.record is not None:
        study.set_user_attr("record", result.record.to_json())
        study.set_user_attr("record_trials", trials)
    return result

def _final_record(run, result: StudyResult, measured, failed, ranked, trials) -> None:
    """The finalists re-timed interleaved with the torch baselines: sets the study's database record
    (or, with `strict`, why noisy measurements were refused). `ranked`: (median, candidate), fastest first."""
    n_finalists = run.options.finalists
    finalists = [c for _, c in ranked[:n_finalists]]
    torch_cand = Candidate("torch", run.space.configs["torch"][0]) if "torch" in run.space.configs else None
    eager_searched = None  # torch eager's search timing, where the light finish keeps it as the baseline
    light = _light(run, torch_cand, measured)
    keep = n_finalists  # the finalists the full finish's first round lets go on
    if light:
        finalists, eager_searched = _close_finalists(finalists, torch_cand, measured)
    else:
        # Under a deadline (--budget) the extra contenders' timings would come out of the later studies' search.
        finalists = _contenders(ranked, n_finalists) if run.deadline is None else finalists
        if torch_cand is not None and torch_cand.key in measured and not any(c.backend == "torch" for c in finalists):
            finalists.append(torch_cand)  # so that the winner is never slower than torch
            keep += 1
    torch_finalist = next((i for i, c in enumerate(finalists) if c.backend == "torch"), None)
    baselines = _baselines(run, need_eager=torch_finalist is None and eager_searched is None)
    search_t = [measured[c.key] for c in finalists]
    names = [c.short() for c in finalists] + list(baselines)
    clear = quality.judge(names, [_timing(t) for t in search_t], [None] * len(names)) if light else None
    if light and len(names) == 1 and clear.ok:
        # A clear winner (the light finish): no other candidate's interval reaches its own, torch eager's
        # search timing included, and its search timing passes the noise gate's spread test; a re-timing
        # would only repeat it.
        outcome, order = quality.Outcome([_timing(search_t[0])], clear, attempts=0), [0]
    else:
        kernels = [run.backends[c.backend].compile(run.spec, c.config, run.device) for c in finalists]
        kernels += list(baselines.values())

        def retime(indices):  # its seconds count as timing (the study's share of wall time spent timing)
            return run.timed(lambda: run.timer.interleaved(run.spec, [kernels[i] for i in indices], run.rows))

        searched = search_t + [None] * len(baselines)
        if light:  # the close finalists only: one round, again while it is noisy
            outcome = quality.gate(lambda: retime(range(len(kernels))), names, searched)
            order = sorted(range(len(finalists)), key=lambda i: outcome.timings[i].median_us)
        else:
            rounds = tournament.run(retime, names, searched, len(finalists), time_left=run.time_left,
                                    keep=keep)
            outcome, order = rounds.outcome, rounds.order
    if not outcome.verdict.ok:
        why = (f"{run.spec.short()} rows={run.rows}: measurements stay noisy after {outcome.attempts} timings "
               f"({outcome.verdict.summary()}); {quality.load_average()}")
        if run.options.strict:
            log.warning("%s; not recorded (--strict)", why)
            result.refused = why
            return
        log.warning("%s; recorded as low-confidence: re-tune on a quieter machine, or use --strict", why)
    timings = outcome.timings
    base_t = dict(zip(baselines, timings[len(finalists):]))
    if torch_finalist is not None:  # the torch candidate is the eager baseline: never time it twice
        base_t["torch_eager"] = timings[torch_finalist]
    elif eager_searched is not None:
        base_t["torch_eager"] = eager_searched
    entries = [_entry(run, finalists[i], timings[i]) for i in order]
    seen = {Candidate(e.backend, e.config).key for e in entries}
    # A few more runners-up, not re-timed: the next of the ranking (after the light finish's fewer
    # finalists, the ones it left out too).
    for _, cand in ranked[:n_finalists + 3]:
        if cand.key not in seen:
            entries.append(_entry(run, cand, _timing(measured[cand.key])))
    winner = entries[0]
    result.record = Record(
        key=RecordKey.of(run.spec, rows_bucket(run.rows)), winner=winner, runners_up=entries[1:],
        baselines={"torch_eager": base_t["torch_eager"].to_json(),
                   "torch_compile": base_t["torch_compile"].to_json() if "torch_compile" in base_t else None},
        template_hash=run.backends[winner.backend].template_hash(), trials=trials,
        failed=len(failed), date=now_iso(), quality=_quality(outcome), profile=_winner_profile(run, winner))


def _quality(outcome: quality.Outcome) -> dict:
    """The record's `quality`; a clear winner of the light finish, judged on its search timing, says it was
    not re-timed instead of counting re-timings (the database schema counts them from 1)."""
    doc = outcome.to_json()
    if outcome.attempts == 0:
        del doc["attempts"]
        doc["retimed"] = False
    return doc


def _contenders(ranked: list, n_finalists: int) -> list:
    """The full finish's first-round finalists: the search's `n_finalists` best, and any more within
    CONTENDER_WITHIN of the best search median, up to CONTENDERS. `ranked`: (median, candidate), fastest first."""
    close = [c for median, c in ranked[:CONTENDERS] if median <= ranked[0][0] * CONTENDER_WITHIN]
    return close if len(close) > n_finalists else [c for _, c in ranked[:n_finalists]]


def _timing(t: dict) -> measure.Timing:
    """A search timing as stored in the study (its repetitions not kept)."""
    return measure.Timing(t["median_us"], t["p20_us"], t["p80_us"], 0)


def _light(run, torch_cand: Candidate | None, measured: dict) -> bool:
    """Whether this study's finish may be the light one: asked for, no torch.compile baseline to time (it has
    no search timing), and torch eager measured in the search (its timing is the eager baseline's)."""
    return (run.options.light_finish and not run.options.compile_baseline
            and torch_cand is not None and torch_cand.key in measured)


def _within_noise(t: dict, best: dict) -> bool:
    """Whether a search timing's p20-p80 interval reaches the best one's: the two are not yet told apart."""
    return t["p20_us"] <= best["p80_us"]


def _close_finalists(finalists: list, torch_cand: Candidate, measured: dict) -> tuple[list, measure.Timing | None]:
    """The light finish's finalists: the winner and those within noise of it (torch eager among them when it
    is, so that the winner is never slower than torch, or when its search timing fails the noise gate's spread
    test, so that the record's baseline is not a noisy one), and torch eager's search timing as the baseline
    when it is not re-timed."""
    best = measured[finalists[0].key]
    close = [c for c in finalists if _within_noise(measured[c.key], best)]
    if any(c.backend == "torch" for c in close):
        return close, None
    eager = measured[torch_cand.key]
    if _within_noise(eager, best) or quality.spread(eager) > quality.SPREAD_LIMIT:
        return close + [torch_cand], None
    return close, _timing(measured[torch_cand.key])


def _winner_profile(run, winner: Entry) -> dict | None:
    """The winner's compiled resources on this GPU, kept in its record (None on a CPU, for a backend
    without a GPU compiler, or without the audit's toolchain)."""
    if run.device.type != "cuda":
        return None
    from ..audit import winner_profile

    try:
        return winner_profile(run.spec, winner.backend, winner.config, run.device)
    except Exception as exc:  # a record without its profile beats no record
        log.warning("no audit profile for the winner of %s: %s", run.spec.short(), exc)
        return None
