"""Child processes: ones that cannot outlive whoever started them (Linux
``PR_SET_PDEATHSIG``), and one way to stop a child and reap it."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import Callable
from typing import Any

__all__ = ["die_with_parent", "stop_process"]

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


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0,
                 sig: int = signal.SIGTERM, *, kill_timeout: float = 10.0) -> int | None:
    """Stop a child and reap it: ``sig``, then SIGKILL if it has not ended within
    ``timeout`` s. Returns its exit status as :attr:`~subprocess.Popen.returncode` has
    it (minus the signal's number when a signal ended it).

    A child that has already ended is not signalled, only reaped (Popen never signals
    a pid it has reaped, which the system may have given to another process by now);
    one that another waiter reaped behind Popen's back reads as 0, as Popen reports it.
    Never raises for a dead child and never blocks for more than about
    ``timeout + kill_timeout`` s: None if the child is still there ``kill_timeout`` s
    after SIGKILL (stuck in the kernel), and then it is not reaped.
    Pipes of the child stay open: a caller that wants its output reads them after.
    """
    if proc.poll() is not None:
        return proc.returncode
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    try:
        return proc.wait(kill_timeout)
    except subprocess.TimeoutExpired:
        return None
