"""Optuna journal files of `autonorm tune`: refuse a path that is not one, repair a line cut short.

Optuna's `JournalFileBackend` appends one JSON object per line. Left alone, two things would
destroy data: `--storage cpu.json` would append journal lines into a tuning database, and a
write cut by a full disk leaves a partial last line that, once the next line is appended after
it, makes the journal unreadable for every later run. This module refuses the first and repairs
the second.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from ..errors import AutonormError

# Optuna writes every log with `op_code` as its first key, with compact separators.
_OP_PREFIX = b'{"op_code":'


class JournalError(AutonormError, ValueError):
    """A journal path that is not an Optuna journal, or a journal corrupted before its last line."""


def prepare_journal(path: Path) -> None:
    """Check that `path` may hold an Optuna journal and drop a last line cut short (with a warning).

    Refused with a `JournalError` naming the file: a `.json` path (tuning databases
    live there), an existing file that is not a regular file or not a journal, and
    a journal with a corrupt line before its last (which Optuna cannot read).
    """
    if path.suffix == ".json":
        raise JournalError(f"journal {path}: a .json path is a tuning database's name and journal lines would "
                           f"destroy it; give the journal its own name, e.g. {path.with_suffix('.journal')}")
    if not os.path.lexists(path):
        return
    if not path.is_file():
        raise JournalError(f"journal {path}: not a regular file, so not an Optuna journal")
    from optuna.storages.journal import JournalFileSymlinkLock

    lock = JournalFileSymlinkLock(str(path))  # Optuna's own lock: no append can be half-written while we look
    lock.acquire()
    try:
        _repair(path)
    finally:
        lock.release()


def _repair(path: Path) -> None:
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        return
    if not data.startswith(_OP_PREFIX):
        raise JournalError(f"journal {path}: exists and is not an Optuna journal (its first line is not a "
                           "journal entry); refusing to append to it")
    *lines, tail = data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not isinstance(entry, dict) or "op_code" not in entry:
            raise JournalError(f"journal {path}: line {number} is corrupt (a write cut short, then more lines "
                               f"appended), so Optuna cannot read it; keep the lines before {number} "
                               f"(`head -n {number - 1}`) in a new journal, or move this one away")
    if tail:  # a last line without its newline: the write the disk (or a kill) cut short
        with open(path, "r+b") as f:
            f.truncate(len(data) - len(tail))
        warnings.warn(f"autonorm: journal {path}: dropped a last line cut short ({len(tail)} bytes; a full disk "
                      "or a killed write); the trials before it are kept", RuntimeWarning, stacklevel=3)
