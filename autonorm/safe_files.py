"""Reading files that anyone could have planted: tuning databases and compile-cache entries.

`read_regular_file` reads only a regular file of bounded size: a FIFO named like a
database must not block the first kernel call, and a link to `/dev/zero` must not
fill the memory.
"""
from __future__ import annotations

import os
import stat


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
