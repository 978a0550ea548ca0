"""Reading the CLI's input files: bounded, and only what can end.

Every file the ``nsm`` commands read (a document, root certificates, user data,
a public key, extend data, a state snapshot) goes through :func:`read_input`:

* a regular file, read up to ``limit`` bytes -- a larger one is refused, so a
  huge file or one that keeps growing cannot exhaust memory;
* ``-`` (where the command allows it): standard input, with the same cap --
  the user chose that stream, so a pipe or a terminal is read until its end;
* anything else -- a FIFO, a character or block device (``/dev/zero``,
  ``/dev/urandom``), a socket, a directory -- is refused without reading: such
  a file may never end or never deliver anything. The file is opened with
  ``O_NONBLOCK`` so that even opening a FIFO without a writer cannot block.

Errors are :class:`InputError`, one line naming the file and the reason.
"""

from __future__ import annotations

import os
import stat
import sys
from typing import BinaryIO

from .._files import NotRegularFile, open_regular, read_capped

__all__ = ["InputError", "read_input"]

#: A cap for files with no natural limit (documents, certificates): far above
#: any real one (a Nitro document is ~5 KB) and far below what hurts.
DEFAULT_LIMIT = 1 << 20

_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


class InputError(Exception):
    """An input file cannot be used; the message is one line."""


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _read_capped(fh: BinaryIO | int, limit: int, what: str) -> bytes:
    data = read_capped(fh, limit)
    if len(data) > limit:
        raise InputError(f"{what} is larger than {limit} bytes; refusing to read it")
    return data


def read_input(path: str, *, limit: int = DEFAULT_LIMIT, what: str | None = None,
               allow_stdin: bool = True) -> bytes:
    """The bytes of ``path`` (``-``: standard input if ``allow_stdin``), at most ``limit``.

    Raises :class:`InputError` for a file that is not a regular file, is larger
    than ``limit`` or cannot be read.
    """
    name = what or path
    if path == "-" and allow_stdin:
        try:
            return _read_capped(sys.stdin.buffer, limit, f"{name} (standard input)")
        except OSError as exc:
            raise InputError(f"cannot read {name} from standard input: {exc.strerror or exc}") from None
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise InputError(f"{name} is {_kind(mode)}, not a regular file; refusing to read it")
        fd = open_regular(path)  # checks the file opened, not what the name pointed to before
    except NotRegularFile as exc:
        raise InputError(f"{name} is {_kind(exc.mode)}, not a regular file; refusing to read it") from None
    except OSError as exc:
        raise InputError(f"cannot read {name}: {exc.strerror or exc}") from None
    try:
        return _read_capped(fd, limit, name)
    except OSError as exc:
        raise InputError(f"cannot read {name}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
