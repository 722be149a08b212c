"""Tuning databases: one JSON file per device, versioned, untrusted on load.

A database holds the device identity, software versions, the measurement
protocol and one record per key (op, direction, dtypes, features, hidden,
rows bucket): the winner, runners-up, torch baselines, the template hash of the
winner's backend, how many trials ran and how many candidates failed.

Loading is defensive: only a regular file of at most `MAX_DATABASE_BYTES` is
read; it must be UTF-8 JSON with finite numbers, no lone surrogates and at most
`safe_files.MAX_NESTING` levels; it is validated against `db_schema.json` with jsonschema,
then every config is rebuilt through its backend's `Config.from_dict`, which
accepts only declared domain values, so a database can never carry code into a
template. Every refusal is a `DatabaseError` naming the file and the problem.
Saving is atomic and merges with whatever another process wrote meanwhile
(exclusive lock on a side file, re-read, merge, then autonorm/db_folder.py's atomic
write); it never writes one device's records into another device's file.
"""
from __future__ import annotations

import datetime as _dt
import functools
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .config import Config
from .db_folder import file_lock, side_folder, write_json_atomically
from .errors import AutonormError, BackendUnavailableError, DatabaseError, InvalidConfigError, UnknownBackendError
from .safe_files import parse_database_bytes, read_regular_file, shorten
from .spec import NormSpec, rows_bucket

SCHEMA_VERSION = 1
# A record is about 600 bytes of JSON: 8 MiB holds some 14,000 records, several times a full tuning grid.
# The cap bounds memory and time (schema validation costs about 1 ms a record on a 2-core VM).
MAX_DATABASE_BYTES = 8 << 20


@functools.cache
def schema() -> dict:
    return json.loads(resources.files("autonorm").joinpath("db_schema.json").read_text())


@functools.cache
def _strict_validator():
    """The schema's validator with two Python-specific holes closed: "integer" takes only ints (JSON Schema
    lets `64.0` pass, which would reach the kernels as a float hidden size), and a "pattern" must match the
    whole string (`$` in Python's `re` also matches before a final newline: a slug `"cpu\n"`)."""
    import re

    import jsonschema

    base = jsonschema.Draft202012Validator
    integers = base.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool))

    def whole_pattern(validator, pattern, instance, schema):
        if not validator.is_type(instance, "string"):
            return
        anchored = pattern.startswith("^") and pattern.endswith("$") and not pattern.endswith("\\$")
        if not (re.fullmatch(pattern[1:-1], instance) if anchored else re.search(pattern, instance)):
            yield jsonschema.ValidationError(f"{shorten(instance, 60)!r} does not match {pattern!r}")

    return jsonschema.validators.extend(base, {"pattern": whole_pattern}, type_checker=integers)


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

    def problem(self) -> str | None:
        """Why no tuner could have written this key, or None: the schema passes `rows_bucket: 3` (no
        power of two, so no row count ever looks it up), `weight+weight` and other tags autonorm never
        writes, and dtype or feature combinations that are no spec."""
        if rows_bucket(self.rows_bucket) != self.rows_bucket:
            return f"rows_bucket {self.rows_bucket} is not a power of two (the buckets are 1, 2, 4, ...)"
        try:
            spec = self.spec()
        except ValueError as exc:
            return f"not a valid spec: {exc}"
        if spec.features != self.features:
            return f"features {self.features!r} are not written as autonorm writes them ({spec.features!r})"
        return None

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
    quality: dict | None = None  # the tuner's measurement-quality verdict (autonorm/tune/quality.py), if any
    profile: dict | None = None  # the winner's compiled resources on this GPU (`autonorm.audit`), if audited
    # How complete the search behind the winner was: "exhaustive" (every candidate evaluated), "converged"
    # (patience: no gain for a while) or "budget" (the trial or time budget ran out first); None: not recorded
    # (databases written before the field), which reads as unknown.
    completeness: str | None = None

    def to_json(self) -> dict:
        doc = {"key": self.key.to_json(), "winner": self.winner.to_json(),
               "runners_up": [e.to_json() for e in self.runners_up], "baselines": self.baselines,
               "template_hash": self.template_hash, "trials": self.trials, "failed": self.failed,
               "date": self.date}
        if self.quality is not None:
            doc["quality"] = self.quality
        if self.profile is not None:
            doc["profile"] = self.profile
        if self.completeness is not None:
            doc["completeness"] = self.completeness
        return doc

    @classmethod
    def from_json(cls, obj: dict, where: str = "record") -> "Record":
        key = RecordKey(**obj["key"])
        where = f"{where} ({key.short()})"
        problem = key.problem()
        if problem:
            raise DatabaseError(f"{where}: {problem}")
        try:
            parse_date(obj["date"])
        except ValueError:
            raise DatabaseError(f"{where}: date {shorten(obj['date'], 40)!r} is not an ISO 8601 date-time") from None
        return cls(key, Entry.from_json(obj["winner"], f"{where} winner"),
                   [Entry.from_json(e, f"{where} runner-up {i}") for i, e in enumerate(obj["runners_up"])],
                   dict(obj["baselines"]), obj["template_hash"], obj["trials"], obj["failed"], obj["date"],
                   obj.get("quality"), obj.get("profile"), obj.get("completeness"))


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def parse_date(text: str) -> _dt.datetime:
    """A record's date as an aware datetime (a date without a zone is taken as UTC)."""
    date = _dt.datetime.fromisoformat(text)
    return date if date.tzinfo is not None else date.replace(tzinfo=_dt.timezone.utc)


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
        raise DatabaseError(f"{where}: config {shorten(data)} refused by backend {backend!r}: "
                            f"{shorten(str(exc))}") from exc


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
            raise DatabaseError(f"{where}: unknown schema_version {shorten(obj['schema_version'])} "
                                f"(this autonorm reads version {SCHEMA_VERSION})")
        try:
            _strict_validator()(schema(), format_checker=jsonschema.FormatChecker()).validate(obj)
        except jsonschema.ValidationError as exc:
            path = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
            raise DatabaseError(f"{where}: schema violation at {shorten(path)}: {shorten(exc.message, 200)}") from None
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
            data = read_regular_file(path, MAX_DATABASE_BYTES)
        except OSError as exc:
            raise DatabaseError(f"{path}: cannot read tuning database: {exc.strerror or exc}") from exc
        return cls.from_json(parse_database_bytes(data, str(path)), str(path))

    # --- editing ----------------------------------------------------------------
    def upsert(self, record: Record) -> None:
        self.records[record.key] = record

    def merge(self, other: "TuningDB") -> "TuningDB":
        """Add `other`'s records; on an equal key the `preferred` record stays (whatever the order); returns self."""
        self._check_same_device(other, "cannot merge databases of different devices")
        for key, record in other.records.items():
            mine = self.records.get(key)
            self.records[key] = record if mine is None else preferred(mine, record)
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
        with file_lock(side_folder(path.parent) / (path.name + ".lock")):
            if path.exists():
                on_disk = TuningDB.load(path)
                on_disk._check_same_device(self, f"refusing to write into {path}: it holds another device's "
                                                 "records")
                self.records = {**on_disk.records, **self.records}
            write_json_atomically(path, self.to_json())

    def _check_same_device(self, other: "TuningDB", what: str) -> None:
        if self.device.get("slug") != other.device.get("slug"):
            raise DatabaseError(f"{what}: {self.device.get('slug')!r} and {other.device.get('slug')!r}")


MERGE_RULE = ("Of two records of one key, the one tuned for its backend's current template hash wins; if both "
              "or neither are, the faster winner wins when both measured the same template hash, else the newer "
              "tuning date; the file order never decides.")


def _current_hash(record: Record) -> bool:
    """Whether `record` was tuned for the kernels its backend generates today."""
    from .backends import get_backend

    try:
        return record.template_hash == get_backend(record.winner.backend).template_hash()
    except AutonormError:
        return False


def _tuned_at(record: Record) -> _dt.datetime:
    try:
        return parse_date(record.date)
    except ValueError:  # a record built in code without a date: older than any dated one
        return _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)


def preferred(a: Record, b: Record) -> Record:
    """The record `merge` keeps for one key (MERGE_RULE); symmetric, so input order never matters."""

    def rank(r: Record):
        # Same kernels: the faster measurement found the better config. Other kernels: times are not
        # comparable, and the newer tuning describes the newer templates.
        speed = -r.winner.median_us if a.template_hash == b.template_hash else 0.0
        return (_current_hash(r), speed, _tuned_at(r),
                json.dumps(r.to_json(), sort_keys=True))  # last: any fixed order, for exact ties

    return max(a, b, key=rank)
