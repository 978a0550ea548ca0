"""A hostile frontend against a real ``nsm serve`` process (issue 11, D3-D6, D8).

Each test plays what a frontend may legitimately or maliciously do with the
descriptors it hands over, then checks that the backend still answers, and that
SIGTERM still ends it within a second.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from virtio_nsm._process import stop_process
from virtio_nsm.nsm.frontend import NsmFrontend
from virtio_nsm.nsm.protocol import DescribePCR, encode_request
from virtio_nsm.nsm.virtio import NsmVirtioDevice
from virtio_nsm.vhost_user.backend import BackendError, VhostUserBackend
from virtio_nsm.vhost_user.frontend import GUEST_BASE, USER_BASE, BackendDisconnected, VhostUserError
from virtio_nsm.vhost_user.message import (
    U64,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_VERSION,
    DeviceStateTransfer,
    FrontendRequest,
    Inflight,
    MemoryRegionDescription,
    MemoryTable,
    Message,
    ProtocolFeature,
    VringFd,
)

R = FrontendRequest
REQUEST = encode_request(DescribePCR(0))
EVENTFD_MAX = 0xFFFF_FFFF_FFFF_FFFE


@dataclass
class Serving:
    path: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def stderr(self) -> str:
        return self.log.read_text()

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def nsm_serve(tmp_path: Path, *args: str) -> Iterator[Serving]:
    """A real ``nsm serve`` process; on exit, SIGTERM must end it within a second."""
    path = tmp_path / "nsm.sock"
    log = tmp_path / "serve.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "virtio_nsm", "serve", "--ephemeral", "--poll-us", "0",
             "--vhost-user", str(path), *args],
            stdout=subprocess.DEVNULL, stderr=err,
        )
    try:
        deadline = time.monotonic() + 30
        while not (log.exists() and "listening on" in log.read_text()):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "nsm serve did not start"
            time.sleep(0.02)
        serving = Serving(path, proc, log)
        yield serving
        if proc.returncode is None:
            terminate(serving)
    finally:
        stop_process(proc, sig=signal.SIGKILL)


def terminate(srv: Serving) -> None:
    """SIGTERM must end a living ``nsm serve`` cleanly within a second."""
    proc = srv.proc
    assert proc.poll() is None, f"nsm serve died ({proc.returncode}): {srv.stderr()}"
    proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail(f"nsm serve ignored SIGTERM: {srv.stderr()}")
    assert time.monotonic() - start < 1.0, f"SIGTERM took {time.monotonic() - start:.1f} s"
    assert proc.returncode == 0, srv.stderr()


def blocking_eventfd(value: int = 0) -> int:
    fd = os.eventfd(0, os.EFD_CLOEXEC)  # blocking, unlike the frontend's own
    assert os.get_blocking(fd)
    if value:
        os.eventfd_write(fd, value)
    return fd


def send(fe: NsmFrontend, request: int, payload: bytes = b"", fds: list[int] | None = None) -> None:
    """Send without waiting for any reply."""
    fe._connection().send_message(Message(request, VHOST_USER_VERSION, payload, fds or []))


# -- D3: a saturated call eventfd ----------------------------------------------------------------


def test_saturated_call_fd_does_not_block_the_backend(tmp_path: Path) -> None:
    with nsm_serve(tmp_path) as srv, NsmFrontend(srv.path, timeout=3) as fe:
        call = blocking_eventfd(EVENTFD_MAX)  # one more and write() blocks
        try:
            fe._set(R.VHOST_USER_SET_VRING_CALL, VringFd(0, False).encode(), [call])
            fe.queue.request_interrupt_after(2)
            pairs = fe._submit([REQUEST])  # answered, then an interrupt on `call`
            used: dict[int, int] = {}
            deadline = time.monotonic() + 5
            while len(used) < 2:  # the interrupt goes to `call`: look at the ring
                assert time.monotonic() < deadline, "request not answered"
                used.update(fe.queue.collect_used())
                time.sleep(0.01)
            assert used[pairs[0].req_head] == 0 and used[pairs[0].resp_head] > 0
            time.sleep(0.1)  # the interrupt is being sent (or is blocking the backend)
            assert fe.get_status() & 4  # the backend still answers messages
            assert os.eventfd_read(call) == EVENTFD_MAX  # saturated, not overflowed
        finally:
            os.close(call)


# -- D4: a kick drained by the frontend while the backend is busy -----------------------------------


def test_kick_drained_by_the_frontend_in_the_same_batch(tmp_path: Path) -> None:
    with nsm_serve(tmp_path) as srv, NsmFrontend(srv.path, timeout=3, start=False) as fe:
        kick = blocking_eventfd()
        fe._fds.append(kick)
        fe.kick_fds[0] = kick
        fe.start_ring()
        status = Message(R.VHOST_USER_GET_STATUS).encode()
        # Frozen, the backend finds in one batch: the start of a message, then the kick.
        os.kill(srv.proc.pid, signal.SIGSTOP)
        fe._connection().sock.sendall(status[:6])
        time.sleep(0.05)
        os.eventfd_write(kick, 1)
        time.sleep(0.05)
        os.kill(srv.proc.pid, signal.SIGCONT)
        time.sleep(0.2)  # it waits for the rest of the message...
        assert os.eventfd_read(kick) == 1  # ...while we take the kick back
        fe._connection().sock.sendall(status[6:])
        answer = fe._connection().recv_message()
        assert answer.request == R.VHOST_USER_GET_STATUS
        assert fe.get_status() & 4  # still serving
        assert fe.exchange(REQUEST)


# -- D5: the kick fd replaced or closed while a kick on it is pending --------------------------------


@pytest.mark.parametrize("how", ["SET_VRING_KICK", "GET_VRING_BASE"])
def test_kick_pending_on_a_replaced_kick_fd(tmp_path: Path, how: str) -> None:
    with nsm_serve(tmp_path) as srv, NsmFrontend(srv.path, timeout=3) as fe:
        old = fe.kick_fd
        new = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        fe._fds.append(new)
        os.kill(srv.proc.pid, signal.SIGSTOP)
        if how == "SET_VRING_KICK":
            flags = VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK
            fe._connection().send_message(
                Message(R.VHOST_USER_SET_VRING_KICK, flags, VringFd(0, False).encode(), [new])
            )
        else:
            send(fe, R.VHOST_USER_GET_VRING_BASE, bytes(8))
        time.sleep(0.05)
        os.eventfd_write(old, 1)  # pending on the old fd, reported after the message
        time.sleep(0.05)
        os.kill(srv.proc.pid, signal.SIGCONT)
        reply = fe._connection().recv_message()
        assert reply.request == R[f"VHOST_USER_{how}"]
        if how == "GET_VRING_BASE":
            fe.kick_fds[0] = new
            fe.start_ring()
        else:
            assert U64.decode(reply.payload).value == 0
            fe.kick_fds[0] = new
        assert fe.get_status() & 4  # the connection is still up
        assert fe.exchange(REQUEST)
        # The old eventfd stays readable (we never drain it): the backend must have
        # stopped watching it rather than spin on it.
        before = srv.cpu_seconds()
        time.sleep(0.5)
        assert srv.cpu_seconds() - before < 0.2
        assert "internal error" not in srv.stderr()


# -- D6: guest memory that can shrink ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memfd", "file"])
def test_guest_memory_that_can_shrink_is_refused(tmp_path: Path, kind: str) -> None:
    with nsm_serve(tmp_path) as srv, NsmFrontend(srv.path, timeout=3) as fe:
        size = fe._memsize
        if kind == "memfd":
            loose = os.memfd_create("unsealed", os.MFD_CLOEXEC)
        else:
            loose = os.open(tmp_path / "ram", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(loose, size)
            os.pwrite(loose, fe.memory.read(GUEST_BASE, size), 0)
            table = MemoryTable((MemoryRegionDescription(GUEST_BASE, size, USER_BASE, 0),)).encode()
            with pytest.raises(VhostUserError, match="refused"):
                fe._set(R.VHOST_USER_SET_MEM_TABLE, table, [loose])
            os.ftruncate(loose, 0)  # would be SIGBUS at the next kick, had it been mapped
            assert fe.exchange(REQUEST)  # the sealed memory is still in use
        finally:
            os.close(loose)
        assert "memory-backend-memfd" in srv.stderr()


def test_file_memory_is_accepted_when_asked(tmp_path: Path) -> None:
    with nsm_serve(tmp_path, "--allow-file-memory") as srv, NsmFrontend(srv.path, timeout=3) as fe:
        size = fe._memsize
        fd = os.open(tmp_path / "ram", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            table = MemoryTable((MemoryRegionDescription(GUEST_BASE, size, USER_BASE, 0),)).encode()
            fe._set(R.VHOST_USER_SET_MEM_TABLE, table, [fd])
        finally:
            os.close(fd)
        assert "mapped anyway (--allow-file-memory)" in srv.stderr()


def test_backend_refuses_unsealed_memory_unless_allowed() -> None:
    from vhost_support import sealed_memfd

    table = MemoryTable((MemoryRegionDescription(0, 0x10000, 0, 0),)).encode()
    for allow in (False, True):
        backend = VhostUserBackend(NsmVirtioDevice(lambda r, t=None, **kw: r), allow_file_memory=allow)
        loose = os.memfd_create("unsealed", os.MFD_CLOEXEC)
        sealed = sealed_memfd(0x10000)
        os.ftruncate(loose, 0x10000)
        try:
            backend.handle(Message(R.VHOST_USER_SET_MEM_TABLE, payload=table, fds=[sealed]))
            assert len(backend.memory) == 1
            if allow:
                backend.handle(Message(R.VHOST_USER_SET_MEM_TABLE, payload=table, fds=[loose]))
            else:
                with pytest.raises(BackendError, match=r"without F_SEAL_SHRINK.*memory-backend-memfd"):
                    backend.handle(Message(R.VHOST_USER_SET_MEM_TABLE, payload=table, fds=[loose]))
            assert len(backend.memory) == 1
        finally:
            backend.disconnect()


# -- D8: the inflight region is bounded by the device ----------------------------------------------------


def inflight_backend() -> VhostUserBackend:
    backend = VhostUserBackend(NsmVirtioDevice(lambda r, t=None, **kw: r))
    inflight = 1 << ProtocolFeature.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD
    backend.handle(Message(R.VHOST_USER_SET_PROTOCOL_FEATURES, payload=U64(inflight).encode()))
    return backend


@pytest.mark.parametrize(
    ("queues", "size", "match"),
    [(256, 32768, "256 queues"), (2, 64, "2 queues"), (0, 64, "0 queues"), (1, 48, "size 48")],
)
def test_inflight_region_larger_than_the_device_is_refused(queues: int, size: int, match: str) -> None:
    backend = inflight_backend()
    with pytest.raises(BackendError, match=match):
        backend.handle(Message(R.VHOST_USER_GET_INFLIGHT_FD, payload=Inflight(0, 0, queues, size).encode()))
    assert backend.inflight is None
    backend.max_queue_size = 256
    with pytest.raises(BackendError, match="queue size 512"):
        backend.handle(Message(R.VHOST_USER_GET_INFLIGHT_FD, payload=Inflight(0, 0, 1, 512).encode()))


def test_inflight_region_of_the_device_size_is_sealed() -> None:
    import fcntl

    backend = inflight_backend()
    reply = backend.handle(Message(R.VHOST_USER_GET_INFLIGHT_FD, payload=Inflight(0, 0, 1, 32768).encode()))
    assert reply is not None and len(reply.fds) == 1
    try:
        assert Inflight.decode(reply.payload).num_queues == 1
        seals = fcntl.fcntl(reply.fds[0], fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
        with pytest.raises(PermissionError):
            os.ftruncate(reply.fds[0], 0)
    finally:
        backend.disconnect()


def test_unsealed_inflight_region_is_refused() -> None:
    from virtio_nsm.vhost_user.inflight import queue_region_size

    backend = inflight_backend()
    fd = os.memfd_create("inflight", os.MFD_CLOEXEC)
    os.ftruncate(fd, queue_region_size(64))
    payload = Inflight(queue_region_size(64), 0, 1, 64).encode()
    with pytest.raises(BackendError, match="without F_SEAL_SHRINK"):
        backend.handle(Message(R.VHOST_USER_SET_INFLIGHT_FD, payload=payload, fds=[fd]))
    assert backend.inflight is None


# -- SIGTERM while a frontend stalls -------------------------------------------------------------------


@pytest.mark.parametrize("stall", ["mid-message", "state-load"])
def test_sigterm_while_the_frontend_stalls(tmp_path: Path, stall: str) -> None:
    with nsm_serve(tmp_path) as srv, NsmFrontend(srv.path, timeout=3, start=False) as fe:
        load_r, load_w = os.pipe2(os.O_CLOEXEC)
        try:
            if stall == "mid-message":
                fe._connection().sock.sendall(Message(R.VHOST_USER_SET_FEATURES).header()[:6])
            else:
                payload = DeviceStateTransfer(1, 0).encode()
                fe.request(Message(R.VHOST_USER_SET_DEVICE_STATE_FD, payload=payload, fds=[load_r]))
                send(fe, R.VHOST_USER_CHECK_DEVICE_STATE)  # waits for a load that never ends
            time.sleep(0.3)
            terminate(srv)  # while the frontend is still connected and silent
        finally:
            os.close(load_r)
            os.close(load_w)


# -- kick and call eventfds are edge-triggered: never drained, every write heard ----------------------

_NEAR_FULL = 2**62  # any count: nothing reads these counters back to zero


def test_every_kick_is_heard_though_the_kick_fd_is_never_read(tmp_path: Path) -> None:
    with nsm_serve(tmp_path) as srv, NsmFrontend(srv.path, timeout=3) as fe:
        os.eventfd_write(fe.kick_fd, _NEAR_FULL)  # stays readable from now on
        for _ in range(50):
            assert fe.exchange(REQUEST)  # each kick (one per request, --poll-us 0) woke it
        # The backend spent no system call on reading the kicks.
        assert os.eventfd_read(fe.kick_fd) == _NEAR_FULL + 50
        assert fe.exchange(REQUEST)  # drained by us meanwhile: still heard
        assert "internal error" not in srv.stderr()


def test_every_interrupt_is_heard_though_the_call_fd_is_never_read(tmp_path: Path) -> None:
    with nsm_serve(tmp_path) as srv, NsmFrontend(srv.path, timeout=3) as fe:
        os.eventfd_write(fe.call_fd, _NEAR_FULL)  # a stale interrupt, and it stays readable
        for _ in range(20):
            assert fe.exchange(REQUEST)
        # One interrupt per request, none of them read by our driver.
        assert os.eventfd_read(fe.call_fd) == _NEAR_FULL + 20


def test_a_polling_driver_is_answered_without_interrupts(tmp_path: Path) -> None:
    with (
        nsm_serve(tmp_path) as srv,
        NsmFrontend(srv.path, timeout=3, poll_us=2_000_000) as fe,
    ):
        for _ in range(20):
            assert fe.exchange(REQUEST)
        # While the driver spins, used_event stays behind: at most the backend's very
        # first answer (it has no earlier one to compare with) interrupts.
        try:
            interrupts = os.eventfd_read(fe.call_fd)
        except BlockingIOError:
            interrupts = 0
        assert interrupts <= 1
    (tmp_path / "short").mkdir()
    with nsm_serve(tmp_path / "short") as srv, NsmFrontend(srv.path, timeout=3, poll_us=1) as fe:
        # A spin too short for any answer: it asks for the interrupt and waits for it.
        for _ in range(20):
            assert fe.exchange(REQUEST)
    with pytest.raises(ValueError, match="poll_us"):
        NsmFrontend(srv.path, poll_us=-1)


def test_waiting_on_a_closed_frontend_is_an_error(tmp_path: Path) -> None:
    with nsm_serve(tmp_path) as srv:
        fe = NsmFrontend(srv.path, timeout=3)
        assert fe.exchange(REQUEST)
        fe.close()
        with pytest.raises(VhostUserError, match="the frontend is closed"):
            fe.wait_interrupt()
        fe.close()  # twice is fine


@pytest.mark.parametrize("poll_us", [0, 1000])
def test_a_single_request_to_a_stalled_or_dead_backend_fails_clearly(tmp_path: Path, poll_us: int) -> None:
    with nsm_serve(tmp_path) as srv, NsmFrontend(srv.path, timeout=0.5, poll_us=poll_us) as fe:
        assert fe.exchange(REQUEST)
        os.kill(srv.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(VhostUserError, match=r"no response from the device within 0\.5 s"):
                fe.exchange(REQUEST)
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        srv.proc.kill()
        srv.proc.wait()
        with pytest.raises(BackendDisconnected, match="closed the connection"):
            fe.exchange(REQUEST)
