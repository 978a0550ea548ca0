"""Opening and reading files that someone else names: regular files only, bounded reads.

A FIFO, a device (``/dev/zero``) or a socket may never end or never deliver
anything, and opening a FIFO that has no writer blocks; so a file is opened with
``O_NONBLOCK`` and refused unless the descriptor is a regular file, and reads
stop one byte past the caller's limit so that the caller can tell "too large".
The callers (state files, EIF images, the CLI's inputs) turn the errors into
their own messages.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

__all__ = ["NotRegularFile", "open_regular", "read_capped"]


class NotRegularFile(OSError):
    """The path names something other than a regular file (``mode`` says what)."""

    def __init__(self, path: str | os.PathLike[str], mode: int) -> None:
        super().__init__(errno.EINVAL, "not a regular file", os.fspath(path))
        self.mode = mode


def open_regular(path: str | os.PathLike[str]) -> int:
    """A read-only descriptor of the regular file ``path``; raises OSError (NotRegularFile)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode  # the file opened, not what the name pointed to before
        if not stat.S_ISREG(mode):
            raise NotRegularFile(path, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_capped(source: BinaryIO | int, limit: int) -> bytes:
    """Read ``source`` (a descriptor or a binary stream) to its end, but at most ``limit`` + 1 bytes."""
    chunks: list[bytes] = []
    total = 0
    while total <= limit:
        want = limit + 1 - total
        chunk = os.read(source, want) if isinstance(source, int) else source.read(want)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)
