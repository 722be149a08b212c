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
torch.compile baselines before the winner is declared.

Resume: studies live in Optuna storage (a journal file next to the database by
default). Restarting finds completed trials in the study and never re-times
them; a RUNNING trial left by a killed worker on this host is failed and its
config re-queued. Several workers may share one study.
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

from . import measure
from .config import Config
from .db import Entry, Record, RecordKey, TuningDB, file_lock, now_iso
from .device import software_versions
from .errors import AutonormError
from .spec import NormSpec, dtype_name, rows_bucket

log = logging.getLogger("autonorm.tune")

HELP = "tune kernels on this machine and write a tuning database"

# --quick: four studies that finish in a few minutes on a 2-core CPU (numba-cpu + torch).
QUICK = {"ops": "rmsnorm,layernorm", "directions": "fwd", "dtypes": "float32", "hidden": "1024,4096",
         "rows": "1024", "trials": 12, "time_budget": 45.0}
DEFAULTS = {"ops": "rmsnorm,layernorm", "directions": "fwd,bwd", "dtypes": "float32,float16,bfloat16",
            "hidden": "768,1024,2048,4096,5120,8192", "rows": "1,64,1024,4096,16384", "trials": 60,
            "time_budget": 300.0}
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


def make_storage(storage: str | None, journal_path: Path):
    """An Optuna storage: the URL given, else a journal file (JournalFileBackend)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if storage:
        return optuna.storages.get_storage(storage) if "://" in storage else \
            JournalStorage(JournalFileBackend(storage))
    journal_path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(journal_path)))


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
                 seed: int = 0, progress=None):
        self.spec, self.rows, self.backends, self.timer = spec, rows, backends, timer
        self.device = torch.device(device)
        self.storage, self.name = storage, name
        self.n_trials, self.time_budget = n_trials, time_budget
        self.space = SearchSpace(spec, backends, self.device)
        self.exhaustive = len(self.space) <= n_trials
        self.patience = None if self.exhaustive else (patience or max(10, n_trials // 3))
        self.seeds, self.compile_workers, self.finalists = list(seeds), compile_workers, finalists
        self.compile_baseline, self.copy_gbps, self.lock_path = compile_baseline, copy_gbps, lock_path
        self.seed, self.progress = seed, progress

    # -- study bookkeeping --
    def _study(self):
        import optuna

        # Independent TPE with 5 startup trials: on the three recorded numba-cpu tables it matched or beat
        # multivariate, grouped TPE with 10 startup trials in trials-to-2% and in the winners of a
        # 40-trial budget (docs/benchmarks/search-efficiency.md). constant_liar keeps parallel workers apart.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # constant_liar
            sampler = optuna.samplers.TPESampler(seed=self.seed, constant_liar=True, n_startup_trials=STARTUP_TRIALS)
        return optuna.create_study(storage=self.storage, study_name=self.name, direction="minimize",
                                   sampler=sampler, load_if_exists=True)

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
                # An enqueued (WAITING) trial keeps its params in system_attrs until it is popped.
                queued.add(json.dumps(t.system_attrs.get("fixed_params", {}), sort_keys=True)
                           if t.state == TrialState.WAITING else key)
        return measured, failed, queued

    def _prepare(self, study):
        """Fail trials orphaned by dead workers on this host, then enqueue seeds (or the whole space)."""
        from optuna.trial import TrialState

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
        import optuna

        if not len(self.space):
            raise AutonormError(f"no backend has a valid config for {self.spec.short()}")
        study = self._study()
        with file_lock(self.lock_path):
            self._prepare(study)
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
                    break  # every config is measured, failed or being measured by another worker
                if self.patience is not None and since_best >= self.patience:
                    break
                if done >= len(self.space):
                    break  # every candidate is evaluated
                batch = []
                # Claiming candidates is atomic across workers: under the lock, re-read what the others
                # have measured or are measuring (`queued`), then ask; a worker that enters after us sees
                # our RUNNING trials and their candidates, so no config is timed twice.
                with file_lock(self.lock_path):
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
        return self._finish(study)

    def _ask(self, study, exclude: set, incumbent: Candidate | None = None):
        """A new trial and its candidate. A sampled duplicate is closed as FAIL (TPE ignores those, so it
        biases nothing) and replaced by the nearest unevaluated candidate, enqueued so that the trial's
        params always name exactly the config that is measured."""
        from optuna.trial import TrialState

        for _ in range(3):
            trial = study.ask()
            trial.set_user_attr("worker", _worker_id())
            cand = self.space.suggest(trial)
            trial.set_user_attr("candidate", cand.key)
            if cand.key not in exclude:
                return trial, cand
            trial.set_user_attr("duplicate", True)
            study.tell(trial, state=TrialState.FAIL)
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

        if cand.key in measured:  # measured before (earlier run, snapped duplicate, other worker)
            trial.set_user_attr("duplicate", True)
            study.tell(trial, measured[cand.key]["median_us"])
            return measured[cand.key]["median_us"]
        if cand.key in failed:
            trial.set_user_attr("duplicate", True)
            study.tell(trial, state=TrialState.FAIL)
            return None
        kernel, reason = compiled if compiled is not None else (None, "not compiled")
        if reason is None:
            reason = measure.verify(self.spec, kernel, min(self.rows, 64), self.device)
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
            return None
        trial.set_user_attr("timing", timing.to_json())
        measured[cand.key] = timing.to_json()
        study.tell(trial, timing.median_us)
        return timing.median_us

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
                reason = measure.verify(self.spec, compiled, min(self.rows, 64), self.device)
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
        finalists = [by_key[k] for _, k in ranked[:self.finalists]]
        torch_key = Candidate("torch", self.space.configs["torch"][0]).key if "torch" in self.space.configs else None
        if torch_key in measured and not any(c.backend == "torch" for c in finalists):
            finalists.append(by_key[torch_key])  # so that the winner is never slower than torch
        torch_finalist = next((i for i, c in enumerate(finalists) if c.backend == "torch"), None)
        baselines = self._baselines(need_eager=torch_finalist is None)
        kernels = [self.backends[c.backend].compile(self.spec, c.config, self.device) for c in finalists]
        timings = self.timer.interleaved(self.spec, kernels + list(baselines.values()), self.rows)
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
            failed=len(failed), date=now_iso())
        return result


# --- the command ----------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--ops", help=f"comma list of rmsnorm,layernorm (default {DEFAULTS['ops']})")
    p.add_argument("--directions", help="comma list of fwd,bwd (default fwd,bwd)")
    p.add_argument("--dtypes", help="comma list of input dtypes (default float32,float16,bfloat16)")
    p.add_argument("--weight-dtype", choices=("same", "float32"), default="same",
                   help="weight dtype: the input's (default) or float32")
    p.add_argument("--features", default="weight",
                   help="comma list of feature tags, e.g. weight,weight+bias,weight+residual (default weight); "
                        "tags invalid for an op are skipped")
    p.add_argument("--hidden", help="comma list of hidden sizes N")
    p.add_argument("--rows", help="comma list of row counts (each recorded under its power-of-two bucket)")
    p.add_argument("--backends", help="comma list of candidate backends (default: those that run natively here)")
    p.add_argument("--trials", type=int, help="trial budget per study")
    p.add_argument("--time-budget", type=float, help="seconds per study")
    p.add_argument("--patience", type=int, help="stop a TPE study after this many trials without a 0.5%% gain")
    p.add_argument("--storage", help="Optuna storage URL (sqlite:///x.db, postgresql://...) or a journal file path "
                                     "(default: OUT/<device-slug>.optuna.journal)")
    p.add_argument("--out", default="tuning_db", help="output folder; the database is OUT/<device-slug>.json")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--quick", action="store_true",
                   help="a small grid that finishes in a few minutes on a 2-core CPU")
    p.add_argument("--no-compile-baseline", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--compile-workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="threads compiling candidates while timing stays serial")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def specs_from_args(args) -> list[NormSpec]:
    preset = QUICK if args.quick else DEFAULTS
    specs = []
    for op in _csv(args.ops or preset["ops"]):
        for direction in _csv(args.directions or preset["directions"]):
            for x in map(dtype_name, _csv(args.dtypes or preset["dtypes"])):
                w = "float32" if args.weight_dtype == "float32" else x
                for tag in _csv(args.features):
                    flags = set(tag.split("+")) - {"none"}
                    unknown = flags - {"weight", "bias", "residual", "offset"}
                    if unknown:
                        raise SystemExit(f"autonorm tune: unknown feature {sorted(unknown)} in {tag!r}")
                    for n in map(int, _csv(args.hidden or preset["hidden"])):
                        try:
                            specs.append(NormSpec(op, direction, x, w if "weight" in flags else x, n,
                                                  **{f: f in flags for f in ("weight", "bias", "residual", "offset")}))
                        except ValueError:
                            continue  # e.g. bias on RMSNorm: not a real problem
    return specs


def native_backends(device: torch.device, requested: list[str] | None) -> dict:
    """Candidate backends that run natively on `device` (interpreter and simulator timings are never recorded)."""
    from .backends import BACKENDS, get_backend
    from .dispatch import DEFAULT_ORDER
    from .errors import BackendUnavailableError

    native = DEFAULT_ORDER.get(device.type, ("torch",))
    names = requested or list(native)
    chosen = {}
    for name in names:
        if name not in BACKENDS:
            raise SystemExit(f"autonorm tune: unknown backend {name!r}; known: {', '.join(BACKENDS)}")
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
    rows = [("spec", "rows", "winner", "config", "us", "GB/s", "%copy", "x eager", "x compile", "trials")]
    for r in results:
        rec = r.record
        if rec is None:
            rows.append((r.spec.short(), str(r.rows), "(none: every candidate failed)", "", "", "", "", "", "",
                         str(r.trials)))
            continue
        w = rec.winner
        eager = rec.baselines["torch_eager"]["median_us"] / w.median_us
        comp = rec.baselines.get("torch_compile")
        rows.append((r.spec.short(), str(r.rows), w.backend, w.config.short(), f"{w.median_us:.1f}",
                     f"{w.gbps:.1f}", f"{w.pct_copy_bw:.0f}" if w.pct_copy_bw is not None else "-",
                     f"{eager:.2f}", f"{comp['median_us'] / w.median_us:.2f}" if comp else "-",
                     f"{r.trials} ({len(r.failed)} failed)"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(wd) for cell, wd in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    return "\n".join(lines)


def main(args) -> int:
    import optuna
    from tqdm import tqdm

    from .device import identity

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    preset = QUICK if args.quick else DEFAULTS
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backends = native_backends(device, _csv(args.backends) if args.backends else None)
    if not backends:
        print("autonorm tune: no candidate backend can run here", file=sys.stderr)
        return 2
    specs = specs_from_args(args)
    row_counts = [int(r) for r in _csv(args.rows or preset["rows"])]
    n_trials = args.trials or preset["trials"]
    time_budget = args.time_budget or preset["time_budget"]

    ident = identity(device)
    out = Path(args.out)
    db_path = out / f"{ident['slug']}.json"
    timer = measure.timer_for(device)
    copy_gbps = measure.copy_bandwidth(device)
    device_info = {k: ident[k] for k in ("name", "slug", "kind", "compute_capability", "sm_count", "l2_bytes")}
    device_info["copy_gbps"] = round(copy_gbps, 2)
    protocol = {**timer.describe(), "verify": "reference check before timing", "finalists": 3,
                "finalists_retimed": "interleaved, with the torch baselines"}
    db = TuningDB(device_info, software_versions(), protocol)
    earlier = TuningDB.load(db_path) if db_path.exists() else None
    journal = out / f"{ident['slug']}.optuna.journal"
    storage = make_storage(args.storage, journal)
    lock_path = Path(str(args.storage or journal) + ".autonorm-lock") if not (args.storage and "://" in args.storage) else None
    print(f"autonorm tune: {len(specs) * len(row_counts)} studies on {ident['name']} ({device}); backends: "
          f"{', '.join(backends)}; copy bandwidth {copy_gbps:.1f} GB/s; database {db_path}", file=sys.stderr)

    results = []
    overall = tqdm(total=len(specs) * len(row_counts), desc="studies", position=0, disable=args.no_progress)
    for spec in specs:
        for rows in row_counts:
            seeds = [Candidate(name, b.heuristic(spec)) for name, b in backends.items()]
            prior = earlier.records.get(RecordKey.of(spec, rows_bucket(rows))) if earlier else None
            if prior is not None and prior.winner.backend in backends:
                seeds.insert(0, Candidate(prior.winner.backend, prior.winner.config))
            bar = tqdm(total=n_trials, desc=f"{spec.short()} rows={rows}", position=1, leave=False,
                       disable=args.no_progress)
            runner = StudyRunner(spec, rows, backends, timer, device, storage=storage,
                                 name=study_name(ident["slug"], spec, rows, backends), n_trials=n_trials,
                                 time_budget=time_budget, patience=args.patience, seeds=seeds,
                                 compile_workers=args.compile_workers, compile_baseline=not args.no_compile_baseline,
                                 copy_gbps=copy_gbps, lock_path=lock_path, progress=bar)
            result = runner.run()
            bar.close()
            results.append(result)
            if result.record is not None:
                db.upsert(result.record)
                db.save(db_path)  # after every study: a killed run keeps what it finished
            overall.update(1)
    overall.close()
    print(format_table(results))
    print(f"\nwrote {db_path} ({len(db.records)} records this run)")
    return 0 if all(r.record is not None for r in results) else 1
