"""A one-shot monotonic timer as a file descriptor (Linux ``timerfd``), for an event loop.

The daemon's event loop watches descriptors, so a device that needs a deadline
(the vsock device returns held tx buffers after a moment of quiet) watches a
``timerfd``: readable once the timer has expired.  Python has
:func:`os.timerfd_create` from 3.13; before that the same three system calls are
reached through :mod:`ctypes` (Linux only, like the rest of the backend).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

__all__ = ["Timer"]

_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc: Any = None


def _lib() -> Any:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.timerfd_create.restype = ctypes.c_int
        lib.timerfd_settime.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(_Itimerspec),
            ctypes.POINTER(_Itimerspec),
        ]
        lib.timerfd_settime.restype = ctypes.c_int
        _libc = lib
    return _libc


def _check(result: int) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


class Timer:
    """A non-blocking, close-on-exec one-shot timer descriptor (see the module doc)."""

    def __init__(self) -> None:
        create = getattr(os, "timerfd_create", None)
        if create is not None:  # pragma: no cover (Python >= 3.13)
            self._fd: int = create(_CLOCK_MONOTONIC, flags=_TFD_NONBLOCK | _TFD_CLOEXEC)
        else:
            self._fd = _check(_lib().timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC))
        #: Whether the timer is set and has not been seen to expire.
        self.armed = False

    def __repr__(self) -> str:
        return f"<Timer fd={self._fd} armed={self.armed}>"

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("the timer is closed")
        return self._fd

    def arm(self, delay_ns: int) -> None:
        """Expire ``delay_ns`` nanoseconds from now (replacing any earlier setting)."""
        self._set(max(1, delay_ns))
        self.armed = True

    def disarm(self) -> None:
        if self.armed:
            self._set(0)
            self.armed = False

    def expired(self) -> bool:
        """Consume an expiry (after the descriptor was reported readable); False if none."""
        try:
            os.read(self.fileno(), 8)
        except BlockingIOError:
            return False
        self.armed = False
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.armed = False

    def _set(self, value_ns: int) -> None:
        settime = getattr(os, "timerfd_settime_ns", None)
        if settime is not None:  # pragma: no cover (Python >= 3.13)
            settime(self.fileno(), initial=value_ns)
            return
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(value_ns // 1_000_000_000, value_ns % 1_000_000_000))
        _check(_lib().timerfd_settime(self.fileno(), 0, ctypes.byref(spec), None))
