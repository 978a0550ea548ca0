"""A long-running daemon must not lose descriptors: per connection, per reconnect, per
ring stop/start, per SET_MEM_TABLE, per kick/call fd replacement, nor per hostile
message that arrives with descriptors attached and is refused (SCM_RIGHTS fds of a
refused message are closed).

The daemon serves from a thread of this process, so ``/proc/self/fd`` counts both
sides: after each batch of cycles, once the daemon has dropped the last frontend,
the table must be back where it started.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import struct
from pathlib import Path

import pytest
from vhost_support import Running, sealed_memfd, wait_for

from virtio_nsm.nsm.frontend import NsmFrontend
from virtio_nsm.nsm.protocol import DescribePCR, encode_request
from virtio_nsm.vhost_user.frontend import GUEST_BASE, USER_BASE, VhostUserError
from virtio_nsm.vhost_user.message import (
    HEADER,
    VHOST_USER_VERSION,
    FrontendRequest,
    MemoryRegionDescription,
    MemoryTable,
    VringFd,
)

R = FrontendRequest
REQUEST = encode_request(DescribePCR(0))
CYCLES = 200


def open_fds() -> dict[int, str]:
    gc.collect()
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed meanwhile
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def settled(running: Running, before: dict[int, str]) -> None:
    """Wait until the daemon is back to listening, then compare the descriptor tables."""
    wait_for(lambda: running.daemon._conn is None, "the daemon to drop the last frontend")
    after = open_fds()
    leaked = {fd: what for fd, what in after.items() if before.get(fd) != what}
    assert not leaked, f"{len(leaked)} descriptors leaked: {sorted(set(leaked.values()))}"


def hostile(path: Path, data: bytes, fds: list[int]) -> None:
    """Send one message with ``fds`` attached (then closed here), read until hung up."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(10)
        s.connect(str(path))
        s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
        s.shutdown(socket.SHUT_WR)
        while s.recv(4096):
            pass
    finally:
        s.close()
        for fd in fds:
            os.close(fd)


def test_connections_reconnects_and_ring_restarts_keep_no_descriptor(running: Running) -> None:
    before = open_fds()
    for _ in range(CYCLES // 4):
        with NsmFrontend(running.path, timeout=10) as fe:
            assert fe.exchange(REQUEST)
            fe.get_vring_base()  # stops the ring (the backend closes its kick fd)
            fe.start_ring()  # a fresh SET_MEM_TABLE, call and kick fd
            assert fe.exchange(REQUEST)
            fe._send_mem_table()  # the backend replaces its mapping and memfd
            fe._set(R.VHOST_USER_SET_VRING_CALL, VringFd(0, False).encode(), [fe.call_fd])
            fe._set(R.VHOST_USER_SET_VRING_KICK, VringFd(0, False).encode(), [fe.kick_fd])
            assert fe.exchange(REQUEST)
            fe.reconnect()
            assert fe.exchange(REQUEST)
    settled(running, before)


@pytest.mark.parametrize(
    ("request_", "payload", "fds"),
    [
        # a request that takes no descriptor
        (R.VHOST_USER_GET_FEATURES, b"", ["eventfd", "eventfd", "memfd"]),
        # more descriptors than a message may carry (the kernel truncates, we refuse)
        (R.VHOST_USER_SET_OWNER, b"", ["eventfd"] * 12),
        # an unknown request
        (99, b"", ["memfd", "eventfd"]),
        # memory that can shrink (refused: SIGBUS hazard)
        (R.VHOST_USER_SET_MEM_TABLE,
         MemoryTable((MemoryRegionDescription(GUEST_BASE, 0x10000, USER_BASE, 0),)).encode(), ["loose"]),
        # memory that cannot be mapped
        (R.VHOST_USER_SET_MEM_TABLE,
         MemoryTable((MemoryRegionDescription(GUEST_BASE, 0x10000, USER_BASE, 0),)).encode(), ["eventfd"]),
        # a kick fd for a ring that does not exist
        (R.VHOST_USER_SET_VRING_KICK, VringFd(200, False).encode(), ["eventfd"]),
        # a payload cut short: the fds came with the header
        (R.VHOST_USER_SET_VRING_CALL, b"\0\0", ["eventfd"]),
    ],
    ids=["no-fd-request", "too-many", "unknown", "unsealed-memory", "unmappable", "bad-ring", "short"],
)
def test_refused_messages_with_descriptors_keep_none(
    running: Running, request_: int, payload: bytes, fds: list[str]
) -> None:
    def make(kind: str) -> int:
        if kind == "eventfd":
            return os.eventfd(0, os.EFD_CLOEXEC)
        if kind == "memfd":
            return sealed_memfd(0x10000)
        fd = os.memfd_create("loose", os.MFD_CLOEXEC)
        os.ftruncate(fd, 0x10000)
        return fd

    size = len(payload) if request_ != R.VHOST_USER_SET_VRING_CALL else 8
    data = HEADER.pack(request_, VHOST_USER_VERSION, size) + payload
    before = open_fds()
    for _ in range(CYCLES):
        hostile(running.path, data, [make(kind) for kind in fds])
    settled(running, before)
    with NsmFrontend(running.path, timeout=10) as fe:  # still serving
        assert fe.exchange(REQUEST)


def test_a_frontend_refused_after_setup_keeps_no_descriptor(running: Running) -> None:
    """Errors in the middle of a working session (memory refused after the rings run)."""
    before = open_fds()
    for _ in range(CYCLES // 4):
        with NsmFrontend(running.path, timeout=10) as fe:
            loose = os.memfd_create("loose", os.MFD_CLOEXEC)
            try:
                os.ftruncate(loose, fe._memsize)
                table = MemoryTable((MemoryRegionDescription(GUEST_BASE, fe._memsize, USER_BASE, 0),))
                with pytest.raises(VhostUserError):
                    fe._set(R.VHOST_USER_SET_MEM_TABLE, table.encode(), [loose])
            finally:
                os.close(loose)
    settled(running, before)


def test_a_daemon_that_cannot_bind_keeps_no_descriptor(running: Running, tmp_path: Path) -> None:
    """``with VhostUserDaemon(path, ...)`` on a socket in use (or not a socket) raises and
    releases its poller and wake-up pipe (``__exit__`` does not run when ``__enter__`` fails)."""
    from virtio_nsm.vhost_user.daemon import VhostUserDaemon

    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("x")
    before = open_fds()
    for path, match in [(running.path, "in use")] * (CYCLES // 2) + [(not_a_socket, "not a socket")] * (CYCLES // 2):
        with pytest.raises(FileExistsError, match=match), VhostUserDaemon(path, running.daemon.device):
            pass
    settled(running, before)
    assert running.path.exists()  # the other daemon's socket is left alone
    with NsmFrontend(running.path, timeout=10) as fe:
        assert fe.exchange(REQUEST)
