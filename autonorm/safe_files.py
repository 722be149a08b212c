"""Reading files that anyone could have planted: tuning databases and compile-cache entries.

`read_regular_file` reads only a regular file of bounded size: a FIFO named like a
database must not block the first kernel call, and a link to `/dev/zero` must not
fill the memory. `parse_database_bytes` turns such bytes into JSON only when they are
UTF-8, hold finite numbers and nest no deeper than a database could.
"""
from __future__ import annotations

import json
import math
import os
import stat

from .errors import DatabaseError


class UnsafeFileError(OSError):
    """The path is not a regular file, or is larger than allowed."""


def read_regular_file(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of `path`, which must be a regular file of at most `max_bytes` (links are followed).

    Opened non-blocking, so a FIFO is refused instead of waiting for a writer; the
    type is checked on the open descriptor, so a swap after the check cannot slip
    a device in. Raises `UnsafeFileError` (or the `OSError` of a failed open).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFileError(f"{os.fspath(path)} is not a regular file")
        if info.st_size > max_bytes:
            raise UnsafeFileError(f"{os.fspath(path)} is larger than {max_bytes} bytes ({info.st_size} bytes)")
        chunks, size = [], 0
        while size <= max_bytes:  # the file may grow after fstat: never read past the cap
            chunk = os.read(fd, max_bytes + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:
            raise UnsafeFileError(f"{os.fspath(path)} is larger than {max_bytes} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


# A valid database nests 5 levels (records, record, winner, config, value); anything far deeper is crafted,
# and refusing it up front keeps every later step (schema check, saving) clear of Python's recursion limit.
MAX_NESTING = 16


def shorten(value, limit: int = 120) -> str:
    """A value for an error message, cut to `limit` characters (a crafted file may hold megabytes)."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"non-finite number {shorten(text, 40)}")
    return value


def _refuse_constant(name: str):
    raise ValueError(f"non-finite number {name} (JSON has no NaN or Infinity)")


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    """A JSON object whose keys are all distinct: with a repeated key, the last value would silently win
    (two `winner`s, two `hidden`s), so which one counts would depend on the parser."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(f"the key {shorten(repeated, 40)!r} appears twice in one object")
    return obj


def _structure_problem(obj) -> str | None:
    """Why parsed JSON cannot be a database (too deep, a string with a lone surrogate), or None."""
    stack = [(obj, 1)]
    while stack:  # iterative: a crafted depth must not recurse here either
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_NESTING:
                return f"nested too deeply (more than {MAX_NESTING} levels)"
            items = value.items() if isinstance(value, dict) else ((None, v) for v in value)
            for k, v in items:
                stack.append((v, depth + 1))
                if k is not None:
                    stack.append((k, depth + 1))
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return f"a string holds a lone surrogate escape ({shorten(ascii(value), 40)})"
    return None


def parse_database_bytes(data: bytes, where: str):
    """Parsed JSON of a database file's bytes; a DatabaseError names what is wrong (no schema check yet)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatabaseError(f"{where}: not UTF-8 text (invalid byte at offset {exc.start}); "
                            "a tuning database is UTF-8 JSON") from None
    try:
        obj = json.loads(text, parse_float=_finite, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise DatabaseError(f"{where}: {exc}") from None
    except RecursionError:
        raise DatabaseError(f"{where}: JSON nested too deeply (more than {MAX_NESTING} levels)") from None
    except ValueError as exc:  # JSONDecodeError, a refused number, an integer past Python's digit limit
        raise DatabaseError(f"{where}: not valid JSON (truncated or corrupt?): {shorten(str(exc), 200)}") from None
    problem = _structure_problem(obj)
    if problem is not None:
        raise DatabaseError(f"{where}: {problem}")
    return obj
