"""Helpers for the vhost-user tests."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from virtio_nsm.nsm.device import NsmDevice
from virtio_nsm.vhost_user.daemon import VhostUserDaemon


@dataclass
class Running:
    """A daemon serving a real device from a thread (see the ``running`` fixture)."""

    path: Path
    device: NsmDevice
    daemon: VhostUserDaemon
    thread: threading.Thread
