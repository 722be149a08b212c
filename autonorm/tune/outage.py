"""A fleet's storage outage: wait it out for a bounded time, then stop in one line.

A PostgreSQL restart or a network blip must not kill a worker whose storage call falls in it, nor
end it in Optuna's 60-line traceback, whose last line (StorageInternalError) blames "invalid data
... exceeding max length" with the real cause, `Connection refused`, buried in the chain. Every
call of the RDB storage (`patient_storage`) and the claim lock's connection (`with_retry`) is
tried again with backoff while the connection is lost or refused, for up to STORAGE_OUTAGE_S;
past that, `StorageUnavailableError` names the storage and the connection error and says that
the same command resumes. Nothing is lost either way: a trial the worker held returns to the
queue by heartbeat.
"""
from __future__ import annotations

import inspect
import logging
import time

from ..errors import AutonormError

log = logging.getLogger("autonorm.tune")

# How long a worker waits out a storage that stopped answering (a database restart takes seconds) before it
# stops; a trial it held returns to the queue by heartbeat, so stopping loses nothing.
STORAGE_OUTAGE_S = 120.0
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 10.0  # the backoff between tries: doubling from the first to the most


class StorageUnavailableError(AutonormError):
    """The tuning storage stayed unreachable past STORAGE_OUTAGE_S."""


def _where(url: str) -> str:
    return repr(url.split("@")[-1])  # host/database without the credentials


def connection_error(exc: BaseException | None) -> BaseException | None:
    """The lost or refused connection in `exc`'s chain, or None. Optuna reports one as StorageInternalError
    ("invalid data ... exceeding max length"), with the real cause a link or two down the chain."""
    import sqlalchemy.exc

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                            sqlalchemy.exc.DisconnectionError)):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def with_retry(call, where: str):
    """`call()`, tried again with backoff while the storage's connection is lost or refused, for up to
    STORAGE_OUTAGE_S in all; then StorageUnavailableError, one line. Other errors pass through at once."""
    deadline, delay = None, RETRY_FIRST_S
    while True:
        try:
            return call()
        except Exception as exc:
            lost = connection_error(exc)
            if lost is None:
                raise
            now = time.monotonic()
            deadline = deadline if deadline is not None else now + STORAGE_OUTAGE_S
            cause = str(getattr(lost, "orig", None) or lost).strip().splitlines()[0]
            if now >= deadline:
                raise StorageUnavailableError(
                    f"storage {where} unreachable for {STORAGE_OUTAGE_S:.0f} s ({cause}); nothing is lost: "
                    "run the same command again to resume") from None
            log.warning("storage %s: %s; retrying for up to %.0f s more", where, cause, deadline - now)
            time.sleep(min(delay, deadline - now))
            delay = min(2 * delay, RETRY_MAX_S)


def _patient(method):
    def call(self, *args, **kwargs):
        return with_retry(lambda: method(self, *args, **kwargs), self.where)
    call.__name__, call.__doc__ = method.__name__, method.__doc__
    return call


def _patient_storage_class():
    """Optuna's cached RDB storage (what `create_study` makes of an RDBStorage: it must stay a BaseHeartbeat,
    or Optuna turns heartbeats off) with every public call wrapped in `with_retry`."""
    from optuna.storages._cached_storage import _CachedStorage

    methods = {name: _patient(fn) for name, fn in inspect.getmembers(_CachedStorage, inspect.isfunction)
               if not name.startswith("_")}
    return type("PatientStorage", (_CachedStorage,), {**methods, "__doc__": "An RDB storage that waits out "
                                                      "an outage of up to STORAGE_OUTAGE_S (fleet.py)."})


def patient_storage(rdb, url: str):
    storage = _patient_storage_class()(rdb)
    storage.where = _where(url)
    return storage
