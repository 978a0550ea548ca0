from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from support import FakeClock

from virtio_nsm import NsmDevice

#: Where the tests' default CA and default state directory go (never the user's own).
_XDG = ("XDG_DATA_HOME", "XDG_STATE_HOME")
_saved_env: dict[str, str | None] = {}
_private_home: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    """Point the default CA and state directory (and children's) at a private temp dir."""
    home = tempfile.mkdtemp(prefix="virtio-nsm-tests-")
    _private_home.append(home)
    for name in _XDG:
        _saved_env[name] = os.environ.get(name)
        os.environ[name] = os.path.join(home, name.lower())


def pytest_unconfigure(config: pytest.Config) -> None:
    for name, value in _saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    for home in _private_home:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def device(clock: FakeClock) -> NsmDevice:
    return NsmDevice(module_id="i-0123456789abcdef0-enc0123456789abcdef", clock=clock)
