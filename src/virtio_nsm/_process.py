"""Child processes that cannot outlive whoever started them (Linux ``PR_SET_PDEATHSIG``)."""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child gets SIGKILL when the
    *thread* that started it ends, however it ends.

    ``prctl`` is looked up here, in the parent: between fork and exec the child only
    makes the call (no dlopen/dlsym there, whose locks another thread may have held at
    the fork). A child whose parent died before the request was in place exits at once.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def in_child() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return in_child
