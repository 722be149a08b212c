"""`autonorm tune`: search each spec's kernel space with Optuna and record the winners.

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
counted only after the seeds and STARTUP_TRIALS more candidates (counting TPE's
random phase ended studies before TPE had a model: docs/benchmarks/search-efficiency.md).

Every candidate is compiled (in a thread pool, a batch at a time), verified
against the reference, then timed serially; a failing or wrong candidate is
recorded in the study as FAIL with its reason and never reaches the database.
The best few are re-timed interleaved together with the torch eager and
torch.compile baselines before the winner is declared; `autonorm/quality.py` checks
that re-timing (spread, agreement with the search) and re-times a noisy study, then
records it flagged low-confidence or, with `strict`, not at all.

Resume: studies live in Optuna storage (by default a journal file in the database
folder's `.autonorm-journal/`, which git ignores). Restarting finds completed trials in the study and never re-times
them; a RUNNING trial left by a killed worker on this host is failed and its
config re-queued. Several workers may share one study: candidates are claimed
under a lock, on a URL storage a dead worker's trials return to the queue by
heartbeat, and one worker finalizes each study (autonorm/storage.py, docs/fleet.md).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import measure, quality
from . import storage as fleet
from .config import Config
from .db import Entry, Record, RecordKey, TuningDB, now_iso
from .journal import JournalError, prepare_journal
from .device import software_versions
from .errors import AutonormError
from .spec import NormSpec, rows_bucket

log = logging.getLogger("autonorm.tune")


# --quick: five studies that finish in a few minutes on a 2-core CPU (numba-cpu + torch): the forward of
# each op and hidden size, and the backward of the first op at the first hidden size ("quick_backward").
QUICK = {"ops": ["rmsnorm", "layernorm"], "directions": ["fwd"], "dtypes": ["float32"], "hidden": [1024, 4096],
         "rows": [1024], "trials": 12, "time_budget": 45.0, "quick_backward": True}
DEFAULTS = {"ops": ["rmsnorm", "layernorm"], "directions": ["fwd", "bwd"], "dtypes": ["float32", "float16", "bfloat16"],
            "hidden": [768, 1024, 2048, 4096, 5120, 8192], "rows": [1, 64, 1024, 4096, 16384], "trials": 60,
            "time_budget": 300.0}
# Features tuned unless --features says otherwise: what torch.nn.RMSNorm and torch.nn.LayerNorm use by default.
DEFAULT_FEATURES = {"rmsnorm": "weight", "layernorm": "weight+bias"}
LONG_RUN_S = 300  # above this worst case, the run's size and estimate are printed before it starts
# TPE samples at random until the study holds this many trials (seeds included); patience starts counting
# after the seeds plus this many candidates, so the random phase never ends a study.
STARTUP_TRIALS = 5
MAX_TRIALS_FACTOR = 4  # Optuna trials (duplicates included) per unit of trial budget
IMPROVEMENT = 0.005  # a gain below 0.5% is within run-to-run noise and does not reset patience


# --- the search space -----------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    backend: str
    config: Config

    @property
    def key(self) -> str:
        return json.dumps([self.backend, self.config.to_dict()], sort_keys=True)

    def short(self) -> str:
        return f"{self.backend}[{self.config.short()}]"


class SearchSpace:
    """The valid configs of every candidate backend for one spec, and their Optuna parameters."""

    def __init__(self, spec: NormSpec, backends: dict, device=None):
        self.spec = spec
        self.backends = backends
        self.configs = {name: list(b.space(spec)) for name, b in backends.items()}
        if device is not None and torch.device(device).type == "cuda":
            # Candidates that spill or cannot launch on this GPU are dropped before any timing.
            from .audit import prune_space
            self.configs = prune_space(spec, self.configs, torch.device(device))
        self.configs = {name: cs for name, cs in self.configs.items() if cs}
        self.knobs = {}
        for name, configs in self.configs.items():
            values = {}
            for knob in configs[0].domain():
                seen = []
                for c in configs:
                    v = getattr(c, knob)
                    if v not in seen:
                        seen.append(v)
                if len(seen) > 1:
                    # In declared-domain order, so "nearest" means neighbouring domain values.
                    order = list(type(configs[0]).domain()[knob])
                    values[knob] = sorted(seen, key=order.index)
            self.knobs[name] = values

    def __len__(self) -> int:
        return sum(len(cs) for cs in self.configs.values())

    def candidates(self) -> list[Candidate]:
        return [Candidate(name, c) for name, cs in self.configs.items() for c in cs]

    def params(self, cand: Candidate) -> dict:
        """Optuna params that select `cand` (for enqueue_trial)."""
        params = {"backend": cand.backend}
        for knob, values in self.knobs[cand.backend].items():
            params[f"{cand.backend}.{knob}"] = values.index(getattr(cand.config, knob))
        return params

    def suggest(self, trial) -> Candidate:
        name = trial.suggest_categorical("backend", list(self.configs))
        # Knobs are ordinal (an index into their sorted values): TPE then learns "larger is better".
        wanted = {knob: values[trial.suggest_int(f"{name}.{knob}", 0, len(values) - 1)]
                  for knob, values in self.knobs[name].items()}
        return Candidate(name, self._nearest(name, wanted))

    def _distance(self, name: str, config: Config, wanted: dict) -> int:
        return sum(abs(values.index(getattr(config, k)) - values.index(wanted[k]))
                   for k, values in self.knobs[name].items())

    def _nearest(self, name: str, wanted: dict) -> Config:
        """The valid config closest to the sampled knob values (exact when valid)."""
        return min(self.configs[name], key=lambda c: self._distance(name, c, wanted))

    def nearest_new(self, cand: Candidate, exclude: set) -> Candidate | None:
        """The unevaluated candidate closest to `cand` (same backend first), None when all are evaluated."""
        wanted = {k: getattr(cand.config, k) for k in self.knobs[cand.backend]}
        for c in sorted(self.configs[cand.backend], key=lambda c: self._distance(cand.backend, c, wanted)):
            if Candidate(cand.backend, c).key not in exclude:
                return Candidate(cand.backend, c)
        return next((c for c in self.candidates() if c.key not in exclude), None)


# --- one study ------------------------------------------------------------------
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


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_storage(storage: str | None, journal_path: Path, *, heartbeat_s: int = fleet.HEARTBEAT_S):
    """An Optuna storage (`storage.open_storage`); a journal file is checked first: never a tuning
    database or another file, and a last line cut by a full disk is dropped."""
    if not fleet.is_url(storage):
        path = Path(storage) if storage else journal_path
        path.parent.mkdir(parents=True, exist_ok=True)
        prepare_journal(path)
    return fleet.open_storage(storage, journal_path, heartbeat_s=heartbeat_s)


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
                 verify=measure.verify):
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
        self.strict = strict  # refuse to record a result whose measurements stay noisy (autonorm/quality.py)
        self.study_attrs = study_attrs  # device, versions, protocol: stored in the study (storage.describe_study)
        self._beats = fleet.Heartbeats(None)

    # -- study bookkeeping --
    def _study(self):
        import optuna

        # Independent TPE with 5 startup trials: on the three recorded numba-cpu tables it matched or beat
        # multivariate, grouped TPE with 10 startup trials in trials-to-2% and in the winners of a
        # 40-trial budget (docs/benchmarks/search-efficiency.md). constant_liar keeps parallel workers apart.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # constant_liar
            sampler = optuna.samplers.TPESampler(seed=self.seed, constant_liar=True, n_startup_trials=STARTUP_TRIALS)
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
        wanted = [self.space.params(c) for c in (self.space.candidates() if self.exhaustive else self.seeds)
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
            self._search(study)
            return self._finish(study)

    def _claim(self):
        return fleet.claim_lock(self.storage, self.name, self.lock_path)

    def _search(self, study) -> None:
        import optuna

        started, best, since_best = time.monotonic(), float("inf"), 0
        pool = ThreadPoolExecutor(max_workers=max(1, self.compile_workers))
        try:
            while True:
                measured, failed, queued = self._state(study)
                # The budget counts distinct candidates evaluated; a sampled duplicate costs no timing,
                # but Optuna trials are capped too so that a converged sampler cannot loop forever.
                done = len(measured) + len(failed)
                if (done >= self.n_trials or len(self._finished(study)) >= MAX_TRIALS_FACTOR * self.n_trials
                        or time.monotonic() - started > self.time_budget):
                    break
                if self.exhaustive and not any(t.state == optuna.trial.TrialState.WAITING
                                               for t in study.get_trials(deepcopy=False)):
                    if not self._others_running(study):
                        break  # every config is measured or failed
                    time.sleep(1.0)  # another worker may die: its trials then return to the queue
                    continue
                if self.patience is not None and since_best >= self.patience:
                    break
                if done >= len(self.space):
                    break  # every candidate is evaluated
                batch = []
                # Claiming candidates is atomic across workers: under the lock, re-read what the others
                # have measured or are measuring (`queued`), then ask; a worker that enters after us sees
                # our RUNNING trials and their candidates, so no config is timed twice.
                with self._claim():
                    fleet.fail_stale_trials(study)
                    measured, failed, queued = self._state(study)
                    for _ in range(min(self.compile_workers, self.n_trials - done)):
                        picked = self._ask(study, set(measured) | set(failed) | queued | {c.key for _, c in batch},
                                           self._incumbent(measured))
                        if picked is not None:
                            batch.append(picked)
                if not batch:
                    continue  # the trial cap above ends this if it keeps happening
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
        finally:
            pool.shutdown(wait=True)

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
            trial.set_user_attr("worker", _worker_id())
            cand = self.space.suggest(trial)
            trial.set_user_attr("candidate", cand.key)
            if cand.key not in exclude:
                trial.set_user_attr("config", {"backend": cand.backend, **cand.config.to_dict()})
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
            trial.set_user_attr("failed", reason)
            failed[cand.key] = reason
            study.tell(trial, state=TrialState.FAIL)
            self._beats.discard(trial._trial_id)
            return None
        trial.set_user_attr("timing", timing.to_json())
        measured[cand.key] = timing.to_json()
        study.tell(trial, timing.median_us)
        self._beats.discard(trial._trial_id)
        return timing.median_us

    def _tell_duplicate(self, study, trial) -> None:
        """A trial that drew an evaluated candidate: PRUNED (no timing), so FAIL means a broken candidate."""
        from optuna.trial import TrialState

        trial.set_user_attr("duplicate", True)
        study.tell(trial, state=TrialState.PRUNED)
        self._beats.discard(trial._trial_id)

    # -- finalists, baselines, record --
    def _entry(self, cand: Candidate, timing: measure.Timing) -> Entry:
        gbps = measure.gbps(self.spec, self.rows, timing.median_us)
        pct = 100 * gbps / self.copy_gbps if self.copy_gbps else None
        return Entry(cand.backend, cand.config, timing.median_us, timing.p20_us, timing.p80_us, gbps, pct)

    def _baselines(self, need_eager: bool = True) -> dict:
        """Torch eager and torch.compile kernels (verified), timed with the finalists."""
        from .backends.torch_eager import TorchBackend, compile_target

        eager = TorchBackend().build(None, self.spec, None, self.device)
        kernels = {"torch_eager": eager} if need_eager else {}
        if self.compile_baseline:
            try:
                # One graph per study: past Dynamo's recompile limit (8 per code object) a grid's later
                # studies would silently time eager.
                torch._dynamo.reset()
                compiled = torch.compile(compile_target(self.spec), dynamic=False)
                reason = measure.verify(self.spec, compiled, self.rows, self.device, full=False)
                if reason is None:
                    compiled(*measure.make_inputs(self.spec, self.rows, self.device).args(self.spec))
                    kernels["torch_compile"] = compiled
                else:
                    log.warning("torch.compile baseline for %s is wrong (%s); not recorded", self.spec.short(), reason)
            except Exception as exc:
                log.warning("torch.compile baseline for %s failed: %s", self.spec.short(), exc)
        return kernels

    def _finish(self, study) -> StudyResult:

        measured, failed, _ = self._state(study)
        trials = len(measured) + len(failed)  # distinct candidates evaluated (duplicates cost nothing)
        result = StudyResult(self.spec, self.rows, None, trials, len(measured), failed, len(self.space))
        by_key = {c.key: c for c in self.space.candidates()}
        ranked = sorted((timing["median_us"], key) for key, timing in measured.items() if key in by_key)
        if not ranked:
            return result
        # One finalizer per study: the first worker to get here after the search; the others take its record
        # from the study (or, while it is still re-timing, leave it to `autonorm db export`).
        with self._claim():
            role = fleet.finalizer_role(study, _worker_id(), trials)
        if role == "stored":
            result.record = Record.from_json(study.user_attrs["record"], f"study {self.name}")
            return result
        if role != "mine":
            result.finalized_by = role
            return result
        self._final_record(result, measured, failed, ranked, by_key, trials)
        if result.record is not None:
            study.set_user_attr("record", result.record.to_json())
            study.set_user_attr("record_trials", trials)
        return result

    def _final_record(self, result: StudyResult, measured, failed, ranked, by_key, trials) -> None:
        """The finalists re-timed interleaved with the torch baselines: sets the study's database record
        (or, with `strict`, why noisy measurements were refused)."""
        finalists = [by_key[k] for _, k in ranked[:self.finalists]]
        torch_key = Candidate("torch", self.space.configs["torch"][0]).key if "torch" in self.space.configs else None
        if torch_key in measured and not any(c.backend == "torch" for c in finalists):
            finalists.append(by_key[torch_key])  # so that the winner is never slower than torch
        torch_finalist = next((i for i, c in enumerate(finalists) if c.backend == "torch"), None)
        baselines = self._baselines(need_eager=torch_finalist is None)
        kernels = [self.backends[c.backend].compile(self.spec, c.config, self.device) for c in finalists]
        outcome = quality.gate(lambda: self.timer.interleaved(self.spec, kernels + list(baselines.values()), self.rows),
                               [c.short() for c in finalists] + list(baselines),
                               [measured[c.key] for c in finalists] + [None] * len(baselines))
        if not outcome.verdict.ok:
            why = (f"{self.spec.short()} rows={self.rows}: measurements stay noisy after {outcome.attempts} timings "
                   f"({outcome.verdict.summary()}); {quality.load_average()}")
            if self.strict:
                log.warning("%s; not recorded (--strict)", why)
                result.refused = why
                return
            log.warning("%s; recorded as low-confidence: re-tune on a quieter machine, or use --strict", why)
        timings = outcome.timings
        base_t = dict(zip(baselines, timings[len(kernels):]))
        if torch_finalist is not None:  # the torch candidate is the eager baseline: never time it twice
            base_t["torch_eager"] = timings[torch_finalist]
        entries = sorted((self._entry(c, t) for c, t in zip(finalists, timings)), key=lambda e: e.median_us)
        seen = {json.dumps([e.backend, e.config.to_dict()], sort_keys=True) for e in entries}
        for median, key in ranked[self.finalists:self.finalists + 3]:  # a few more runners-up, not re-timed
            if key not in seen:
                t = measured[key]
                entries.append(self._entry(by_key[key], measure.Timing(t["median_us"], t["p20_us"], t["p80_us"], 0)))
        winner = entries[0]
        result.record = Record(
            key=RecordKey.of(self.spec, rows_bucket(self.rows)), winner=winner, runners_up=entries[1:],
            baselines={"torch_eager": base_t["torch_eager"].to_json(),
                       "torch_compile": base_t["torch_compile"].to_json() if "torch_compile" in base_t else None},
            template_hash=self.backends[winner.backend].template_hash(), trials=trials,
            failed=len(failed), date=now_iso(), quality=outcome.to_json())


# --- the command ----------------------------------------------------------------------
def add_arguments(p) -> None:
    from .cli import add_device, add_list, positive_int

    def preset(name):
        def text(v):
            return ",".join(map(str, v)) if isinstance(v, list) else f"{v:g}"
        return f"default {text(DEFAULTS[name])}; --quick: {text(QUICK[name])}"

    add_list(p, "--ops", choices=("rmsnorm", "layernorm"), help=preset("ops"))
    add_list(p, "--directions", choices=("fwd", "bwd"), help=preset("directions") + " plus one backward")
    add_list(p, "--dtypes", help=f"input dtypes, float32, float16, bfloat16 or fp32... ({preset('dtypes')})")
    p.add_argument("--weight-dtype", choices=("same", "float32"), default="same",
                   help="weight dtype: the input's or float32")
    add_list(p, "--features", help="feature tags such as weight, weight+bias, weight+residual, weight+cast_llama, "
                                   "none (default: weight for rmsnorm and weight+bias for layernorm, as torch.nn's "
                                   "modules); a tag invalid for one op is skipped for it")
    add_list(p, "--hidden", kind=positive_int, help=f"hidden sizes N ({preset('hidden')})")
    add_list(p, "--rows", kind=positive_int,
             help=f"row counts, each recorded under its power-of-two bucket ({preset('rows')})")
    add_list(p, "--backends", help="candidate backends (default: those that run natively here)")
    p.add_argument("--trials", type=positive_int, help=f"trial budget per study ({preset('trials')})")
    p.add_argument("--time-budget", type=float, help=f"seconds per study ({preset('time_budget')})")
    p.add_argument("--patience", type=positive_int, help="stop a TPE study after this many trials without a 0.5%% gain")
    p.add_argument("--storage", help="Optuna storage URL (sqlite:///x.db, postgresql://...) or a journal file path "
                                     "(default: OUT/.autonorm-journal/<device-slug>.optuna.journal)")
    p.add_argument("--out", help="output folder; the database is OUT/<device-slug>.json (default: this user's "
                                 "database folder, read automatically by the dispatcher; see `autonorm db where`)")
    p.add_argument("--heartbeat", type=positive_int, default=fleet.HEARTBEAT_S,
                   help=f"seconds between a worker's heartbeats on a URL storage; a trial silent for "
                        f"{fleet.GRACE_BEATS} of them returns to the queue")
    add_device(p)
    p.add_argument("--quick", action="store_true",
                   help="a small grid that finishes in a few minutes on a 2-core CPU")
    p.add_argument("--strict", action="store_true",
                   help="refuse to record a study whose measurements stay noisy (default: record it flagged "
                        "low-confidence, with a warning)")
    p.add_argument("--no-compile-baseline", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--compile-workers", type=positive_int, default=min(4, os.cpu_count() or 1),
                   help="threads compiling candidates while timing stays serial")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are off when stderr is not a terminal)")


def _feature_kwargs(tag: str) -> dict:
    from .cli import UsageError

    try:
        return NormSpec.feature_kwargs(tag)
    except ValueError as exc:
        raise UsageError(f"--features: {exc}") from None


def specs_from_args(args) -> list[NormSpec]:
    """The specs to tune; every bad or useless value is a UsageError (a typo never tunes nothing quietly)."""
    from .check import dtype_names
    from .cli import UsageError
    from .spec import MAX_HIDDEN

    preset = QUICK if args.quick else DEFAULTS
    ops = args.ops or preset["ops"]
    directions = args.directions or preset["directions"]
    hidden = args.hidden or preset["hidden"]
    too_big = [n for n in hidden if n > MAX_HIDDEN]
    if too_big:
        raise UsageError(f"--hidden {too_big[0]} is above the kernels' maximum {MAX_HIDDEN}")
    tags = args.features or None
    for tag in tags or ():
        _feature_kwargs(tag)
    studies = [(op, d, n) for op in ops for d in directions for n in hidden]
    if preset.get("quick_backward") and args.directions is None:
        studies.append((ops[0], "bwd", hidden[0]))  # --quick: the backward of one shape
    specs, used = [], set()
    for op, direction, n in studies:
        for x in dtype_names(args.dtypes or preset["dtypes"]):
            w = "float32" if args.weight_dtype == "float32" else x
            for tag in tags or [DEFAULT_FEATURES[op]]:
                features = _feature_kwargs(tag)
                try:
                    spec = NormSpec(op, direction, x, w if features["weight"] else x, n, **features)
                except ValueError:
                    continue  # e.g. bias on RMSNorm: that tag is for the other op
                used.add(tag)
                if spec not in specs:  # e.g. cast_llama in fp32 is the plain spec
                    specs.append(spec)
    unused = [t for t in tags or () if t not in used]
    if unused:
        raise UsageError(f"--features {', '.join(unused)}: valid for none of --ops {', '.join(ops)} "
                         f"(bias is a LayerNorm feature, offset an RMSNorm one)")
    return specs


def native_backends(device: torch.device, requested: list[str] | None) -> dict:
    """Candidate backends that run natively on `device` (interpreter and simulator timings are never recorded)."""
    from .backends import BACKENDS, DEFAULT_ORDER, get_backend
    from .errors import BackendUnavailableError

    native = DEFAULT_ORDER.get(device.type, ("torch",))
    names = requested or list(native)
    chosen = {}
    for name in names:
        if name not in BACKENDS:
            from .cli import UsageError
            raise UsageError(f"--backends: unknown backend {name!r}; known: {', '.join(BACKENDS)}")
        if name not in native:
            print(f"autonorm tune: skipping {name}: it does not run natively on {device.type} "
                  f"(simulated timings are never recorded)", file=sys.stderr)
            continue
        try:
            backend = get_backend(name)
        except BackendUnavailableError as exc:
            print(f"autonorm tune: skipping {name}: {exc}", file=sys.stderr)
            continue
        reason = backend.unavailable_reason()
        if reason is not None:
            print(f"autonorm tune: skipping {name}: {reason}", file=sys.stderr)
            continue
        chosen[name] = backend
    return chosen


def format_table(results: list[StudyResult]) -> str:
    """The summary: one row per study; `spread` is the winner's p80/p20, `(low)` marks a low-confidence record."""
    rows = [("spec", "rows", "winner", "config", "us", "spread", "GB/s", "%copy", "x eager", "x compile", "trials")]
    for r in results:
        rec = r.record
        if rec is None:
            why = ("(refused: noisy measurements)" if r.refused else f"(finalized by {r.finalized_by})"
                   if r.finalized_by else "(none: every candidate failed)")
            rows.append((r.spec.short(), str(r.rows), why, "", "", "", "", "", "", "", str(r.trials)))
            continue
        w = rec.winner
        eager = rec.baselines["torch_eager"]["median_us"] / w.median_us
        comp = rec.baselines.get("torch_compile")
        low = " (low)" if (rec.quality or {}).get("confidence") == "low" else ""
        rows.append((r.spec.short(), str(r.rows), w.backend, w.config.short(), f"{w.median_us:.1f}",
                     f"{quality.spread(w):.2f}{low}",
                     f"{w.gbps:.1f}", f"{w.pct_copy_bw:.0f}" if w.pct_copy_bw is not None else "-",
                     f"{eager:.2f}", f"{comp['median_us'] / w.median_us:.2f}" if comp else "-",
                     f"{r.trials} ({len(r.failed)} failed)"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(wd) for cell, wd in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    return "\n".join(lines)


def _estimate(studies: int, n_trials: int, time_budget: float) -> str:
    worst = studies * time_budget
    return (f"{studies} studies of up to {n_trials} trials; at most {worst / 60:.0f} min "
            f"(each study stops within its {time_budget:.0f} s --time-budget)")


def _where_used(db_path: Path) -> str:
    """What the dispatcher does with a database written to `db_path` (for tune's last line)."""
    from . import knobs

    folder = db_path.parent.resolve()
    if folder == knobs.user_db_dir().resolve():
        return "the next `import autonorm` on this machine uses it (`autonorm db where` lists what is loaded)"
    if any(folder == p.resolve() or db_path.resolve() == p.resolve() for p in knobs.db_paths()):
        return "AUTONORM_DB_PATH names it, so the next `import autonorm` uses it"
    return (f"to use it, set AUTONORM_DB_PATH={folder} or call autonorm.load_db({str(db_path)!r}) "
            f"(without --out, tune writes where autonorm looks by default)")


def main(args) -> int:
    import optuna
    from tqdm import tqdm

    from . import knobs
    from .cli import UsageError, device_arg
    from .db import side_folder
    from .device import identity

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    preset = QUICK if args.quick else DEFAULTS
    device = device_arg(args.device)
    specs = specs_from_args(args)
    row_counts = args.rows or preset["rows"]
    n_trials = args.trials or preset["trials"]
    time_budget = args.time_budget or preset["time_budget"]
    backends = native_backends(device, args.backends)
    if not backends:
        raise UsageError(f"no candidate backend can run natively on {device}")

    ident = identity(device)
    out = Path(args.out).expanduser() if args.out else knobs.user_db_dir()
    db_path = out / f"{ident['slug']}.json"
    journal = side_folder(out) / f"{ident['slug']}.optuna.journal"
    try:  # a bad storage URL or a missing driver fails here, in one line, before the bandwidth probe
        storage = make_storage(args.storage, journal, heartbeat_s=args.heartbeat)
    except JournalError as exc:
        raise UsageError(str(exc)) from None
    except Exception as exc:  # drivers raise their own kinds (sqlalchemy, psycopg): all are a bad --storage
        raise UsageError(f"--storage {args.storage}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    earlier = TuningDB.load(db_path) if db_path.exists() else None
    studies = len(specs) * len(row_counts)
    estimate = _estimate(studies, n_trials, time_budget)
    if studies * time_budget > LONG_RUN_S:
        print(f"autonorm tune: {estimate}; Ctrl-C stops it and the same command resumes", file=sys.stderr)
    timer = measure.timer_for(device)
    copy_gbps = measure.copy_bandwidth(device)
    device_info = {k: ident[k] for k in ("name", "slug", "kind", "compute_capability", "sm_count", "l2_bytes")}
    device_info["copy_gbps"] = round(copy_gbps, 2)
    protocol = {**timer.describe(), "verify": "reference check before timing", "finalists": 3,
                "finalists_retimed": "interleaved, with the torch baselines",
                "quality": f"re-timed up to {quality.RETRIES} more times while p80/p20 > {quality.SPREAD_LIMIT} or "
                           f"re-timing and search differ by > {quality.AGREEMENT_LIMIT}x"}
    db = TuningDB(device_info, software_versions(), protocol)
    lock_path = None if fleet.is_url(args.storage) else Path(str(args.storage or journal) + ".autonorm-lock")
    study_attrs = {"device": device_info, "versions": db.versions, "protocol": protocol}
    print(f"autonorm tune: {studies} studies on {ident['name']} ({device}); backends: {', '.join(backends)}; "
          f"copy bandwidth {copy_gbps:.1f} GB/s; database {db_path}", file=sys.stderr)

    no_bars = args.no_progress or not sys.stderr.isatty()  # escape codes would fill a log file
    results = []
    overall = tqdm(total=studies, desc="studies", position=0, disable=no_bars)
    try:
        for spec in specs:
            for rows in row_counts:
                seeds = [Candidate(name, b.heuristic(spec)) for name, b in backends.items()]
                prior = earlier.records.get(RecordKey.of(spec, rows_bucket(rows))) if earlier else None
                if prior is not None and prior.winner.backend in backends:
                    seeds.insert(0, Candidate(prior.winner.backend, prior.winner.config))
                bar = tqdm(total=n_trials, desc=f"{spec.short()} rows={rows}", position=1, leave=False, disable=no_bars)
                runner = StudyRunner(spec, rows, backends, timer, device, storage=storage,
                                     name=study_name(ident["slug"], spec, rows, backends), n_trials=n_trials,
                                     time_budget=time_budget, patience=args.patience, seeds=seeds,
                                     compile_workers=args.compile_workers,
                                     compile_baseline=not args.no_compile_baseline, copy_gbps=copy_gbps,
                                     lock_path=lock_path, progress=bar, strict=args.strict,
                                     study_attrs=study_attrs)
                result = runner.run()
                bar.close()
                results.append(result)
                if result.record is not None:
                    db.upsert(result.record)
                    db.save(db_path)  # after every study: a killed run keeps what it finished
                overall.update(1)
    except KeyboardInterrupt:
        overall.close()
        print(format_table(results))
        print(f"\nautonorm tune: interrupted after {len(results)} of {studies} studies; {len(db.records)} records "
              f"saved to {db_path}. Run the same command again to resume: finished studies are re-recorded "
              f"from {args.storage or journal} without timing their trials again.", file=sys.stderr)
        return 130
    overall.close()
    print(format_table(results))
    refused = [r for r in results if r.refused]
    if refused:
        print(f"\n{len(refused)} noisy studies not recorded (--strict); {quality.load_average()}", file=sys.stderr)
    print(f"\nwrote {db_path} ({len(db.records)} records this run); {_where_used(db_path)}")
    return 0 if all(r.record is not None or r.finalized_by for r in results) else 1
