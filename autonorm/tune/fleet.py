"""Optuna storage for `autonorm tune`: one machine (a journal file) or a fleet (an RDB URL).

A fleet is several `autonorm tune` workers sharing one study per spec through a
PostgreSQL (or SQLite) URL. What makes that waste nothing (docs/fleet.md):

- `open_storage`: a plain `postgresql://` URL gets the psycopg 3 driver, and
  Optuna's heartbeat is on for RDB storages: a trial whose worker stops beating
  (killed, on any host, or PID 1 in a container) is failed after a grace period and
  re-queued with its parameters (`RetryHeartbeatStaleTrialCallback`). Workers that start
  together race to create Optuna's schema; the losers retry.
- `outage.py`: a storage call that loses its connection (a database restart, a
  network blip) is retried with backoff for a bounded time; past that the worker
  stops with one line naming the storage and the connection error: nothing is
  lost, the same command resumes.
- `claim_lock`: the claim of candidates (read what others measure, ask, tag)
  is one critical section per study: a PostgreSQL advisory lock keyed by the
  study name, a file lock beside a SQLite file or a journal file.
- `Heartbeats`: the ask/tell loop has no `study.optimize` to beat for it, so a
  thread beats for every trial this worker holds RUNNING.
- The study carries what a database needs (user attributes: device, spec, rows,
  versions, protocol, and the finalized record), so `export_databases` writes
  the databases from the storage alone, the same for every worker.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import logging
import os
import random
import socket
import threading
import time
import warnings
from pathlib import Path

from ..errors import AutonormError
from .journal import prepare_journal
from .outage import connection_error, patient_storage, with_retry

log = logging.getLogger("autonorm.tune")

HEARTBEAT_S = 20  # seconds between heartbeats; a trial silent for GRACE_BEATS of them is re-queued
GRACE_BEATS = 3
SCHEMA_TRIES = 8  # workers starting together on a fresh database: one creates the schema, the rest retry
MAX_RETRY = 3  # re-queues of one config whose workers died


def is_url(storage: str | None) -> bool:
    return bool(storage) and "://" in storage


def _driver_url(url: str) -> str:
    """`postgresql://` -> `postgresql+psycopg://`: SQLAlchemy's default PostgreSQL driver differs between
    releases (psycopg2 before 2.1); autonorm[postgres] installs psycopg 3."""
    scheme, sep, rest = url.partition("://")
    if scheme in ("postgresql", "postgres"):
        if importlib.util.find_spec("psycopg") is None:
            raise AutonormError(f"storage {url.split('@')[-1]!r}: PostgreSQL needs the psycopg driver: "
                                "pip install 'autonorm[postgres]'")
        return f"postgresql+psycopg{sep}{rest}"
    return url


def _rdb_storage(url: str, heartbeat_s: int):
    import optuna
    import sqlalchemy.exc
    from optuna import storages

    kwargs = {"heartbeat_interval": heartbeat_s, "grace_period": GRACE_BEATS * heartbeat_s}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # Optuna 4.9 renamed the callback and its argument (the old names go in 6.0).
        if "heartbeat_stale_trial_callback" in inspect.signature(storages.RDBStorage).parameters:
            kwargs["heartbeat_stale_trial_callback"] = storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
        else:
            kwargs["failed_trial_callback"] = storages.RetryFailedTrialCallback(max_retry=MAX_RETRY)
    for attempt in range(SCHEMA_TRIES):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return patient_storage(storages.RDBStorage(url, **kwargs), url)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError) as exc:
            # Concurrent CREATE TABLE / version-row inserts: another worker is creating the schema.
            if attempt == SCHEMA_TRIES - 1 or "could not connect" in str(exc) or "Connection refused" in str(exc):
                raise AutonormError(f"storage {url.split('@')[-1]!r}: {type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0]}") from None
            time.sleep(0.2 * (attempt + 1) + random.random() * 0.3)
    raise AssertionError("unreachable")


def open_storage(storage: str | None, journal_path: Path, *, heartbeat_s: int = HEARTBEAT_S):
    """An Optuna storage: the URL given (RDB, with heartbeats), a journal file path, else `journal_path`."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if is_url(storage):
        return _rdb_storage(_driver_url(storage), heartbeat_s)
    path = Path(storage) if storage else journal_path
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def make_storage(storage: str | None, journal_path: Path, *, heartbeat_s: int = HEARTBEAT_S):
    """`open_storage`, with a journal file checked first: never a tuning database or another file, and a
    last line cut by a full disk is dropped (`journal.prepare_journal`)."""
    if not is_url(storage):
        path = Path(storage) if storage else journal_path
        path.parent.mkdir(parents=True, exist_ok=True)
        prepare_journal(path)
    return open_storage(storage, journal_path, heartbeat_s=heartbeat_s)


def worker_id() -> str:
    """This worker's name in a study's trials: host and process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _rdb(storage):
    """The RDBStorage under `storage` (Optuna may wrap it in a cache), or None."""
    from optuna.storages import RDBStorage

    # `create_study` wraps an RDBStorage in its private _CachedStorage, which keeps it as `_backend` (Optuna
    # 3 and 4); the claim lock and the heartbeats need the RDBStorage's engine and heartbeat calls.
    storage = getattr(storage, "_backend", storage)
    return storage if isinstance(storage, RDBStorage) else None


def _advisory_key(study_name: str) -> int:
    """A signed 64-bit key for pg_advisory_lock, the same in every worker."""
    return int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def claim_lock(storage, study_name: str, journal_lock: Path | None = None):
    """One worker at a time claims candidates of `study_name` (the critical section of the tuner)."""
    from sqlalchemy import text

    from ..db_folder import file_lock

    rdb = _rdb(storage)
    if rdb is None:  # a journal file: a lock file beside it (None: one process, nothing to lock)
        with file_lock(journal_lock):
            yield
        return
    dialect = rdb.engine.dialect.name
    if dialect == "postgresql":
        key = _advisory_key(study_name)

        def locked():
            conn = rdb.engine.connect()
            try:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            except BaseException:
                conn.close()
                raise
            return conn
        conn = with_retry(locked, getattr(storage, "where", "(PostgreSQL)"))
        try:
            yield
        finally:
            try:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
            except Exception as exc:
                if connection_error(exc) is None:
                    raise  # a lost connection took its session's lock with it: nothing to release
            finally:
                conn.close()
    elif dialect == "sqlite" and rdb.engine.url.database not in (None, "", ":memory:"):
        with file_lock(Path(rdb.engine.url.database + ".autonorm-lock")):
            yield
    else:
        raise AutonormError(f"autonorm tune: no claim lock for a {dialect} storage; use PostgreSQL, "
                            "SQLite or a journal file")


# --- Optuna internals the tuner needs, reached here only ----------------------------------------
# Optuna's public API changes only the trial a worker asked for (`tell`). The tuner must also change trials
# it did not ask for: a RUNNING trial whose worker on this host died (failed, so its config is re-queued) and
# WAITING trials left when the trial budget is spent (pruned, or they would wait for good). Only the storage
# can, given the trial's id; a study's storage and a trial's id are private attributes in Optuna 3 and 4.

def storage_of(study):
    """The storage `study` reads and writes (Optuna's `Study._storage`)."""
    return study._storage


def trial_id(trial) -> int:
    """A trial's id in its storage (Optuna's `Trial._trial_id`, `FrozenTrial._trial_id`): heartbeats and
    state changes name the trial by it."""
    return trial._trial_id


def force_state(study, trial, state, **user_attrs) -> None:
    """Set a trial this worker does not hold to `state` (with `user_attrs` first, which say why)."""
    storage = storage_of(study)
    for key, value in user_attrs.items():
        storage.set_trial_user_attr(trial_id(trial), key, value)
    storage.set_trial_state_values(trial_id(trial), state)


def heartbeat_enabled(storage) -> bool:
    rdb = _rdb(storage)
    return rdb is not None and rdb.get_heartbeat_interval() is not None


def fail_stale_trials(study) -> None:
    """Fail (and re-queue) trials whose workers stopped beating."""
    import optuna

    if heartbeat_enabled(storage_of(study)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)


class Heartbeats:
    """Beats for every trial this worker holds RUNNING (`add` on ask, `discard` on tell)."""

    def __init__(self, storage):
        self._rdb = _rdb(storage) if heartbeat_enabled(storage) else None
        self._trials: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self._rdb is not None:
            self._thread = threading.Thread(target=self._beat, name="autonorm-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def add(self, trial_id: int) -> None:
        if self._rdb is not None:
            self._rdb.record_heartbeat(trial_id)  # at once: a trial without a beat is never re-queued
            with self._lock:
                self._trials.add(trial_id)

    def discard(self, trial_id: int) -> None:
        with self._lock:
            self._trials.discard(trial_id)

    def _beat(self) -> None:
        interval = self._rdb.get_heartbeat_interval()
        while not self._stop.wait(interval):
            with self._lock:
                trials = list(self._trials)
            for trial_id in trials:
                try:
                    self._rdb.record_heartbeat(trial_id)
                except Exception as exc:  # a lost connection: the next beat tries again
                    log.warning("heartbeat for trial %d failed: %s", trial_id, exc)


# --- what a database needs, kept in the study ------------------------------------------------
FINALIZE_TIMEOUT_S = 900  # a finalizer silent this long (died mid-way) is replaced


def describe_study(study, spec, rows: int, device: dict, versions: dict, protocol: dict) -> None:
    """User attributes for optuna-dashboard and `export_databases` (set once, by the first worker)."""
    if "spec" in study.user_attrs:
        return
    study.set_user_attr("device", device)
    study.set_user_attr("spec", spec.to_dict())
    study.set_user_attr("rows", rows)
    study.set_user_attr("versions", versions)
    study.set_user_attr("protocol", protocol)
    import optuna

    with warnings.catch_warnings():  # optuna-dashboard's axis label (experimental in Optuna 3.2-5)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["median_us"])


def finalizer_role(study, worker: str, trials: int) -> str:
    """Who finalizes the study (call under `claim_lock`): "stored" when its record covers these `trials`
    evaluated candidates, "mine" for the first worker to ask (or the one after a finalizer silent for
    FINALIZE_TIMEOUT_S), else the finalizing worker's id."""
    attrs = study.user_attrs
    if "record" in attrs and attrs.get("record_trials") == trials:
        return "stored"
    current = attrs.get("finalizer")
    if (current and current.get("trials") == trials and current["worker"] != worker
            and time.time() - current["since"] < FINALIZE_TIMEOUT_S):
        return current["worker"]
    study.set_user_attr("finalizer", {"worker": worker, "since": time.time(), "trials": trials})
    return "mine"


def export_databases(storage_url: str, out: Path) -> dict[str, int]:
    """Write `out/<device-slug>.json` from every finalized study in the storage; returns records per file."""
    import optuna

    from ..db import Record, TuningDB

    storage = open_storage(storage_url, Path("unused"))
    dbs: dict[str, TuningDB] = {}
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        attrs = summary.user_attrs
        if "record" not in attrs or "device" not in attrs:
            continue
        slug = attrs["device"]["slug"]
        db = dbs.setdefault(slug, TuningDB(attrs["device"], attrs.get("versions", {}), attrs.get("protocol", {})))
        record = Record.from_json(attrs["record"], f"study {summary.study_name}")
        earlier = db.records.get(record.key)
        if earlier is None or record.date > earlier.date:  # one study per key and template set: newest wins
            db.upsert(record)
    for slug, db in dbs.items():
        db.save(Path(out) / f"{slug}.json")
    return {slug: len(db.records) for slug, db in dbs.items()}
