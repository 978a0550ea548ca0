"""Our frontend against our backend daemon (real NsmDevice, real sockets, no VM)."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from vhost_support import Running

from virtio_nsm.client import Nsm
from virtio_nsm.errors import DeviceNotFoundError, ErrorCode, NsmError
from virtio_nsm.nsm.device import NsmDevice
from virtio_nsm.nsm.frontend import NsmFrontend, VhostUserTransport
from virtio_nsm.nsm.protocol import (
    DescribePCR,
    ExtendPCR,
    ExtendPCRResponse,
    decode_response,
    encode_error,
    encode_request,
)
from virtio_nsm.nsm.virtio import NsmQueueWorker, NsmVirtioDevice
from virtio_nsm.vhost_user.daemon import VhostUserDaemon
from virtio_nsm.vhost_user.device import QueueWorker
from virtio_nsm.vhost_user.frontend import GUEST_BASE, VhostUserError
from virtio_nsm.vhost_user.message import (
    HEADER,
    U64,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_VERSION,
    FrontendRequest,
    Message,
    VringFd,
)
from virtio_nsm.virtio import spec
from virtio_nsm.virtio.queue import DeviceQueue, Segment

R = FrontendRequest
BUF = GUEST_BASE + 0x4000  # inside the frontend's buffer area
F_NEXT = spec.VIRTQ_DESC_F_NEXT
F_WRITE = spec.VIRTQ_DESC_F_WRITE


def describe_pcr0(path: Path) -> bytes:
    with VhostUserTransport(path, timeout=10) as t:
        return t.exchange(encode_request(DescribePCR(0)))


# -- all seven requests and the error answers ---------------------------------------------


def test_all_seven_requests(running: Running) -> None:
    with Nsm(VhostUserTransport(running.path, timeout=10)) as nsm:
        desc = nsm.describe_nsm()
        assert desc.max_pcrs == 32 and desc.digest == "SHA384"
        assert desc.module_id == running.device.state.module_id
        assert list(desc.locked_pcrs) == list(range(16))
        pcr0 = nsm.describe_pcr(0)
        assert pcr0.lock is True and len(pcr0.data) == 48
        value = nsm.extend_pcr(16, b"\x0b\x00\x37\x48\x63\xff\x5c\x65")
        assert value.hex() == (
            "b33da05a0fdb71627c8c68fc4232281fc440edd6f0ac7467fa497bbb907db32d"
            "957b5fd393845fa02c264ad5ea233888"
        )
        nsm.lock_pcr(16)
        nsm.lock_pcrs(18)
        assert nsm.describe_pcr(17).lock is True
        assert nsm.describe_pcr(18).lock is False
        doc = nsm.attestation(user_data=b"u", nonce=b"n", public_key=b"k" * 4000)
        assert doc[:4] == bytes.fromhex("8444a1013822")[:4]
        assert len(nsm.get_random()) == 256
    # The device behind the socket is the one we hold: same state.
    assert running.device.state.pcrs.describe(16)[0] is True


def test_error_answers(running: Running) -> None:
    with Nsm(VhostUserTransport(running.path, timeout=10)) as nsm:
        with pytest.raises(NsmError) as exc:
            nsm.describe_pcr(50)
        assert exc.value.code is ErrorCode.InvalidIndex
        with pytest.raises(NsmError) as exc:
            nsm.extend_pcr(3, b"x")
        assert exc.value.code is ErrorCode.ReadOnlyIndex
        raw = nsm.transport.exchange(b"\xff\x00garbage")
        assert raw == encode_error(ErrorCode.InvalidOperation)
        # Like nsm.ko (EMSGSIZE), the frontend refuses > 0x1000 before sending.
        with pytest.raises(NsmError) as exc:
            nsm.transport.exchange(b"\x00" * 0x1001)
        assert exc.value.code is ErrorCode.InputTooLarge


def test_transport_matches_handle_byte_for_byte(running: Running) -> None:
    reference = NsmDevice(state=running.device.state)
    request = encode_request(DescribePCR(7))
    assert describe_pcr0(running.path) == running.device.handle(encode_request(DescribePCR(0)))
    with VhostUserTransport(running.path, timeout=10) as t:
        assert t.exchange(request) == reference.handle(request)


def test_missing_socket_is_device_not_found(tmp_path: Path) -> None:
    with pytest.raises(DeviceNotFoundError, match="nsm serve"):
        VhostUserTransport(tmp_path / "nothing.sock")


# -- pipelining and reconnects -------------------------------------------------------------


def test_pipelined_burst(running: Running) -> None:
    requests = [encode_request(ExtendPCR(20, bytes([i]))) for i in range(100)]
    with VhostUserTransport(running.path, timeout=10, queue_size=16) as t:
        responses = t.exchange_many(requests)  # 8 pairs per kick with a 16-entry ring
    expected = bytes(48)
    for i, raw in enumerate(responses):
        expected = hashlib.sha384(expected + bytes([i])).digest()
        response = decode_response(raw)
        assert isinstance(response, ExtendPCRResponse) and response.data == expected
    assert running.device.state.pcrs.describe(20)[1] == expected


def test_reconnect_keeps_device_state(running: Running) -> None:
    with Nsm(VhostUserTransport(running.path, timeout=10)) as nsm:
        value = nsm.extend_pcr(17, b"abc")
        nsm.lock_pcr(17)
    for _ in range(2):
        with Nsm(VhostUserTransport(running.path, timeout=10)) as nsm:
            desc = nsm.describe_pcr(17)
            assert (desc.lock, desc.data) == (True, value)
    assert running.daemon.connections_served == 3


def test_virtio_reset_through_the_socket_keeps_device_state(running: Running) -> None:
    with NsmFrontend(running.path, timeout=10) as fe:
        fe.exchange(encode_request(ExtendPCR(19, b"z")))
        assert fe.get_vring_base() == 2  # stopped after one pair
        fe.request(Message(R.VHOST_USER_SET_STATUS, VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK,
                           U64(0).encode()))
        fe.request(Message(R.VHOST_USER_RESET_DEVICE, VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK))
        assert fe.get_status() == 0
    with Nsm(VhostUserTransport(running.path, timeout=10)) as nsm:
        assert nsm.describe_pcr(19).data == hashlib.sha384(bytes(48) + b"z").digest()


# -- hostile rings against the backend -----------------------------------------------------


def hostile_then_recover(running: Running, caplog: pytest.LogCaptureFixture,
                         setup: Callable[[NsmFrontend], None], match: str) -> None:
    with (
        caplog.at_level(logging.ERROR, logger="virtio_nsm.vhost_user"),
        NsmFrontend(running.path, timeout=10) as fe,
    ):
        setup(fe)
        fe.kick()
        with pytest.raises(VhostUserError, match="vring error"):
            fe.wait_used(1)
        assert fe.get_status() & spec.VIRTIO_CONFIG_S_NEEDS_RESET
    assert "device needs reset" in caplog.text
    assert match in caplog.text
    assert describe_pcr0(running.path)  # the daemon serves the next frontend


@pytest.mark.parametrize(
    ("descs", "heads", "match"),
    [
        ([(0xDEAD_0000_0000, 16, 0, 0)], [0], "not backed by guest memory"),
        ([(BUF, 16, F_NEXT, 0)], [0], "a loop, or a chain longer than the queue"),
        ([(BUF, 16, F_NEXT, 1), (BUF, 16, F_NEXT, 0)], [0], "a loop"),
        ([(BUF, 16, F_NEXT, 999)], [0], "outside the descriptor table"),
        ([(BUF, 16, 0, 0)], [200], "outside the descriptor table"),
        ([(BUF, 16, 0, 0), (BUF, 16, 0, 0)], [0, 1], "not a device-writable response"),
        ([(BUF, 16, 0, 0), (0xDEAD_0000_0000, 0x3000, F_WRITE, 0)], [0, 1], "not backed by guest memory"),
        ([(BUF, 0x1000_0000, 0, 0), (BUF, 0x3000, F_WRITE, 0)], [0, 1], "not backed by guest memory"),
        ([(BUF, 16, 0, 0), (BUF, 0x3000, F_WRITE, 0)], [0, 0], "again while in flight"),
        ([(BUF, 0x3000, F_WRITE, 0)], [0], "no request before it"),
        ([(BUF, 16, F_WRITE | F_NEXT, 1), (BUF, 16, 0, 0)], [0], "readable descriptor after"),
        ([(BUF, 24, spec.VIRTQ_DESC_F_INDIRECT, 0)], [0], "not a positive multiple of 16"),
    ],
)
def test_hostile_descriptors(
    running: Running, caplog: pytest.LogCaptureFixture,
    descs: list[tuple[int, int, int, int]], heads: list[int], match: str,
) -> None:
    def setup(fe: NsmFrontend) -> None:
        for i, d in enumerate(descs):
            fe.queue.raw_descriptor(i, *d)
        fe.queue.raw_avail(heads)

    hostile_then_recover(running, caplog, setup, match)


def test_available_index_jump(running: Running, caplog: pytest.LogCaptureFixture) -> None:
    hostile_then_recover(
        running, caplog, lambda fe: fe.queue.raw_avail([], idx_delta=1000), "more than the queue"
    )


def test_state_survives_a_hostile_frontend(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    with Nsm(VhostUserTransport(running.path, timeout=10)) as nsm:
        value = nsm.extend_pcr(21, b"keep")

    def setup(fe: NsmFrontend) -> None:
        fe.queue.raw_descriptor(0, BUF, 16, F_NEXT, 0)
        fe.queue.raw_avail([0])

    hostile_then_recover(running, caplog, setup, "a loop")
    with Nsm(VhostUserTransport(running.path, timeout=10)) as nsm:
        assert nsm.describe_pcr(21).data == value


def test_wrong_sizes_get_device_errors(running: Running) -> None:
    with NsmFrontend(running.path, timeout=10) as fe:
        # Request longer than 0x1000 (two descriptors): the device says InputTooLarge.
        fe.memory.write(BUF, encode_request(DescribePCR(0)))
        req = fe.queue.add([Segment(BUF, 0x1000), Segment(BUF + 0x1000, 0x800)])
        resp = fe.queue.add([Segment(BUF + 0x2000, 0x1000, True)])
        fe.queue.request_interrupt_after(2)
        fe.queue.publish()
        fe.kick()
        used = fe.wait_used(2)
        assert used == [(req, 0), (resp, len(encode_error(ErrorCode.InputTooLarge)))]
        assert fe.memory.read(BUF + 0x2000, used[1][1]) == encode_error(ErrorCode.InputTooLarge)
        # Response buffer too small for the answer: BufferTooSmall.
        fe.memory.write(BUF, encode_request(DescribePCR(0)))
        req = fe.queue.add([Segment(BUF, len(encode_request(DescribePCR(0))))])
        resp = fe.queue.add([Segment(BUF + 0x2000, 32, True)])
        fe.queue.request_interrupt_after(2)
        fe.queue.publish()
        fe.kick()
        small = encode_error(ErrorCode.BufferTooSmall)
        assert fe.wait_used(2) == [(req, 0), (resp, len(small))]
        assert fe.memory.read(BUF + 0x2000, len(small)) == small
        # An empty request is answered (InvalidOperation), not dropped.
        req = fe.queue.add([Segment(BUF, 0)])
        resp = fe.queue.add([Segment(BUF + 0x2000, 0x3000, True)])
        fe.queue.request_interrupt_after(2)
        fe.queue.publish()
        fe.kick()
        invalid = encode_error(ErrorCode.InvalidOperation)
        assert fe.wait_used(2) == [(req, 0), (resp, len(invalid))]
        assert fe.get_status() & spec.VIRTIO_CONFIG_S_NEEDS_RESET == 0


# -- fuzzing the control socket ---------------------------------------------------------------


def raw_session(path: Path, data: bytes, fds: list[int] | None = None,
                half_close: bool = True) -> bytes:
    """Send raw bytes (+fds), then read whatever comes back until the daemon hangs up."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    try:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
        out = b""
        try:
            s.sendmsg([data], anc)
            if half_close:
                s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(4096):
                out += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass  # the daemon hung up with our data unread: also a hang-up
        return out
    finally:
        s.close()


def header(request: int, size: int, flags: int = VHOST_USER_VERSION) -> bytes:
    return HEADER.pack(request, flags, size)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (header(R.VHOST_USER_GET_FEATURES, 0)[:5], "middle of the header"),
        (header(R.VHOST_USER_SET_FEATURES, 8) + b"\x01\x02", "middle of the payload"),
        (header(44, 0, VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK), "unknown"),
        (header(0, 0), "unknown"),
        (header(0xFFFF_FFFF, 0), "unknown"),
        (header(R.VHOST_USER_GET_FEATURES, 1 << 30), "too large"),
        (header(R.VHOST_USER_GET_FEATURES, 0, 0), "version"),
        (header(R.VHOST_USER_SET_FEATURES, 3) + b"abc", "expected 8"),
        (header(R.VHOST_USER_SET_VRING_KICK, 8) + VringFd(0, False).encode(), "0 fds with the no-fd"),
        (header(R.VHOST_USER_SET_VRING_NUM, 8) + struct.pack("<II", 7, 64), "out of range"),
    ],
    ids=["short-header", "short-payload", "unknown-44", "unknown-0", "unknown-max",
         "huge-size", "bad-version", "bad-size", "kick-without-fd", "bad-vring-index"],
)
def test_fuzz_bad_messages_drop_the_connection_only(
    running: Running, caplog: pytest.LogCaptureFixture, data: bytes, match: str
) -> None:
    with caplog.at_level(logging.ERROR, logger="virtio_nsm.vhost_user"):
        assert raw_session(running.path, data) == b""  # dropped without a reply
    assert "dropping the frontend" in caplog.text and match in caplog.text
    assert describe_pcr0(running.path)


def test_fuzz_too_many_fds(running: Running, caplog: pytest.LogCaptureFixture) -> None:
    fds = [os.eventfd(0) for _ in range(12)]
    try:
        with caplog.at_level(logging.ERROR, logger="virtio_nsm.vhost_user"):
            assert raw_session(running.path, header(R.VHOST_USER_SET_OWNER, 0), fds) == b""
        assert "more than 8 file descriptors" in caplog.text
    finally:
        for fd in fds:
            os.close(fd)
    assert describe_pcr0(running.path)


def test_fuzz_fd_on_a_message_without_fds(running: Running, caplog: pytest.LogCaptureFixture) -> None:
    fd = os.eventfd(0)
    try:
        with caplog.at_level(logging.ERROR, logger="virtio_nsm.vhost_user"):
            assert raw_session(running.path, header(R.VHOST_USER_GET_FEATURES, 0), [fd]) == b""
        assert "1 file descriptors, expected 0..0" in caplog.text
    finally:
        os.close(fd)
    assert describe_pcr0(running.path)


def test_fuzz_unmappable_memory_fd(running: Running, caplog: pytest.LogCaptureFixture) -> None:
    from virtio_nsm.vhost_user.message import MemoryRegionDescription, MemoryTable

    table = MemoryTable((MemoryRegionDescription(0, 0x10000, 0, 0),)).encode()
    fd = os.eventfd(0)  # not mappable
    try:
        with caplog.at_level(logging.ERROR, logger="virtio_nsm.vhost_user"):
            assert raw_session(
                running.path, header(R.VHOST_USER_SET_MEM_TABLE, len(table)) + table, [fd]
            ) == b""
        assert "guest memory fd is not a regular file or memfd" in caplog.text
    finally:
        os.close(fd)
    assert describe_pcr0(running.path)


def test_fuzz_kick_fd_that_hits_eof(running: Running, caplog: pytest.LogCaptureFixture) -> None:
    r, w = os.pipe()
    os.close(w)  # reading r gives EOF forever: it must not spin the daemon
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(running.path))
    try:
        with caplog.at_level(logging.ERROR, logger="virtio_nsm.vhost_user"):
            s.sendmsg([header(R.VHOST_USER_SET_VRING_KICK, 8) + VringFd(0, False).encode()],
                      [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", r))])
            s.sendall(header(R.VHOST_USER_GET_FEATURES, 0))
            assert len(s.recv(4096)) == 20  # still answering on this connection
            deadline = time.monotonic() + 10
            while "kick fd closed" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.01)
        assert "kick fd closed by the frontend" in caplog.text
    finally:
        s.close()
        os.close(r)
    assert describe_pcr0(running.path)


def test_stalled_frontend_times_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    daemon = VhostUserDaemon(tmp_path / "s", NsmVirtioDevice(NsmDevice().handle), message_timeout=0.2)
    daemon.bind()
    thread = threading.Thread(target=daemon.serve_forever, daemon=True)
    thread.start()
    try:
        with caplog.at_level(logging.ERROR, logger="virtio_nsm.vhost_user"):
            # Half a header and then silence (the socket stays open).
            assert raw_session(daemon.path, header(R.VHOST_USER_GET_FEATURES, 0)[:6],
                               half_close=False) == b""
        assert "timed out in the middle of a message" in caplog.text
        assert describe_pcr0(daemon.path)
    finally:
        daemon.stop()
        thread.join(10)
        daemon.close()


def test_fuzz_random_streams(running: Running) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    requests = st.sampled_from([int(r) for r in R] + [0, 44, 99, 0xFFFF_FFFF])
    message = st.builds(
        lambda req, flags, payload, lie: HEADER.pack(req, flags, max(0, len(payload) + lie)) + payload,
        requests, st.sampled_from([1, 5, 9, 0, 0xFF]), st.binary(max_size=64),
        st.sampled_from([0, 0, 0, 1, -1]),
    )

    # Each example is a connection to a live daemon: a tenth of the message budget.
    examples = max(40, int(os.environ.get("NSM_FUZZ_EXAMPLES", "300")) // 10)

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(message, min_size=1, max_size=4))
    def run(messages: list[bytes]) -> None:
        raw_session(running.path, b"".join(messages))
        assert describe_pcr0(running.path)

    run()


# -- the socket itself -------------------------------------------------------------------------


def test_socket_mode_and_stale_socket(tmp_path: Path) -> None:
    path = tmp_path / "n.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a leftover socket file that nobody listens on
    with VhostUserDaemon(path, NsmVirtioDevice(NsmDevice().handle)) as daemon:
        assert (path.stat().st_mode & 0o777) == 0o600
        with pytest.raises(FileExistsError, match="in use"), VhostUserDaemon(path, daemon.device):
            pass
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(FileExistsError, match="not a socket"), \
            VhostUserDaemon(path, NsmVirtioDevice(NsmDevice().handle)):
        pass


# -- the frontend validates what the device returns ---------------------------------------------


class LyingWorker(NsmQueueWorker):
    """Answers pairs in a way nsm.ko would reject (see ``mode``)."""

    mode = "response-first"

    def process(self) -> bool:
        queue, answered = self.queue, False
        while (req := queue.pop()) is not None:
            resp = queue.pop()
            assert resp is not None
            if self.mode == "response-first":
                queue.add_used(resp.head, 1)
                queue.add_used(req.head, 0)
            else:
                queue.add_used(req.head, 0)  # no writable part: any length > 0 is a lie
                queue.add_used(resp.head, 0)
                queue.next_used_idx = (queue.next_used_idx - 2) & 0xFFFF
                queue._in_flight[req.head] = 0x10  # let the queue write a bogus length
                queue.add_used(req.head, 0x10)
                queue._in_flight[resp.head] = 0
                queue.add_used(resp.head, 0)
            answered = True
        queue.publish_used()
        return answered


@pytest.mark.parametrize(
    ("mode", "match"),
    [("response-first", "response chain before the request"),
     ("request-length", "request chain returned with length 16|16 bytes written")],
)
@pytest.mark.parametrize("burst", [False, True], ids=["one-request-path", "burst-path"])
def test_frontend_rejects_wrong_used_entries(tmp_path: Path, mode: str, match: str, burst: bool) -> None:
    class Lying(NsmVirtioDevice):
        def worker(self, index: int, queue: DeviceQueue, notify: Callable[[], None]) -> QueueWorker:
            worker = LyingWorker(queue, self.handler, notify)
            worker.mode = mode
            return worker

    daemon = VhostUserDaemon(tmp_path / "s", Lying(NsmDevice().handle))
    daemon.bind()
    thread = threading.Thread(target=daemon.serve_forever, daemon=True)
    thread.start()
    try:
        with VhostUserTransport(daemon.path, timeout=10) as t, pytest.raises(VhostUserError, match=match):
            request = encode_request(DescribePCR(0))
            if burst:
                t.exchange_many([request])
            else:
                t.exchange(request)
    finally:
        daemon.stop()
        thread.join(10)
        daemon.close()


def test_internal_error_drops_the_frontend_and_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(NsmQueueWorker):
        def process(self) -> bool:
            raise RuntimeError("bug")

    class Buggy(NsmVirtioDevice):
        broken = True

        def worker(self, index: int, queue: DeviceQueue, notify: Callable[[], None]) -> QueueWorker:
            cls = Broken if self.broken else NsmQueueWorker
            return cls(queue, self.handler, notify)

    device = NsmDevice()
    buggy = Buggy(device.handle)
    daemon = VhostUserDaemon(tmp_path / "s", buggy)
    daemon.bind()
    thread = threading.Thread(target=daemon.serve_forever, daemon=True)
    thread.start()
    try:
        with (
            caplog.at_level(logging.ERROR, logger="virtio_nsm.vhost_user"),
            pytest.raises(VhostUserError),
        ):
            # The ring is first served while the frontend sets it up: setup fails.
            VhostUserTransport(daemon.path, timeout=10)
        assert "internal error while serving the frontend" in caplog.text
        buggy.broken = False
        assert describe_pcr0(daemon.path) == device.handle(encode_request(DescribePCR(0)))
    finally:
        daemon.stop()
        thread.join(10)
        daemon.close()


def test_stop_after_close_touches_no_reused_descriptor(tmp_path: Path) -> None:
    from virtio_nsm import NsmDevice
    from virtio_nsm.vhost_user.daemon import VhostUserDaemon

    daemon = VhostUserDaemon(tmp_path / "s.sock", NsmVirtioDevice(NsmDevice().handle))
    daemon.bind()
    old_wake = daemon._wake_w
    daemon.close()
    r, w = os.pipe2(os.O_NONBLOCK)
    os.dup2(w, old_wake)  # someone else now owns the number the daemon used
    try:
        daemon.stop()
        with pytest.raises(BlockingIOError):
            os.read(r, 1)
    finally:
        for fd in (r, w, old_wake):
            os.close(fd)


# -- the loop's epoll wrapper ------------------------------------------------------------------------


def test_poller_reports_tags_and_forgets_closed_fds() -> None:
    from virtio_nsm.vhost_user.daemon import _Poller, _ready

    poller = _Poller()
    a, b = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    try:
        poller.register(a, 1, "a")
        poller.register(b, 1, 7)
        with pytest.raises(KeyError):
            poller.register(a, 1, "again")
        assert poller.select(0) == []
        assert poller.select(-0.5) == []  # a deadline already passed: no blocking
        os.eventfd_write(b, 1)
        [(fd, tag, mask)] = poller.select(0.001)
        assert (fd, tag) == (b, 7) and _ready(mask) & 1
        # A descriptor closed before it is unwatched (epoll dropped it itself) is only
        # forgotten, and its number can be watched again for something else.
        os.close(b)
        poller.unregister(b)
        with pytest.raises(KeyError):
            poller.unregister(b)
        b = os.eventfd(1, os.EFD_NONBLOCK)
        poller.register(b, 1, "new")
        assert [(fd, tag) for fd, tag, _ in poller.select(None)] == [(b, "new")]
    finally:
        poller.close()
        os.close(a)
        os.close(b)


class StaggeredWorker(NsmQueueWorker):
    """Publishes a pair's request chain, then its response chain 50 ms later."""

    def process(self) -> bool:
        queue, answered = self.queue, False
        while (req := queue.pop()) is not None:
            resp = queue.pop()
            assert resp is not None
            response = self.handler(req.read(queue.memory, 0x1000), None, max_response=resp.writable_len)
            queue.add_used(req.head, 0)
            queue.publish_used()
            time.sleep(0.05)
            queue.add_used(resp.head, resp.write(queue.memory, response))
            queue.publish_used()
            answered = True
        return answered


def test_one_request_path_survives_stale_interrupts_and_split_publishing(tmp_path: Path) -> None:
    class Staggered(NsmVirtioDevice):
        def worker(self, index: int, queue: DeviceQueue, notify: Callable[[], None]) -> QueueWorker:
            return StaggeredWorker(queue, self.handler, notify)

    device = NsmDevice()
    daemon = VhostUserDaemon(tmp_path / "s", Staggered(device.handle))
    daemon.bind()
    thread = threading.Thread(target=daemon.serve_forever, daemon=True)
    thread.start()
    try:
        with VhostUserTransport(daemon.path, timeout=10) as t:
            for index in range(3):
                # An interrupt left over from nothing: the first wait ends at once with
                # at most the request chain used; the driver must ask again and wait.
                os.eventfd_write(t.call_fd, 1)
                request = encode_request(DescribePCR(index))
                assert t.exchange(request) == device.handle(request)
            assert t.queue.in_flight == 0
    finally:
        daemon.stop()
        thread.join(10)
        daemon.close()
