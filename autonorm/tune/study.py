"""One study: search one spec's kernel space with Optuna, then record its winner.

One Optuna study per (device slug, op, direction, x dtype, w dtype, features,
hidden, rows bucket). The space is the union of the candidate backends' valid
configs (`Backend.space(spec)`, pruned by validity before anything is sampled);
torch eager is one of the candidates, so a winner is never slower than torch.

Parameters (`space.py`): `backend` is a categorical; each knob of a backend that
takes more than one value in the valid space is an ordinal parameter named
`<backend>.<knob>`: an integer index into that knob's valid values in their
declared order, so that TPE can learn "larger is better". A sampled combination
that is not in the valid space (knobs are sampled independently) is snapped to the
nearest valid config (the fewest index steps). Outside that boundary a candidate
is known by its `Candidate.key` alone, and a config is timed at most once per study.

How it searches is one frozen `StudyOptions` (`options.py`). Seeds first: each
backend's heuristic config, the database's earlier winner and, with `--budget`, the
first of `rank.first_to_time`'s order. A space no larger than the trial budget is searched
exhaustively (every config enqueued); a larger one by TPE after the seeds. A study
stops on its trial budget, its time budget, or `patience` trials without a 0.5%
gain, counted only after the seeds and STARTUP_TRIALS more candidates: TPE samples
at random until then, and patience counted over that phase could end a study
before TPE had a model. A study seeded from its neighbours' winners (`transfer.py`,
`StudyOptions.patience_after`) counts from the end of its seeds, exhaustive or not.

Every candidate is compiled ahead of the timer, a batch at a time (`compile_pool.py`:
worker processes filling the compilers' disk caches where a backend has one, else
threads), verified against the reference, then timed serially and raced against the
best so far (`race.py`: a clear loser stops after a first look, close ones are timed
until they separate; the trial's `race` attribute says how many repetitions it got);
a failing or wrong candidate is recorded in the study as FAIL with its reason and
never reaches the database.
`finalize.py` re-times the best few with the torch baselines and records the winner.

Resume and workers: the study lives in Optuna storage (`trials.py` reads and
closes its trials; `fleet.py` holds the storage, the claim lock and heartbeats;
docs/fleet.md). A restart never re-times a completed trial; a RUNNING trial left
by a killed worker is failed and its candidate re-queued.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
import time
import warnings
from pathlib import Path

import torch

from ..errors import AutonormError
from ..measure import Timing
from ..spec import NormSpec, rows_bucket
from ..verify import check_candidate, draw_cases
from . import finalize, fleet, rank, trials
from .compile_pool import CompilePool
from .finalize import StudyResult
from .options import StudyOptions
from .race import Racer
from .space import Candidate, SearchSpace
from .trials import STARTUP_TRIALS, StudyState

log = logging.getLogger("autonorm.tune")

MAX_TRIALS_FACTOR = 4  # Optuna trials (duplicates included) per unit of trial budget
IMPROVEMENT = 0.005  # a gain below 0.5% is within run-to-run noise and does not reset patience


def study_name(device_slug: str, spec: NormSpec, rows: int, backends: dict) -> str:
    # The backends' template hashes are part of the name: results for other kernels are another study.
    tag = hashlib.sha256(json.dumps(sorted((n, b.template_hash()) for n, b in backends.items())).encode())
    return (f"{device_slug}/{spec.op}/{spec.direction}/{spec.x_dtype}/{spec.w_dtype}/{spec.features}/"
            f"N{spec.hidden}/R{rows_bucket(rows)}/{tag.hexdigest()[:8]}")


class StudyRunner:
    """Runs (or resumes) the study of one spec. `options` says how it searches; the rest is this study's
    own: its spec, rows and backends, the timer and device, where it is stored (`storage`, `name`, and
    `lock_path` beside a journal file), its seeds, the device's copy bandwidth (for a record's %copy),
    `study_attrs` (device, versions, protocol: kept in the study, `fleet.describe_study`), a tqdm-like
    `progress` bar or None, `clock`, the seconds its time budget counts in (tests script it),
    `seed_sources`, where each seed came from (`transfer.provenance`), kept in the study as `seed_sources`, and
    `deadline`, when the whole run must end on `clock` (`--budget`; the finish's rounds respect it)."""

    def __init__(self, spec: NormSpec, rows: int, backends: dict, timer, options: StudyOptions | None = None, *,
                 storage, name: str, device="cpu", seeds: list[Candidate] = (), copy_gbps: float | None = None,
                 lock_path: Path | None = None, study_attrs: dict | None = None, progress=None,
                 compile_pool: CompilePool | None = None, space: SearchSpace | None = None,
                 clock=time.monotonic, seed_sources: list | None = None, deadline: float | None = None):
        self.spec, self.rows, self.backends, self.timer = spec, rows, backends, timer
        self.options = options if options is not None else StudyOptions()
        self.device = torch.device(device)
        self.storage, self.name, self.lock_path = storage, name, lock_path
        self.seeds, self.copy_gbps, self.study_attrs = list(seeds), copy_gbps, study_attrs
        self.progress, self.clock = progress, clock
        self.deadline = deadline  # on `clock`, when the whole run must end (`--budget`): the finish's rounds stop
        self.space = space if space is not None else SearchSpace(spec, backends, self.device)  # a grid's: one a spec
        n_trials = self.options.trials
        self.exhaustive = len(self.space) <= n_trials
        transferred = self.options.patience_after is not None  # patience even in an exhaustive space
        self.patience = (None if self.exhaustive and not transferred
                         else self.options.patience or max(10, n_trials // 3))
        self.patience_after = self.options.patience_after if transferred else len(self.seeds) + STARTUP_TRIALS
        self.seed_sources = seed_sources  # [{"candidate": key, "source": where it came from}] (`transfer.py`)
        self._beats = fleet.Heartbeats(None)
        self.compile_pool = compile_pool  # a grid's pool, shared by its studies (None: the study makes its own)
        self._pool = compile_pool  # the pool the search compiles in (`_search`)
        self.timing_s = 0.0  # seconds inside the timer, search and finish (`timed`)
        self._compile_s: dict = {}  # backend -> seconds compiling this study's candidates

    # -- what finalize.py and the loop share --
    def claim(self):
        """The study's critical section (`fleet.claim_lock`): one worker at a time claims or finalizes."""
        return fleet.claim_lock(self.storage, self.name, self.lock_path)

    def time_left(self) -> float:
        """Seconds to the run's deadline (infinite without one)."""
        return math.inf if self.deadline is None else self.deadline - self.clock()

    def state(self, study) -> StudyState:
        """What the study's storage holds now, by candidate key."""
        return trials.read_state(study, self.space)

    def _study(self):
        sampler = (self.options.sampler or trials.make_sampler)(self.options.seed)
        study = trials.open_study(self.storage, self.name, sampler)
        if self.study_attrs is not None:
            fleet.describe_study(study, self.spec, self.rows, **self.study_attrs)
        if self.seed_sources is not None:
            study.set_user_attr("seed_sources", self.seed_sources)  # this run's seeds (a resume may add some)
        return study

    def run(self) -> StudyResult:
        if not len(self.space):
            raise AutonormError(f"no backend has a valid config for {self.spec.short()}")
        started = self.clock()
        study = self._study()
        with self.claim():
            self._prepare(study)
        with fleet.Heartbeats(self.storage) as self._beats:
            search_started = self.clock()
            stopped_by = self._search(study)
            search_s = self.clock() - search_started
            with self.claim():
                if self.state(study).done >= self.options.trials:  # else the same command resumes and pops them
                    trials.close_waiting(study)
            result = finalize.finish(self, study)
        result.compile_s, result.timing_s, result.wall_s = self._compile_s, self.timing_s, self.clock() - started
        result.outside_search_s = result.wall_s - search_s
        state = self.state(study)
        result.completeness = "exhaustive" if state.done >= len(self.space) else stopped_by
        study.set_user_attr("completeness", result.completeness)  # a rerun leaves a complete study alone
        if result.record is not None and result.record.completeness != result.completeness:
            result.record.completeness = result.completeness
            if study.user_attrs.get("record") is not None:
                study.set_user_attr("record", result.record.to_json())
        return result

    def _prepare(self, study) -> None:
        """Fail trials orphaned by dead workers (this host's by PID, any host's by heartbeat) and re-queue
        them, then enqueue the seeds (or the whole space)."""
        fleet.fail_stale_trials(study)
        orphans = [self.space.candidate(params) for params in trials.fail_orphans(study)]
        state = self.state(study)
        # A seed outside today's space (an old database winner, a heuristic invalid for this spec) is dropped.
        # Seeds first, in their order (a ranked order times the best-ranked first), then in an exhaustive
        # study the rest of the space (a candidate already queued is skipped below).
        wanted = [c for c in self.seeds + (self.space.candidates() if self.exhaustive else [])
                  if self.space.named(c.key) is not None]
        skip = state.taken | state.waiting
        for cand in orphans + wanted:
            if cand is not None and cand.key not in skip:
                study.enqueue_trial(self.space.params(cand))
                skip.add(cand.key)

    # -- the loop --
    def timed(self, fn):
        """`fn()`, its seconds counted as timing (the search's and the finish's alike)."""
        started = self.clock()
        try:
            return fn()
        finally:
            self.timing_s += self.clock() - started

    def _search(self, study) -> str:
        """Search until a budget, patience or the space runs out; returns why it stopped: "budget" (trials
        or time), "converged" (patience, or a sampler that keeps proposing evaluated candidates) or
        "exhaustive"."""
        n_trials, time_budget = self.options.trials, self.options.time_budget
        started, best, since_best = self.clock(), float("inf"), 0
        # Each new candidate's seconds (its compile's wait, check and timing): a batch predicted to end past the
        # budget is not begun. The median, not the last batch's wall, predicts it: the first batch also pays the
        # pool's start and its sources' first compiles, and on a CPU most later candidates share a compiled
        # source (rank.compile_key), so the last batch's wall would end the study after one batch.
        spent: list[float] = []
        # A source's first launch in this process (`CompilePool.launched_sources`) predicts no later candidate of it;
        # it stands for the next batch only while no other candidate was timed.
        first_launches: list[float] = []
        # Without a grid's pool, threads: worker processes pay an interpreter start each, worth it once per grid
        # (`tune_grid`), not once per study.
        pool = self.compile_pool or CompilePool(self.backends, self.device, self.options.compile_workers,
                                                processes=False)
        compiled_before = dict(pool.compile_s)
        self._pool = pool  # its workers' reference checks count for this study's (`_check`)
        # A CPU's timer waits for its compiles (`CompilePool.prepare`), and the first study of a numba-cpu source
        # waits for the compile that every later study of it (each hidden size of its dtype) then finds done.
        # Charged at its wait, that starved the first study of each source: in a 149 s budget on 2 cores it timed
        # its 2 seeds while the next study of the source timed 12, and missed a serial backward launch 1.2-1.4x
        # faster. So the seeds' batch is charged the run's figure (`seed_compile_s`, the same for every study) and
        # the run pays the difference: `_share` rescales the later studies by the time left, and the deadline must
        # still fit the next batch. The run's last study, with nothing after it, is charged its waits.
        self._run_compile_s = 0.0  # seconds of this study's wall time the run pays, not its share (may be < 0)
        share_spent = lambda: self.clock() - started - self._run_compile_s  # noqa: E731
        first_batch = True
        self._racer = Racer(self.timer, out_of_time=lambda: share_spent() > time_budget)
        try:
            while True:
                before = self.state(study)
                done = before.done
                # The budget counts distinct candidates evaluated; a sampled duplicate costs no timing,
                # but Optuna trials are capped too so that a converged sampler cannot loop forever.
                if done >= n_trials or self._share_is_spent(pool, before, spent or first_launches, share_spent):
                    return "budget"
                if len(trials.finished(study)) >= MAX_TRIALS_FACTOR * n_trials:
                    return "converged"
                if self.exhaustive and not trials.has_waiting(study):
                    if not trials.others_running(study, self.storage):
                        return "exhaustive"  # every config is measured or failed
                    time.sleep(1.0)  # another worker may die: its trials then return to the queue
                    continue
                if self.patience is not None and since_best >= self.patience:
                    return "converged"
                if done >= len(self.space):
                    return "exhaustive"  # every candidate is evaluated
                batch, state = self._claim_batch(study, done)
                if not batch:
                    continue  # the trial cap above ends this if it keeps happening
                compiled_new = self._compiler(pool, batch, state, seeds_batch=first_batch)
                first_batch = False
                for trial, cand in batch:  # timing stays serial
                    cand_started = self.clock()
                    is_new = cand.key not in state.evaluated
                    compiled = compiled_new(cand) if is_new else None
                    value = self._evaluate(study, trial, cand, state, compiled)
                    if is_new:
                        loads = rank.compile_keys(self.space, [cand]) - pool.launched_sources
                        (first_launches if loads else spent).append(self.clock() - cand_started)
                        pool.launched_sources |= loads
                    if value is not None and value < best * (1 - IMPROVEMENT):
                        best, since_best = value, 0
                    elif is_new and state.done > self.patience_after:
                        since_best += 1
                    if is_new:
                        self._show_progress(best)
        finally:
            if pool is not self.compile_pool:
                pool.close()
            self._compile_s = {name: seconds - compiled_before.get(name, 0.0) for name, seconds
                               in pool.compile_s.items() if seconds > compiled_before.get(name, 0.0)}

    def _show_progress(self, best: float) -> None:
        """One more candidate evaluated, on the progress bar (if any), with the best time so far."""
        if self.progress is not None:
            self.progress.update(1)
            if best < float("inf"):
                self.progress.set_postfix_str(f"best {best:.1f} us")

    def _share_is_spent(self, pool, state: StudyState, spent: list[float], share_spent) -> bool:
        """Whether the next batch, as predicted, would end past the study's share (`share_spent()`: its seconds so
        far, less what the run pays) or past the run's deadline; before `floor_trials` candidates (the seeds the
        plan's floor paid for), past the deadline alone."""
        upcoming = self._next_batch_s(spent, pool.compile_waits if self._needs_compile(pool, state) else [])
        if state.done < self.options.floor_trials:
            return upcoming > self.time_left()
        return share_spent() + upcoming > self.options.time_budget or upcoming > self.time_left()

    def _next_batch_s(self, spent: list[float], compile_waits: list[float] = ()) -> float:
        """A batch's predicted seconds: `compile_workers` candidates at the median of those so far (0: none yet),
        and the median wait for a new source's compile, where `compile_waits` holds any. The run's last study
        (`ends_run`) takes the slowest of each instead: its overrun is the run's."""
        typical = max if self.options.ends_run else statistics.median
        candidates = typical(spent) * self.options.compile_workers if spent else 0.0
        return candidates + (typical(compile_waits) if compile_waits else 0.0)

    def _needs_compile(self, pool, state: StudyState) -> bool:
        """Whether the next batch holds a source not compiled before in this run: known for the study's queued
        candidates (its seeds and ranked ones, in order); past them the sampler's are assumed to."""
        queued = [c for c in self.seeds if c.key not in state.taken][:self.options.compile_workers]
        if len(queued) < self.options.compile_workers:
            return True
        return bool(rank.compile_keys(self.space, queued) - pool.compiled_sources)

    def _compiler(self, pool, batch: list, state: StudyState, seeds_batch: bool = False):
        """Starts compiling the batch's new candidates ahead of the timer; returns the function that waits for
        one's (kernel, failure). On a GPU the audit judges them first (`SearchSpace.unfit`): one it rejects is a
        failure with the audit's reason, never compiled or timed. The wait, when the batch holds a source new to
        the run, goes to the pool's `compile_waits`; the study's first batch (`seeds_batch`) is charged
        `seed_compile_s` for it where that is set (`_search`)."""
        started = self.clock()
        new = [c for _, c in batch if c.key not in state.evaluated]
        unfit = self.space.unfit(new)
        # The study's verification cases are drawn while its seeds compile: its first check (torch's, or a launch
        # variant's of a source a worker checked) would pay for them, and that candidate's seconds would then predict
        # every later batch (1.7-2.2 s, where the others took 0.1-0.5 s, at 4096 columns on two cores).
        draw = seeds_batch and self.options.verify
        pool.prepare(self.spec, self.rows, [c for c in new if c.key not in unfit],
                     meanwhile=(lambda: draw_cases(self.spec, self.rows, self.device)) if draw else None)
        waited = self.clock() - started
        pool.note_batch(rank.compile_keys(self.space, new), waited, seeds=seeds_batch)
        # The run's last study has nothing after it to pay for its wait: it is charged the wait itself.
        if seeds_batch and self.options.seed_compile_s is not None and not self.options.ends_run:
            self._run_compile_s += waited - self.options.seed_compile_s
        return lambda cand: (None, unfit[cand.key]) if cand.key in unfit else pool.compile(self.spec, self.rows, cand)

    def _claim_batch(self, study, done: int) -> tuple[list, StudyState]:
        """Up to `compile_workers` new (trial, candidate) pairs, with the study's state as read under the
        lock. Claiming is atomic across workers: under the lock, re-read what the others have measured or
        are measuring, then ask; a worker that enters after us sees our RUNNING trials and their
        candidates, so no config is timed twice."""
        batch = []
        with self.claim():
            fleet.fail_stale_trials(study)
            state = self.state(study)
            for _ in range(min(self.options.compile_workers, self.options.trials - done)):
                picked = self._ask(study, state.taken | {c.key for _, c in batch}, self._incumbent(state))
                if picked is not None:
                    batch.append(picked)
        return batch, state

    def _ask(self, study, exclude: set, incumbent: Candidate | None = None):
        """A new trial and its candidate. A sampled duplicate is closed as PRUNED and replaced by the nearest
        unevaluated candidate, enqueued so that the trial's params always name exactly the config that is measured."""
        for _ in range(3):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Heartbeat of storage")  # Heartbeats beats for us
                trial = study.ask()
            self._beats.add(fleet.trial_id(trial))
            trial.set_user_attr("worker", fleet.worker_id())
            cand = self.space.suggest(trial)
            trial.set_user_attr("candidate", cand.key)
            if cand.key not in exclude:
                # The knobs by value, one attribute each under its parameter's name (optuna-dashboard
                # shows them as columns): the parameters themselves stay ordinal indices, which TPE
                # searches better than categorical values (docs/fleet.md).
                trial.set_user_attr("backend", cand.backend)
                for knob, value in cand.config.to_dict().items():
                    trial.set_user_attr(f"{cand.backend}.{knob}", value)
                return trial, cand
            trials.close_duplicate(study, trial, self._beats)
            if incumbent is not None and all(Candidate(cand.backend, c).key in exclude
                                             for c in self.space.configs[cand.backend]):
                # TPE keeps proposing a fully evaluated backend (torch: one config) because its few
                # observations weigh little against the many of a big backend; search near the best instead.
                cand = incumbent
            alt = self.space.nearest_new(cand, exclude)
            if alt is None:
                return None
            study.enqueue_trial(self.space.params(alt))
        return None  # other workers took the replacements; the caller asks again

    def _incumbent(self, state: StudyState) -> Candidate | None:
        """The best candidate measured so far (None before any, or one no longer in this space)."""
        if not state.measured:
            return None
        return self.space.named(min(state.measured, key=lambda k: state.measured[k]["median_us"]))

    def _evaluate(self, study, trial, cand: Candidate, state: StudyState, compiled) -> float | None:
        """Verify and time `cand` in `trial` (unless evaluated before), updating `state`; its median or None."""
        from optuna.trial import TrialState

        if cand.key in state.evaluated:  # evaluated before (earlier run, other worker)
            trials.close_duplicate(study, trial, self._beats)
            return state.measured[cand.key]["median_us"] if cand.key in state.measured else None
        kernel, reason = compiled if compiled is not None else (None, "not compiled")
        if reason is None and self.options.verify:
            reason = self._check(kernel, cand)
        if reason is None:
            try:
                raced = self.timed(lambda: self._time(kernel, state))
                timing = raced.timing
            except Exception as exc:
                reason = f"timing failed: {type(exc).__name__}: {exc}"
        if reason is not None:
            log.info("candidate %s failed: %s", cand.short(), reason)
            if trials.close(study, trial, self._beats, {"failed": reason}, state=TrialState.FAIL):
                state.failed[cand.key] = reason
            return None
        if not trials.close(study, trial, self._beats, {"race": raced.to_json(), "timing": timing.to_json()},
                            values=timing.median_us):
            return None
        state.measured[cand.key] = timing.to_json()
        return timing.median_us

    def _check(self, kernel, cand: Candidate) -> str | None:
        """The reference check's verdict on `cand`: the compile worker's where it checked this very config at
        this row count (off the timer's path: on a GPU the worker checks while the timer runs), or on a GPU an
        earlier check of the spec's at the same rows checked (`CompilePool.checked`), else run here and kept."""
        checked, reason = self._pool.checked(self.spec, self.rows, cand) if self._pool else (False, None)
        if checked:
            return reason
        reason = check_candidate(self.spec, kernel, self.rows, self.device)
        if self._pool:
            self._pool.remember(self.spec, self.rows, cand, reason)
        return reason

    def _time(self, kernel, state: StudyState):
        """A verified kernel's timing: raced against the best so far, or (race off) the timer's full count."""
        best = min(state.measured.values(), key=lambda t: t["median_us"], default=None)
        if best is None or not self.options.race:
            return self._racer.time(self.spec, kernel, self.rows, None)
        return self._racer.time(self.spec, kernel, self.rows, Timing(best["median_us"], best["p20_us"],
                                                                     best["p80_us"], 0))
