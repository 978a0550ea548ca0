from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from vhost_support import Running, serve_in_thread


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    """A real daemon serving a real NsmDevice from a thread, on a temp-dir socket."""
    with serve_in_thread(tmp_path / "nsm.sock", message_timeout=2.0) as run:
        yield run
