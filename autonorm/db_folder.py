"""A database folder's shared files: a database written atomically, the exclusive lock its writers take, and
the side folder that holds locks and tuning journals apart from the databases users ship. Several processes
(tuners of a fleet, `autonorm db merge`) write one folder at once: a reader never sees half a file, and a
writer never loses another's records (TuningDB.save re-reads under the lock before it writes)."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


def write_json_atomically(path: Path, doc) -> None:
    """`doc` as indented JSON in `path`, by a synced temp file beside it and `os.replace`: `path` holds the old
    file or the new one, never a part, even if the process dies midway."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: a shared database must be readable
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def side_folder(folder: Path) -> Path:
    """`folder/.autonorm-journal/`: locks and Optuna journals, kept apart from the databases users ship
    and ignored by git (the folder holds a `.gitignore` of `*`)."""
    side = Path(folder) / ".autonorm-journal"
    if not side.is_dir():
        side.mkdir(parents=True, exist_ok=True)
        (side / ".gitignore").write_text("# locks and tuning journals of autonorm: never commit them\n*\n")
    return side


@contextlib.contextmanager
def file_lock(lock_path: Path | None):
    """Hold an exclusive lock on `lock_path` (no-op for None): one writer at a time, on any OS (filelock)."""
    if lock_path is None:
        yield
        return
    from filelock import FileLock

    with FileLock(str(lock_path)):
        yield
