"""Tuning databases at run time: which files, in which order, and which records may be used.

Sources, earliest first (a later record with the same device and key overrides
an earlier one):

1. the shipped databases, `*.json` in the package `autonorm.tuning_db`;
2. this user's databases, `*.json` in `AUTONORM_USER_DB_DIR` (by default the
   platform's per-user data folder, e.g. `~/.local/share/autonorm`): where
   `autonorm tune` writes unless told otherwise, so what was tuned on this
   machine overrides what shipped;
3. with AUTONORM_TUNE_ON_MISS=1 only: the records tuned at first use, kept in
   `<AUTONORM_CACHE_DIR>/tuned/<device-slug>.json`;
4. files and folders (every `*.json` inside, by name) from `AUTONORM_DB_PATH`;
5. files given to `autonorm.load_db(path)`, in call order.

`autonorm db where` lists these files in this order. In a folder, a JSON file
that is not a tuning database (no `schema_version`) is skipped with a warning;
a database that is corrupt is an error.

Nothing is read at import: files are parsed and validated (`TuningDB.load`) at
the first resolution that needs them, and again after `autonorm.reset()`. There,
inside a training step, a file that cannot be used (missing, corrupt, not a
regular file, too large) is skipped with one warning naming it and why, and the
ladder goes on with the other sources; `autonorm.load_db` and `autonorm db
validate` stay strict and raise a `DatabaseError`. A
record is usable only when its backend is known and available here and its
template hash equals the backend's current one; any other record is skipped,
with one warning per file that counts the skipped records and says why.
Records are checked per device table, only when a resolution for that device
consults them, so GPU databases never warn on a CPU-only machine.
"""
from __future__ import annotations

import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from . import settings
from .device import slug_aliases, stale_compiler
from .errors import AutonormError, DatabaseError


@dataclass
class DeviceTable:
    """Every usable record for one device (by slug), merged over all sources."""

    device: dict
    records: dict = field(default_factory=dict)  # RecordKey -> Record
    sources: list = field(default_factory=list)  # paths, earliest first

    def by_problem(self, key) -> list:
        """Records for the same op, direction, dtypes and features as `key` (any hidden, any rows)."""
        return [(k, r) for k, r in self.records.items()
                if (k.op, k.direction, k.x_dtype, k.w_dtype, k.features)
                == (key.op, key.direction, key.x_dtype, key.w_dtype, key.features)]


_lock = threading.RLock()
_user_paths: list[Path] = []          # from autonorm.load_db, kept across reset()
_files: list | None = None            # [(path, TuningDB)] in override order, parsed lazily
_tables: dict[str, DeviceTable] = {}  # slug -> usable records, built when first consulted


def _shipped() -> list[Path]:
    root = resources.files("autonorm.tuning_db")
    return sorted((Path(str(e)) for e in root.iterdir() if e.name.endswith(".json")), key=lambda p: p.name)


def tuned_path(slug: str) -> Path:
    """Where AUTONORM_TUNE_ON_MISS=1 keeps the records it tuned for device `slug`."""
    return settings.cache_dir() / "tuned" / f"{slug}.json"


def _expand(path: Path, origin: str) -> list[Path]:
    if path.is_dir():
        return sorted(path.glob("*.json"))
    if not path.is_file():
        raise DatabaseError(f"{origin}: tuning database {str(path)!r} does not exist or is not a regular file")
    return [path]


def sources(*, lenient: bool = False) -> list[tuple[str, Path, bool]]:
    """(origin, file, found in a folder) of every database the dispatcher loads, earliest first.

    Lists folders only; nothing is parsed. A later file overrides an earlier one on equal keys.
    `lenient`: an entry that cannot be listed is skipped with a warning instead of raising."""
    found = [("shipped", p, True) for p in _shipped()]
    user = settings.user_db_dir()
    found += [("user", p, True) for p in (sorted(user.glob("*.json")) if user.is_dir() else [])]
    if settings.tune_on_miss():
        found += [("AUTONORM_TUNE_ON_MISS", p, True) for p in sorted((settings.cache_dir() / "tuned").glob("*.json"))]
    for origin, paths in (("AUTONORM_DB_PATH", settings.db_paths()), ("autonorm.load_db", list(_user_paths))):
        for path in paths:
            try:
                expanded = _expand(path, origin)
            except (DatabaseError, OSError) as exc:  # OSError: a name too long, a folder that cannot be listed
                if not lenient:
                    raise
                why = (exc if isinstance(exc, DatabaseError)
                       else f"{origin} entry {str(path)[:200]!r}: {exc.strerror or exc}")
                warnings.warn(f"autonorm: ignoring {why}", RuntimeWarning, stacklevel=3)
                continue
            found += [(origin, p, p != path) for p in expanded]
    return found


def _read_all(paths: list[tuple[Path, bool]], *, lenient: bool = False) -> list:
    """[(path, TuningDB)] for (path, found in a folder) pairs; a folder's non-database JSON is skipped.

    `lenient` (the dispatcher, inside a training step): a file that cannot be used is skipped with one
    warning naming it, since the ladder has other rungs; otherwise (`load_db`) it raises."""
    loaded = []
    for path, in_folder in paths:
        try:
            loaded.append((path, _read(path)))
        except Exception as exc:  # untrusted input: whatever it breaks, this file is skipped, not the call
            if in_folder and isinstance(exc, DatabaseError) and not_a_database(path):
                warnings.warn(f"autonorm: skipped {str(path)!r}: a JSON file that is not a tuning database "
                              f"(no schema_version)", RuntimeWarning, stacklevel=3)
            elif lenient:
                why = str(exc) if isinstance(exc, DatabaseError) else f"{str(path)!r}: {type(exc).__name__}: {exc}"
                warnings.warn(f"autonorm: ignoring tuning database {why}", RuntimeWarning, stacklevel=3)
            elif isinstance(exc, DatabaseError):
                raise
            else:
                raise DatabaseError(f"tuning database {str(path)!r}: {type(exc).__name__}: {exc}") from exc
    return loaded


def not_a_database(path: Path) -> bool:
    """True for a readable JSON file that does not even claim to be a tuning database (e.g. bench output)."""
    import json

    from .db import MAX_DATABASE_BYTES
    from .safe_files import read_regular_file

    try:
        obj = json.loads(read_regular_file(path, MAX_DATABASE_BYTES).decode("utf-8"))  # as strict as TuningDB.load
    except (OSError, ValueError, RecursionError):
        return False
    return not (isinstance(obj, dict) and "schema_version" in obj)


def _read(path: Path):
    from .db import TuningDB

    try:
        return TuningDB.load(path)
    except DatabaseError as exc:
        if str(path) in str(exc):
            raise
        raise DatabaseError(f"tuning database {str(path)!r}: {exc}") from exc


def load_db(path) -> object:
    """Add a tuning database file (or a folder of them) on top of the others; returns the last one read.

    The file is validated now (a `DatabaseError` names the problem) and every
    earlier resolution is forgotten, so the next call sees the new records.
    """
    path = Path(path)
    dbs = _read_all([(p, p != path) for p in _expand(path, "autonorm.load_db")])
    if not dbs:
        raise DatabaseError(f"autonorm.load_db: folder {str(path)!r} holds no *.json tuning database")
    with _lock:
        _user_paths.append(path)
        if _files is not None:
            _files.extend(dbs)
        _tables.clear()
    for hook in _on_load:
        hook()
    return dbs[-1][1]


# Called after `load_db` adds a database. The dispatcher registers its reset here (it imports this
# module, so this one never imports the dispatcher).
_on_load: list = []


def on_load(hook) -> None:
    """Call `hook()` after every `load_db`."""
    _on_load.append(hook)


def forget(*, user_paths: bool = False) -> None:
    """Drop parsed files and tables (re-read at the next resolution); `user_paths` also forgets load_db()."""
    global _files
    with _lock:
        _files = None
        _tables.clear()
        if user_paths:
            _user_paths.clear()


def files() -> list:
    """[(path, TuningDB)] of every source, earliest first (parsed on first call)."""
    global _files
    with _lock:
        if _files is None:
            _files = _read_all([(path, in_folder) for _, path, in_folder in sources(lenient=True)], lenient=True)
        return _files


def why_unusable(record, backend_checks: dict) -> str | None:
    """None when a record may be used here, else why not (one short phrase); `backend_checks` caches each
    backend's verdict across records (name -> (why it cannot run or None, its template hash))."""
    from .backends import get_backend

    name = record.winner.backend
    if name not in backend_checks:
        try:
            backend = get_backend(name)
            reason = backend.unavailable_reason()
            backend_checks[name] = (f"backend {name} unavailable", None) if reason else (None, backend.template_hash())
        except AutonormError:
            backend_checks[name] = (f"backend {name} unknown or failed to import", None)
    problem, current_hash = backend_checks[name]
    if problem:
        return problem
    if record.template_hash != current_hash:
        return f"stale template hash for {name} (kernels changed since tuning; re-tune)"
    return None


def table(slug: str) -> DeviceTable | None:
    """The usable records of the device `slug` (None when no database covers it)."""
    with _lock:
        if slug in _tables:
            return _tables[slug]
        tbl = None
        checks: dict = {}
        for path, db in files():
            if db.device.get("slug") not in slug_aliases(slug):
                continue
            tbl = tbl or DeviceTable(dict(db.device))
            tbl.device = dict(db.device)
            tbl.sources.append(path)
            skipped, stale = Counter(), Counter()
            for key, record in db.records.items():
                problem = why_unusable(record, checks)
                if problem is None:
                    tbl.records[key] = record
                    stale[stale_compiler(record.winner.backend, db.versions)] += 1
                else:
                    skipped[problem] += 1
            stale.pop(None, None)
            if stale:  # still used (the kernels are correct), once per database
                why = "; ".join(f"{n} x {change}" for change, n in stale.items())
                warnings.warn(f"autonorm: {sum(stale.values())} records of tuning database {str(path)!r} were tuned "
                              f"under another compiler ({why}); still used, re-tune for the best configs",
                              RuntimeWarning, stacklevel=2)
            if skipped:
                why = "; ".join(f"{n} x {p}" for p, n in skipped.items())
                warnings.warn(f"autonorm: skipped {sum(skipped.values())} of {len(db.records)} records "
                              f"of tuning database {str(path)!r}: {why}", RuntimeWarning, stacklevel=2)
        _tables[slug] = tbl
        return tbl


def same_architecture(device: dict) -> list[DeviceTable]:
    """Tables of other GPUs with the compute capability of `device` (by slug, for a stable order)."""
    cc = device.get("compute_capability")
    if device.get("kind") != "cuda" or not cc:
        return []
    slugs = sorted({db.device.get("slug") for _, db in files()
                    if db.device.get("kind") == "cuda" and db.device.get("compute_capability") == cc
                    and db.device.get("slug") != device.get("slug")})
    return [t for t in (table(s) for s in slugs) if t is not None and t.records]
