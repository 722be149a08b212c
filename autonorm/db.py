"""Tuning databases (DESIGN §6): one JSON file per device, versioned, untrusted on load.

A database holds the device identity, software versions, the measurement
protocol and one record per key (op, direction, dtypes, features, hidden,
rows bucket): the winner, runners-up, torch baselines, the template hash of the
winner's backend, how many trials ran and how many candidates failed.

Loading is defensive: the file is validated against `db_schema.json` with
jsonschema, then every config is rebuilt through its backend's
`Config.from_dict`, which accepts only declared domain values, so a database
can never carry code into a template. Saving is atomic and merges with whatever
another process wrote meanwhile (exclusive lock on a side file, re-read, merge,
temp file, `os.replace`).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import json
import os
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .config import Config
from .errors import BackendUnavailableError, DatabaseError, InvalidConfigError, UnknownBackendError
from .spec import NormSpec

SCHEMA_VERSION = 1


@functools.cache
def schema() -> dict:
    return json.loads(resources.files("autonorm").joinpath("db_schema.json").read_text())


@dataclass(frozen=True, order=True)
class RecordKey:
    op: str
    direction: str
    x_dtype: str
    w_dtype: str
    features: str
    hidden: int
    rows_bucket: int

    @classmethod
    def of(cls, spec: NormSpec, rows_bucket: int) -> "RecordKey":
        return cls(spec.op, spec.direction, spec.x_dtype, spec.w_dtype, spec.features, spec.hidden, rows_bucket)

    def to_json(self) -> dict:
        return {"op": self.op, "direction": self.direction, "x_dtype": self.x_dtype, "w_dtype": self.w_dtype,
                "features": self.features, "hidden": self.hidden, "rows_bucket": self.rows_bucket}

    def spec(self) -> NormSpec:
        """The NormSpec this key was tuned for."""
        return NormSpec(self.op, self.direction, self.x_dtype, self.w_dtype, self.hidden,
                        **NormSpec.feature_kwargs(self.features))

    def short(self) -> str:
        return (f"{self.op}.{self.direction} x={self.x_dtype} w={self.w_dtype} N={self.hidden} "
                f"rows<={self.rows_bucket} [{self.features}]")


@dataclass
class Entry:
    """One measured candidate: backend, config and its timing."""

    backend: str
    config: Config
    median_us: float
    p20_us: float
    p80_us: float
    gbps: float
    pct_copy_bw: float | None

    def to_json(self) -> dict:
        return {"backend": self.backend, "config": self.config.to_dict(), "median_us": self.median_us,
                "p20_us": self.p20_us, "p80_us": self.p80_us, "gbps": self.gbps, "pct_copy_bw": self.pct_copy_bw}

    @classmethod
    def from_json(cls, obj: dict, where: str = "entry") -> "Entry":
        return cls(obj["backend"], config_from_json(obj["backend"], obj["config"], where),
                   obj["median_us"], obj["p20_us"], obj["p80_us"], obj["gbps"], obj["pct_copy_bw"])


@dataclass
class Record:
    key: RecordKey
    winner: Entry
    runners_up: list[Entry] = field(default_factory=list)
    baselines: dict = field(default_factory=lambda: {"torch_eager": None, "torch_compile": None})
    template_hash: str = ""
    trials: int = 0
    failed: int = 0
    date: str = ""

    def to_json(self) -> dict:
        return {"key": self.key.to_json(), "winner": self.winner.to_json(),
                "runners_up": [e.to_json() for e in self.runners_up], "baselines": self.baselines,
                "template_hash": self.template_hash, "trials": self.trials, "failed": self.failed,
                "date": self.date}

    @classmethod
    def from_json(cls, obj: dict, where: str = "record") -> "Record":
        key = RecordKey(**obj["key"])
        where = f"{where} ({key.short()})"
        return cls(key, Entry.from_json(obj["winner"], f"{where} winner"),
                   [Entry.from_json(e, f"{where} runner-up {i}") for i, e in enumerate(obj["runners_up"])],
                   dict(obj["baselines"]), obj["template_hash"], obj["trials"], obj["failed"], obj["date"])


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def config_from_json(backend: str, data: Any, where: str) -> Config:
    """Rebuild a config from untrusted data through its backend's declared domain."""
    from .backends import BACKENDS, get_backend

    if backend not in BACKENDS:
        raise DatabaseError(f"{where}: unknown backend {backend!r}; known backends: {', '.join(BACKENDS)}")
    try:
        config_cls = get_backend(backend).config_cls
    except (BackendUnavailableError, UnknownBackendError) as exc:
        raise DatabaseError(f"{where}: backend {backend!r} cannot be loaded to check its config: {exc}") from exc
    try:
        return config_cls.from_dict(data)
    except (InvalidConfigError, TypeError) as exc:
        raise DatabaseError(f"{where}: config {data!r} refused by backend {backend!r}: {exc}") from exc


class TuningDB:
    """One device's records, keyed by `RecordKey`."""

    def __init__(self, device: dict, versions: dict, protocol: dict, records: dict[RecordKey, Record] | None = None):
        self.device = dict(device)
        self.versions = dict(versions)
        self.protocol = dict(protocol)
        self.records: dict[RecordKey, Record] = dict(records or {})

    # --- JSON -----------------------------------------------------------------
    @classmethod
    def from_json(cls, obj: Any, where: str = "database") -> "TuningDB":
        import jsonschema

        if isinstance(obj, dict) and "schema_version" in obj and obj["schema_version"] != SCHEMA_VERSION:
            raise DatabaseError(f"{where}: unknown schema_version {obj['schema_version']!r} "
                                f"(this autonorm reads version {SCHEMA_VERSION})")
        try:
            jsonschema.validate(obj, schema(), format_checker=jsonschema.FormatChecker())
        except jsonschema.ValidationError as exc:
            path = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
            raise DatabaseError(f"{where}: schema violation at {path}: {exc.message}") from None
        records: dict[RecordKey, Record] = {}
        for i, rec in enumerate(obj["records"]):
            record = Record.from_json(rec, f"{where}: record {i}")
            if record.key in records:
                raise DatabaseError(f"{where}: record {i} repeats key {record.key.short()}")
            records[record.key] = record
        return cls(obj["device"], obj["versions"], obj["protocol"], records)

    def to_json(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "device": self.device, "versions": self.versions,
                "protocol": self.protocol, "records": [self.records[k].to_json() for k in sorted(self.records)]}

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TuningDB":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise DatabaseError(f"{path}: cannot read tuning database: {exc.strerror or exc}") from exc
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatabaseError(f"{path}: not valid JSON (truncated or corrupt?): {exc}") from None
        return cls.from_json(obj, str(path))

    # --- editing ----------------------------------------------------------------
    def upsert(self, record: Record) -> None:
        self.records[record.key] = record

    def merge(self, other: "TuningDB") -> "TuningDB":
        """Add `other`'s records (they win on equal keys); returns self."""
        if self.device.get("slug") != other.device.get("slug"):
            raise DatabaseError(f"cannot merge databases of different devices: "
                                f"{self.device.get('slug')!r} and {other.device.get('slug')!r}")
        self.records.update(other.records)
        # Newer metadata describes the merged-in records; keep ours where it has none.
        self.versions = {**self.versions, **other.versions}
        self.protocol = {**self.protocol, **other.protocol}
        if other.device.get("copy_gbps") is not None:
            self.device["copy_gbps"] = other.device["copy_gbps"]
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically, merged with what is on disk now (concurrent writers keep their records)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(path.with_name(path.name + ".lock")):
            if path.exists():
                on_disk = TuningDB.load(path)
                self.records = {**on_disk.records, **self.records}
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(self.to_json(), f, indent=1)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise


@contextlib.contextmanager
def file_lock(lock_path: Path | None):
    """Hold an exclusive lock on `lock_path` (no-op for None): one writer at a time, on any OS (filelock)."""
    if lock_path is None:
        yield
        return
    from filelock import FileLock

    with FileLock(str(lock_path)):
        yield
