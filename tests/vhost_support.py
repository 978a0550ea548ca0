"""Helpers for the vhost-user tests."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virtio_nsm.nsm.device import NsmDevice
from virtio_nsm.vhost_user.daemon import VhostUserDaemon


@dataclass
class Running:
    """A daemon serving a real device from a thread (see :func:`serve_in_thread`)."""

    path: Path
    device: NsmDevice
    daemon: VhostUserDaemon
    thread: threading.Thread


@contextmanager
def serve_in_thread(path: Path, **daemon_options: Any) -> Iterator[Running]:
    """A real daemon (``VhostUserDaemon(path, ..., **daemon_options)``) serving a fresh
    NsmDevice from a thread; on exit it must stop within 20 s, then it is closed."""
    device = NsmDevice()
    daemon = VhostUserDaemon(path, device.handle, **daemon_options)
    daemon.bind()
    thread = threading.Thread(target=daemon.serve_forever, daemon=True)
    thread.start()
    try:
        yield Running(path, device, daemon, thread)
    finally:
        daemon.stop()
        thread.join(20)
        assert not thread.is_alive(), "daemon did not stop"
        daemon.close()


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Wait up to 20 s for ``condition()`` to hold (a test failure otherwise)."""
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def sealed_memfd(size: int, name: str = "guest") -> int:
    """A memfd of ``size`` bytes sealed against shrinking and growing, as QEMU's
    ``memory-backend-memfd`` makes guest RAM (the backend refuses unsealed memory)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd
