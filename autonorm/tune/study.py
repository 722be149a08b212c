"""One study: search one spec's kernel space with Optuna, then record its winner.

One Optuna study per (device slug, op, direction, x dtype, w dtype, features,
hidden, rows bucket). The space is the union of the candidate backends' valid
configs (`Backend.space(spec)`, pruned by validity before anything is sampled);
torch eager is one of the candidates, so a winner is never slower than torch.

Parameters: `backend` is a categorical; each knob of a backend that takes more
than one value in the valid space is a categorical named `<backend>.<knob>`
over exactly those values. A sampled combination that is not in the valid space
(knobs are sampled independently) is snapped to the nearest valid config; every
measured config is remembered, so a config is timed at most once per study.

Seeds: each backend's heuristic config and the database's earlier winner are
enqueued first. Small spaces (<= the trial budget) are searched exhaustively by
enqueueing every config; larger ones by TPE after the seeds. A study stops on
its trial budget, its time budget, or `patience` trials without a 0.5% gain,
counted only after the seeds and STARTUP_TRIALS more candidates: TPE samples at
random until then, and patience counted over that phase could end a study before
TPE had a model.

Every candidate is compiled (in a thread pool, a batch at a time), verified
against the reference, then timed serially; a failing or wrong candidate is
recorded in the study as FAIL with its reason and never reaches the database.
The best few are re-timed interleaved together with the torch eager and
torch.compile baselines before the winner is declared (`finalize.py`); `quality.py` checks
that re-timing (spread, agreement with the search) and re-times a noisy study, then
records it flagged low-confidence or, with `strict`, not at all.

Resume: studies live in Optuna storage (by default a journal file in the database
folder's `.autonorm-journal/`, which git ignores). Restarting finds completed trials in the study and never re-times
them; a RUNNING trial left by a killed worker on this host is failed and its
config re-queued. Several workers may share one study: candidates are claimed
under a lock, on a URL storage a dead worker's trials return to the queue by
heartbeat, and one worker finalizes each study (`fleet.py`, docs/fleet.md).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import AutonormError
from ..spec import NormSpec, rows_bucket
from ..verify import check_candidate
from . import finalize, fleet
from .finalize import StudyResult
from .space import Candidate, SearchSpace

log = logging.getLogger("autonorm.tune")

# TPE samples at random until the study holds this many trials (seeds included); patience starts counting
# after the seeds plus this many candidates, so the random phase never ends a study.
STARTUP_TRIALS = 5
MAX_TRIALS_FACTOR = 4  # Optuna trials (duplicates included) per unit of trial budget
IMPROVEMENT = 0.005  # a gain below 0.5% is within run-to-run noise and does not reset patience


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def study_name(device_slug: str, spec: NormSpec, rows: int, backends: dict) -> str:
    # The backends' template hashes are part of the name: results for other kernels are another study.
    tag = hashlib.sha256(json.dumps(sorted((n, b.template_hash()) for n, b in backends.items())).encode())
    return (f"{device_slug}/{spec.op}/{spec.direction}/{spec.x_dtype}/{spec.w_dtype}/{spec.features}/"
            f"N{spec.hidden}/R{rows_bucket(rows)}/{tag.hexdigest()[:8]}")


class StudyRunner:
    """Runs (or resumes) the study of one spec; the timer and backends are injected."""

    def __init__(self, spec: NormSpec, rows: int, backends: dict, timer, device="cpu", *, storage,
                 name: str, n_trials: int = 40, time_budget: float = 300.0, patience: int | None = None,
                 seeds: list[Candidate] = (), compile_workers: int = 2, finalists: int = 3,
                 compile_baseline: bool = True, copy_gbps: float | None = None, lock_path: Path | None = None,
                 seed: int = 0, progress=None, strict: bool = False, study_attrs: dict | None = None,
                 verify=check_candidate, sampler=None, clock=time.monotonic):
        self.spec, self.rows, self.backends, self.timer = spec, rows, backends, timer
        self.verify = verify  # (spec, kernel, rows, device) -> None or why the kernel is wrong
        self.device = torch.device(device)
        self.storage, self.name = storage, name
        self.n_trials, self.time_budget = n_trials, time_budget
        self.space = SearchSpace(spec, backends, self.device)
        self.exhaustive = len(self.space) <= n_trials
        self.patience = None if self.exhaustive else (patience or max(10, n_trials // 3))
        self.seeds, self.compile_workers, self.finalists = list(seeds), compile_workers, finalists
        self.compile_baseline, self.copy_gbps, self.lock_path = compile_baseline, copy_gbps, lock_path
        self.seed, self.progress = seed, progress
        self.sampler = sampler  # seed -> an Optuna sampler; None: the tuner's (below)
        self.strict = strict  # refuse to record a result whose measurements stay noisy (autonorm/tune/quality.py)
        self.study_attrs = study_attrs  # device, versions, protocol: stored in the study (storage.describe_study)
        self._beats = fleet.Heartbeats(None)
        self.clock = clock  # seconds, for time_budget: a planned grid's deadline shares it (tests script it)

    def _study(self):
        import optuna

        # Independent TPE with 5 startup trials: on the three measured numba-cpu tables it needs fewer trials
        # to come within 2% than multivariate, grouped TPE with 10 startup trials, and its 40-trial winners
        # are as good or better (docs/benchmarks/search-efficiency.md). constant_liar keeps workers apart.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # constant_liar
            sampler = (self.sampler(self.seed) if self.sampler else
                       optuna.samplers.TPESampler(seed=self.seed, constant_liar=True, n_startup_trials=STARTUP_TRIALS))
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" INFO in users' logs
        try:
            study = optuna.create_study(storage=self.storage, study_name=self.name, direction="minimize",
                                        sampler=sampler, load_if_exists=True)
        finally:
            optuna.logging.set_verbosity(verbosity)
        if self.study_attrs is not None:
            fleet.describe_study(study, self.spec, self.rows, **self.study_attrs)
        return study

    @staticmethod
    def _finished(study):
        from optuna.trial import TrialState

        return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED))

    def _state(self, study):
        """(measured: key -> timing dict, failed: key -> reason, queued keys) as the storage has them now."""
        from optuna.trial import TrialState

        measured, failed, queued = {}, {}, set()
        for t in study.get_trials(deepcopy=False):
            key = t.user_attrs.get("candidate")
            if t.state == TrialState.COMPLETE and t.user_attrs.get("timing"):
                measured.setdefault(key, t.user_attrs["timing"])
            elif t.state == TrialState.FAIL and "failed" in t.user_attrs:
                failed[key] = t.user_attrs["failed"]
            elif t.state in (TrialState.WAITING, TrialState.RUNNING):
                # A WAITING trial is known by its params (not its candidate: whoever pops it measures it):
                # enqueued ones keep them in system_attrs until popped, re-queued ones (RetryHeartbeatStaleTrialCallback
                # after their worker died) in params.
                queued.add(json.dumps(t.system_attrs.get("fixed_params") or t.params, sort_keys=True)
                           if t.state == TrialState.WAITING else key)
        return measured, failed, queued

    def _prepare(self, study):
        """Fail trials orphaned by dead workers (this host's by PID, any host's by heartbeat), then enqueue
        seeds (or the whole space)."""
        from optuna.trial import TrialState

        fleet.fail_stale_trials(study)
        host = socket.gethostname()
        requeue = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = t.user_attrs.get("worker", "")
            whost, _, pid = worker.rpartition(":")
            if whost == host and pid.isdigit() and not _pid_alive(int(pid)):
                study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                requeue.append(t.params)
        measured, failed, queued = self._state(study)
        # A seed outside today's space (an old database winner, a heuristic invalid for this spec) is dropped.
        # Seeds first, in their order (a ranked order times the best-ranked first), then in an exhaustive
        # study the rest of the space (a candidate already queued is skipped below).
        wanted = [self.space.params(c) for c in self.seeds + (self.space.candidates() if self.exhaustive else [])
                  if c.config in self.space.configs.get(c.backend, ())]
        for params in requeue + wanted:
            cand = self._candidate(params)
            if cand is None or cand.key in measured or cand.key in failed:
                continue
            pkey = json.dumps(self.space.params(cand), sort_keys=True)
            if pkey in queued or cand.key in queued:
                continue
            study.enqueue_trial(self.space.params(cand))
            queued.add(pkey)

    def _candidate(self, params: dict) -> Candidate | None:
        """The candidate a params dict selects (None when it names no backend of this space)."""
        name = params.get("backend")
        if name not in self.space.configs:
            return None
        try:
            wanted = {k: values[params.get(f"{name}.{k}", 0)] for k, values in self.space.knobs[name].items()}
            return Candidate(name, self.space._nearest(name, wanted))
        except (IndexError, TypeError, ValueError):
            return None

    # -- the loop --
    def _compile(self, cand: Candidate):
        try:
            return self.backends[cand.backend].compile(self.spec, cand.config, self.device), None
        except Exception as exc:  # a config that does not compile is a failed candidate
            return None, f"compile failed: {type(exc).__name__}: {exc}"

    def run(self) -> StudyResult:
        if not len(self.space):
            raise AutonormError(f"no backend has a valid config for {self.spec.short()}")
        study = self._study()
        with self._claim():
            self._prepare(study)
        with fleet.Heartbeats(self.storage) as self._beats:
            stopped_by = self._search(study)
            with self._claim():
                self._close_unused(study)
            result = finalize.finish(self, study)
        measured, failed, _ = self._state(study)
        result.completeness = "exhaustive" if len(measured) + len(failed) >= len(self.space) else stopped_by
        study.set_user_attr("completeness", result.completeness)  # a rerun leaves a complete study alone
        if result.record is not None and result.record.completeness != result.completeness:
            result.record.completeness = result.completeness
            if study.user_attrs.get("record") is not None:
                study.set_user_attr("record", result.record.to_json())
        return result

    def _claim(self):
        return fleet.claim_lock(self.storage, self.name, self.lock_path)

    def _search(self, study) -> str:
        """Search until a budget, patience or the space runs out; returns why it stopped: "budget" (trials
        or time), "converged" (patience, or a sampler that keeps proposing evaluated candidates) or
        "exhaustive"."""
        import optuna

        started, best, since_best = self.clock(), float("inf"), 0
        batch_s = 0.0  # the last batch's compile and timing: a batch that would end past the budget is not begun
        pool = ThreadPoolExecutor(max_workers=max(1, self.compile_workers))
        try:
            while True:
                measured, failed, queued = self._state(study)
                # The budget counts distinct candidates evaluated; a sampled duplicate costs no timing,
                # but Optuna trials are capped too so that a converged sampler cannot loop forever.
                done = len(measured) + len(failed)
                if done >= self.n_trials or self.clock() - started + batch_s > self.time_budget:
                    return "budget"
                if len(self._finished(study)) >= MAX_TRIALS_FACTOR * self.n_trials:
                    return "converged"
                if self.exhaustive and not any(t.state == optuna.trial.TrialState.WAITING
                                               for t in study.get_trials(deepcopy=False)):
                    if not self._others_running(study):
                        return "exhaustive"  # every config is measured or failed
                    time.sleep(1.0)  # another worker may die: its trials then return to the queue
                    continue
                if self.patience is not None and since_best >= self.patience:
                    return "converged"
                if done >= len(self.space):
                    return "exhaustive"  # every candidate is evaluated
                batch, measured, failed = self._claim_batch(study, done)
                if not batch:
                    continue  # the trial cap above ends this if it keeps happening
                batch_started = self.clock()
                fresh = [c for _, c in batch if c.key not in measured and c.key not in failed]
                kernels = dict(zip([c.key for c in fresh], pool.map(self._compile, fresh)))
                for trial, cand in batch:  # timing stays serial
                    is_new = cand.key not in measured and cand.key not in failed
                    value = self._evaluate(study, trial, cand, measured, failed, kernels.get(cand.key))
                    if value is not None and value < best * (1 - IMPROVEMENT):
                        best, since_best = value, 0
                    elif is_new and len(measured) + len(failed) > len(self.seeds) + STARTUP_TRIALS:
                        since_best += 1
                    if self.progress is not None and is_new:
                        self.progress.update(1)
                        if best < float("inf"):
                            self.progress.set_postfix_str(f"best {best:.1f} us")
                batch_s = self.clock() - batch_started
        finally:
            pool.shutdown(wait=True)

    def _claim_batch(self, study, done: int):
        """Up to `compile_workers` new (trial, candidate) pairs, with what the storage holds as measured and
        failed. Claiming is atomic across workers: under the lock, re-read what the others have measured or
        are measuring (`queued`), then ask; a worker that enters after us sees our RUNNING trials and their
        candidates, so no config is timed twice."""
        batch = []
        with self._claim():
            fleet.fail_stale_trials(study)
            measured, failed, queued = self._state(study)
            for _ in range(min(self.compile_workers, self.n_trials - done)):
                picked = self._ask(study, set(measured) | set(failed) | queued | {c.key for _, c in batch},
                                   self._incumbent(measured))
                if picked is not None:
                    batch.append(picked)
        return batch, measured, failed

    def _close_unused(self, study) -> None:
        """Close the WAITING trials of a study whose trial budget is spent (PRUNED, marked `unused`): a seed
        never reached, or a dead worker's trial that a heartbeat re-queued after the last candidate was
        claimed. No worker pops them any more, and left WAITING they would stay so for good."""
        from optuna.trial import TrialState

        measured, failed, _ = self._state(study)
        if len(measured) + len(failed) < self.n_trials:
            return  # stopped by time or patience: the same command resumes and pops them
        for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            study._storage.set_trial_user_attr(t._trial_id, "unused", "the trial budget was spent first")
            study._storage.set_trial_state_values(t._trial_id, TrialState.PRUNED)

    def _others_running(self, study) -> bool:
        """Whether other workers hold RUNNING trials that can still end (with heartbeats: not yet stale)."""
        from optuna.trial import TrialState

        if not fleet.heartbeat_enabled(self.storage):
            return False  # no way to tell a dead worker on another host from a slow one
        fleet.fail_stale_trials(study)
        return any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))

    def _ask(self, study, exclude: set, incumbent: Candidate | None = None):
        """A new trial and its candidate. A sampled duplicate is closed as PRUNED and replaced by the nearest
        unevaluated candidate, enqueued so that the trial's params always name exactly the config that is measured."""
        for _ in range(3):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Heartbeat of storage")  # Heartbeats beats for us
                trial = study.ask()
            self._beats.add(trial._trial_id)
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
            self._tell_duplicate(study, trial)
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

    def _incumbent(self, measured: dict) -> Candidate | None:
        """The best candidate measured so far."""
        if not measured:
            return None
        backend, config = json.loads(min(measured, key=lambda k: measured[k]["median_us"]))
        if backend not in self.backends:
            return None
        return Candidate(backend, self.backends[backend].config_cls.from_dict(config))

    def _evaluate(self, study, trial, cand, measured, failed, compiled) -> float | None:
        from optuna.trial import TrialState

        if cand.key in measured or cand.key in failed:  # evaluated before (earlier run, other worker)
            self._tell_duplicate(study, trial)
            return measured[cand.key]["median_us"] if cand.key in measured else None
        kernel, reason = compiled if compiled is not None else (None, "not compiled")
        if reason is None:
            reason = self.verify(self.spec, kernel, self.rows, self.device)
        if reason is None:
            try:
                timing = self.timer.measure(self.spec, kernel, self.rows)
            except Exception as exc:
                reason = f"timing failed: {type(exc).__name__}: {exc}"
        if reason is not None:
            log.info("candidate %s failed: %s", cand.short(), reason)
            if self._close(study, trial, "failed", reason, state=TrialState.FAIL):
                failed[cand.key] = reason
            return None
        if not self._close(study, trial, "timing", timing.to_json(), values=timing.median_us):
            return None
        measured[cand.key] = timing.to_json()
        return timing.median_us

    def _tell_duplicate(self, study, trial) -> None:
        """A trial that drew an evaluated candidate: PRUNED (no timing), so FAIL means a broken candidate."""
        from optuna.trial import TrialState

        self._close(study, trial, "duplicate", True, state=TrialState.PRUNED)

    def _close(self, study, trial, attr: str, value, **tell) -> bool:
        """Set the trial's result attribute and tell Optuna; False when other workers had already failed the
        trial by heartbeat while this one still held it (its beats stopped: a storage outage longer than the
        grace period, a starved process). Its candidate was re-queued then, so this result is dropped, not
        an error that ends the worker."""
        import optuna

        try:
            trial.set_user_attr(attr, value)
            study.tell(trial, skip_if_finished=True, **tell)  # failed in between: Optuna logs it
            return True
        except optuna.exceptions.UpdateFinishedTrialError:
            log.warning("trial %d was failed by heartbeat while this worker still held it; its candidate "
                        "was re-queued and this result is dropped", trial.number)
            return False
        finally:
            self._beats.discard(trial._trial_id)
