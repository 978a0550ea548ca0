from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from vhost_support import Running

from virtio_nsm.nsm.device import NsmDevice
from virtio_nsm.vhost_user.daemon import VhostUserDaemon


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    """A real daemon serving a real NsmDevice from a thread, on a temp-dir socket."""
    path = tmp_path / "nsm.sock"
    device = NsmDevice()
    daemon = VhostUserDaemon(path, device.handle, message_timeout=2.0)
    daemon.bind()
    thread = threading.Thread(target=daemon.serve_forever, daemon=True)
    thread.start()
    yield Running(path, device, daemon, thread)
    daemon.stop()
    thread.join(10)
    assert not thread.is_alive(), "daemon did not stop"
    daemon.close()
