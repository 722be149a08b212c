"""Every environment knob autonorm reads, in one place, all prefixed `AUTONORM_`.

Values are read when asked for (not cached at import), so a test or a user can
change them at run time; the dispatcher reads them only when it resolves a new
key, never on the steady-state call path, and `autonorm.reset()` forgets what it
resolved so that new values take effect.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

_TRUE = {"1", "true", "yes", "on"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def backend() -> str | None:
    """AUTONORM_BACKEND: force one backend by name (e.g. `triton`, `numba-cpu`, `torch`)."""
    value = os.environ.get("AUTONORM_BACKEND", "").strip()
    return value or None


def db_paths() -> list[Path]:
    """AUTONORM_DB_PATH: extra database files or folders (os.pathsep separated); later ones win."""
    raw = os.environ.get("AUTONORM_DB_PATH", "")
    return [Path(p) for p in raw.split(os.pathsep) if p.strip()]


def disabled() -> bool:
    """AUTONORM_DISABLE=1: every call goes to torch eager (a kill switch for debugging)."""
    return _flag("AUTONORM_DISABLE")


def log_choices() -> bool:
    """AUTONORM_LOG=1: log each new (key -> backend, config, rung) resolution once."""
    return _flag("AUTONORM_LOG")


def skip_first_use_check() -> bool:
    """AUTONORM_SKIP_FIRST_USE_CHECK=1: use a kernel no tuning run verified (heuristic, nearest or same-arch
    record, tuned now) without checking it against torch on the first rows of its first call."""
    return _flag("AUTONORM_SKIP_FIRST_USE_CHECK")


def tune_on_miss() -> bool:
    """AUTONORM_TUNE_ON_MISS=1: tune a key that no database covers, at first use."""
    return _flag("AUTONORM_TUNE_ON_MISS")


def _dir_from_env(name: str) -> Path | None:
    """The folder an environment variable names, or None when it is unset, empty or relative.

    The XDG base-directory rules say to ignore an empty or relative value; autonorm's own folder knobs
    follow the same rule, because a relative folder moves with the working directory (a cache folder
    named `autonorm` made in the project root would shadow the package on the next import). A relative
    AUTONORM_* value is ignored with a warning: someone set it on purpose."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    path = Path(raw).expanduser()
    if path.is_absolute():
        return path
    if name.startswith("AUTONORM_"):
        warnings.warn(f"autonorm: {name}={raw!r} is a relative path, which would move with the working "
                      f"directory; ignored (give an absolute path)", RuntimeWarning, stacklevel=3)
    return None


def cache_dir() -> Path:
    """AUTONORM_CACHE_DIR: where compiled kernels and scratch files are kept. Default: `$XDG_CACHE_HOME/autonorm`,
    else `~/.cache/autonorm` (an empty or relative value of either variable counts as unset)."""
    xdg = _dir_from_env("XDG_CACHE_HOME") or Path.home() / ".cache"
    return _dir_from_env("AUTONORM_CACHE_DIR") or xdg / "autonorm"


def user_db_dir() -> Path:
    """AUTONORM_USER_DB_DIR: this user's tuning databases, which `autonorm tune` writes by default and the
    dispatcher reads. Default: the platform's per-user data folder + `autonorm` (Linux:
    `$XDG_DATA_HOME/autonorm`, else `~/.local/share/autonorm`; macOS: `~/Library/Application Support/autonorm`;
    Windows: `%LOCALAPPDATA%\\autonorm`)."""
    chosen = _dir_from_env("AUTONORM_USER_DB_DIR")  # empty or relative: unset, as for the cache folder
    if chosen:
        return chosen
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "autonorm"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "autonorm"
    return (_dir_from_env("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "autonorm"


def verify_db() -> bool:
    """AUTONORM_VERIFY_DB=1: give database kernels, exact records too, the first-use check (dispatch.py)."""
    return _flag("AUTONORM_VERIFY_DB")


# Triton's FP fusion (a*b + c contracted to one FMA) is on by default up to Triton 3.9, which warns that
# 3.10 turns it off. Every kernel, tolerance and tuning record here was made with it on (one rounding
# instead of two: more accurate, and fewer instructions), so autonorm pins it on for every Triton
# version; a TRITON_DEFAULT_FP_FUSION the user set is kept.
TRITON_FP_FUSION = "1"


def pin_triton_fp_fusion() -> str:
    """TRITON_DEFAULT_FP_FUSION: set to TRITON_FP_FUSION unless already set; returns the value in force."""
    return os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", TRITON_FP_FUSION)
