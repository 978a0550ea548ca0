from __future__ import annotations

import contextlib
import gc
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


#: Descriptor kinds neither the interpreter nor pytest opens lazily: guest memory
#: (memfds) and eventfds/epoll instances. Pipes, sockets and files are left out
#: (capture, logging and imports may open them late, which would make the check flaky).
_CHECKED_KINDS = ("/memfd:", "anon_inode:")


def _checked_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor
            target = os.readlink(f"/proc/self/fd/{name}")
            if target.startswith(_CHECKED_KINDS):
                fds[int(name)] = target
    return fds


@pytest.fixture(scope="module", autouse=True)
def _no_leaked_descriptors(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test module must close the memfds and eventfds it (or the code it drives) opens:
    long fuzz runs (``NSM_FUZZ_EXAMPLES``) would otherwise end in EMFILE, and a leak in
    the daemon or frontend would go unnoticed. Reported as an error of the module's last test."""
    before = _checked_fds()
    yield
    gc.collect()
    leaked = {fd: what for fd, what in _checked_fds().items() if before.get(fd) != what}
    if leaked:
        pytest.fail(f"{request.node.nodeid} leaked {len(leaked)} descriptors: "
                    f"{sorted(set(leaked.values()))}", pytrace=False)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def device(clock: FakeClock) -> NsmDevice:
    return NsmDevice(module_id="i-0123456789abcdef0-enc0123456789abcdef", clock=clock)
