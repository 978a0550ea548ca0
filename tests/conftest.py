from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from support import FakeClock

from virtio_nsm import NsmDevice

#: Where the tests' default CA and default state directory go (never the user's own).
_XDG = ("XDG_DATA_HOME", "XDG_STATE_HOME")


@pytest.fixture(scope="session", autouse=True)
def _private_xdg_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Point the default CA and state directory (ours and children's) at pytest's temp dir,
    which pytest removes with its old runs (even after a killed run)."""
    home = tmp_path_factory.mktemp("xdg")
    saved = {name: os.environ.get(name) for name in _XDG}
    for name in _XDG:
        os.environ[name] = str(home / name.lower())
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def device(clock: FakeClock) -> NsmDevice:
    return NsmDevice(module_id="i-0123456789abcdef0-enc0123456789abcdef", clock=clock)
