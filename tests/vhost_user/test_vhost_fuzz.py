"""Fuzzing the vhost-user backend: message decoding and arbitrary message sequences.

Invariants, whatever a frontend sends:

* decoding raw bytes (header, payload, attached descriptors) raises nothing but
  :class:`MessageError` (or :class:`ConnectionClosed` at a clean end);
* the backend, fed any sequence of messages (well-formed or not, with any kind of
  descriptor attached), kicks and polls, raises nothing but :class:`MessageError`
  or :class:`BackendError` -- the two errors on which the event loop drops the
  connection -- and dropping it (:meth:`VhostUserBackend.disconnect`) releases
  every descriptor the frontend gave it;
* the device behind it (its state) survives all of it.

The budget is fixed for CI; ``NSM_FUZZ_EXAMPLES=20000`` (for instance) runs longer.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vhost_support import TwoQueueDevice, sealed_memfd

from virtio_nsm.nsm.device import NsmDevice
from virtio_nsm.nsm.protocol import DescribePCR, encode_request
from virtio_nsm.nsm.virtio import NsmVirtioDevice
from virtio_nsm.vhost_user.backend import (
    OFFERED_PROTOCOL_FEATURES,
    TRANSPORT_FEATURES,
    BackendError,
    VhostUserBackend,
)
from virtio_nsm.vhost_user.connection import Connection, ConnectionClosed
from virtio_nsm.vhost_user.message import (
    HEADER,
    REQUEST_SPECS,
    U64,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_VERSION,
    DeviceConfig,
    DeviceStateTransfer,
    FrontendRequest,
    Inflight,
    MemoryRegionDescription,
    MemoryTable,
    Message,
    MessageError,
    ProtocolFeature,
    SingleMemoryRegion,
    VringAddr,
    VringFd,
    VringState,
    parse_payload,
)
from virtio_nsm.virtio.queue import RingLayout

R = FrontendRequest
EXAMPLES = int(os.environ.get("NSM_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)

GPA = 0x1_0000
UVA = 0x7F00_0000_0000
SIZE = 0x10000
QSIZE = 16
ADDRS = [0, GPA, GPA + 0x1000, GPA + SIZE - 16, UVA, UVA + 0x1000, UVA + SIZE - 8, (1 << 64) - 1]
NUMS = [0, 1, 2, 15, 16, 64, 32768, 65535, 65536, (1 << 32) - 1]
FD_KINDS = ["eventfd", "sealed", "unsealed", "pipe", "file", "socket"]


def open_fds() -> dict[str, str]:
    """This process's descriptors and what they are (after collecting garbage)."""
    pass
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            fds[name] = os.readlink(f"/proc/self/fd/{name}")
    return fds


class StateHandler:
    """A device state that refuses what it did not produce."""

    def __init__(self) -> None:
        self.loads = 0

    def save_state(self) -> bytes:
        return b"state"

    def load_state(self, data: bytes) -> None:
        if data != b"state":
            raise ValueError("not a state of ours")
        self.loads += 1


class Fuzzer:
    """One frontend connection's worth of fuzzed traffic against a backend."""

    def __init__(self, tmp: Path, draw: Callable[..., object]) -> None:
        self.tmp = tmp
        self.draw = draw
        self.device = NsmDevice()
        # The NSM, or the two-queue test device (config space, CONFIG protocol feature).
        self.other = TwoQueueDevice() if draw(st.booleans()) else None
        self.backend = VhostUserBackend(
            self.other or NsmVirtioDevice(self.device.handle, device_state=StateHandler())
        )
        self.ours: list[int] = []  # our ends, closed at the end
        #: Descriptors made for the backend and not handed to it yet: closed at the end too
        #: (a message cut short by an error, or a draw that ends the example -- Hypothesis
        #: stops an example that overruns its data in the middle of building a message).
        self.pending: list[int] = []

    def fd(self, kind: str) -> int:
        """A descriptor of ``kind`` for the backend (ours until handed over: see ``pending``)."""
        if kind == "eventfd":
            fd = os.eventfd(0)
            self.pending.append(fd)
        elif kind in ("sealed", "unsealed"):
            fd = sealed_memfd(SIZE) if kind == "sealed" else os.memfd_create("loose")
            self.pending.append(fd)
            if kind == "unsealed":
                os.ftruncate(fd, SIZE)
            noise = random.Random(int(self.draw(st.integers(0, 2**32)))).randbytes(0x1000)
            os.pwrite(fd, noise, int(self.draw(st.sampled_from([0, 0x1000, SIZE - 0x1000]))))
        elif kind == "pipe":
            content = bytes(self.draw(st.sampled_from([b"", b"state", b"junk"])))  # no fd open yet
            r, w = os.pipe()
            os.write(w, content)
            os.close(w)
            fd = r
            self.pending.append(fd)
        elif kind == "file":
            fd = os.open(self.tmp / "file", os.O_RDWR | os.O_CREAT, 0o600)
            self.pending.append(fd)
            os.ftruncate(fd, SIZE)
        else:
            a, b = socket.socketpair()
            self.ours.append(b.detach())
            fd = a.detach()
            self.pending.append(fd)
        return fd

    def payload(self, request: int) -> bytes:
        draw = self.draw
        if draw(st.integers(0, 9)) == 0:
            return bytes(draw(st.binary(max_size=80)))
        spec = REQUEST_SPECS.get(request)
        decode = spec.decode if spec is not None else None
        num = st.sampled_from(NUMS)
        index = st.sampled_from([0, 0, 0, 1, 255])
        addr = st.sampled_from(ADDRS) | st.integers(0, (1 << 64) - 1)
        if decode is U64.decode:
            value = draw(st.sampled_from([0, TRANSPORT_FEATURES, OFFERED_PROTOCOL_FEATURES, 1 << 63, 0xF])
                         | st.integers(0, (1 << 64) - 1))
            return U64(int(value)).encode()
        if decode is VringState.decode:
            return VringState(draw(index), draw(num) & 0xFFFF_FFFF).encode()
        if decode is VringAddr.decode:
            return VringAddr(draw(index), draw(st.sampled_from([0, 1])), draw(addr), draw(addr),
                             draw(addr), draw(addr)).encode()
        if decode is VringFd.decode:
            return VringFd(draw(index), draw(st.booleans())).encode()
        if decode in (MemoryTable.decode, SingleMemoryRegion.decode):
            region = MemoryRegionDescription(
                draw(st.sampled_from([GPA, 0, GPA + SIZE, 1 << 40])),
                draw(st.sampled_from([SIZE, 0x1000, SIZE * 2, 1 << 40])),
                draw(st.sampled_from([UVA, UVA + 0x1000, 0])),
                draw(st.sampled_from([0, 0x1000, 0x800, SIZE])),
            )
            if decode is SingleMemoryRegion.decode:
                return SingleMemoryRegion(region).encode()
            return MemoryTable((region,) * int(draw(st.integers(1, 2)))).encode()
        if decode is Inflight.decode:
            return Inflight(draw(st.sampled_from([0, 4096, 1 << 20])),
                            draw(st.sampled_from([0, 4096, 7])),
                            draw(st.sampled_from([0, 1, 2, 256])),
                            draw(st.sampled_from([0, 1, 16, 48, 32768]))).encode()
        if decode is DeviceConfig.decode:
            size = int(draw(st.sampled_from([0, 1, 4, 8, 9, 256])))
            return DeviceConfig(draw(st.sampled_from([0, 4, 7, 8, 1 << 31])),
                                size, draw(st.sampled_from([0, 1])), bytes(size)).encode()
        if decode is DeviceStateTransfer.decode:
            return DeviceStateTransfer(draw(st.sampled_from([0, 1, 2])),
                                       draw(st.sampled_from([0, 1]))).encode()
        return b""

    def message(self) -> Message:
        draw = self.draw
        request = int(draw(st.sampled_from([int(r) for r in R] + [0, 99])))
        payload = self.payload(request)
        spec = REQUEST_SPECS.get(request)
        wanted = 0 if spec is None else spec.max_fds if spec.min_fds == spec.max_fds else spec.min_fds
        if spec is not None and spec.decode is VringFd.decode and len(payload) == 8:
            wanted = 0 if int.from_bytes(payload, "little") & (1 << 8) else 1
        if spec is not None and spec.decode is MemoryTable.decode and len(payload) >= 8:
            wanted = int.from_bytes(payload[:4], "little")
        count = int(draw(st.sampled_from([wanted, wanted, wanted, 0, 1, 2])))
        kinds = [str(draw(st.sampled_from(FD_KINDS))) for _ in range(min(count, 8))]
        if request in (R.VHOST_USER_SET_MEM_TABLE, R.VHOST_USER_ADD_MEM_REG) and kinds and draw(st.booleans()):
            kinds = ["sealed"] * len(kinds)
        flags = VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY_MASK if draw(st.booleans()) else 0)
        return Message(request, flags, payload, [self.fd(k) for k in kinds])

    def setup(self) -> list[Message]:
        """A valid start (features, memory, ring 0 with noise in it) to get deeper."""
        kick, call = os.eventfd(0), os.eventfd(0)
        self.pending += [kick, call]
        self.ours += [os.dup(kick), os.dup(call)]
        self.kick = self.ours[-2]
        lay = RingLayout.contiguous(QSIZE, GPA)
        u = UVA - GPA
        table = MemoryTable((MemoryRegionDescription(GPA, SIZE, UVA, 0),)).encode()
        inflight = 1 << ProtocolFeature.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD
        features = int(self.draw(st.sampled_from([TRANSPORT_FEATURES, 1 << 32])))
        return [
            Message(R.VHOST_USER_SET_PROTOCOL_FEATURES, payload=U64(self.backend.offered_protocol_features).encode()),
            Message(R.VHOST_USER_SET_FEATURES, payload=U64(features).encode()),
            Message(R.VHOST_USER_SET_MEM_TABLE, payload=table, fds=[self.fd("sealed")]),
            *(
                [Message(R.VHOST_USER_GET_INFLIGHT_FD, payload=Inflight(0, 0, 1, QSIZE).encode())]
                if self.draw(st.booleans()) and OFFERED_PROTOCOL_FEATURES & inflight else []
            ),
            Message(R.VHOST_USER_SET_VRING_NUM, payload=VringState(0, QSIZE).encode()),
            Message(R.VHOST_USER_SET_VRING_ADDR,
                    payload=VringAddr(0, 0, lay.desc + u, lay.used + u, lay.avail + u, 0).encode()),
            Message(R.VHOST_USER_SET_VRING_CALL, payload=VringFd(0, False).encode(), fds=[call]),
            Message(R.VHOST_USER_SET_VRING_KICK, payload=VringFd(0, False).encode(), fds=[kick]),
            Message(R.VHOST_USER_SET_VRING_ENABLE, payload=VringState(0, 1).encode()),
        ]

    def run(self) -> None:
        draw = self.draw
        backend = self.backend
        try:
            steps: list[Message | str] = list(self.setup()) if draw(st.booleans()) else []
            for _ in range(int(draw(st.integers(1, 12)))):
                steps.append(str(draw(st.sampled_from(["message", "message", "message", "kick", "poll"]))))
            for step in steps:
                if step == "kick":
                    backend.kick(int(draw(st.sampled_from([0, 1, -1]))))
                elif step == "poll":
                    backend.set_polling(bool(draw(st.booleans())))
                    backend.poll()
                else:
                    message = self.message() if step == "message" else step
                    assert isinstance(message, Message)
                    for fd in message.fds:  # the backend's from here on, whatever happens
                        self.pending.remove(fd)
                    try:
                        reply = backend.handle(message)
                    except (MessageError, BackendError):
                        return  # the event loop drops the connection: see finally
                    assert not message.fds, "the backend must consume every fd"
                    if reply is not None:
                        reply.encode()  # its fds stay the backend's (a copy is sent)
        finally:
            backend.disconnect()
            if self.other is not None:
                self.other.detach()
            for fd in self.ours + self.pending:
                os.close(fd)
            self.ours.clear()
            self.pending.clear()


@FUZZ
@given(st.data())
def test_fuzz_backend_message_sequences(tmp_path: Path, data: st.DataObject) -> None:
    before = open_fds()
    fuzzer = Fuzzer(tmp_path, data.draw)
    fuzzer.run()  # releases what it made, however the example ends
    after = open_fds()
    leaked = {fd: what for fd, what in after.items() if before.get(fd) != what}
    assert not leaked, f"descriptors leaked: {leaked}"
    assert "DescribePCR" in fuzzer.device.handle(encode_request(DescribePCR(0))).decode("latin-1")


@FUZZ
@given(
    st.binary(max_size=12).map(lambda b: b.ljust(12, b"\0")) | st.sampled_from(
        [HEADER.pack(int(r), VHOST_USER_VERSION, n) for r in R for n in (0, 8, 40)]
    ),
    st.binary(max_size=300),
    st.integers(0, 3),
)
def test_fuzz_message_decoding(header: bytes, payload: bytes, nfds: int) -> None:
    a, b = socket.socketpair()
    fds = [os.eventfd(0) for _ in range(nfds)]
    try:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, b"".join(fd.to_bytes(4, "little") for fd in fds))]
        a.sendmsg([header + payload], anc if fds else [])
        a.shutdown(socket.SHUT_WR)
        conn = Connection(b, timeout=0.5)
        while True:
            try:
                message = conn.recv_message()
            except (MessageError, ConnectionClosed):
                break
            try:
                parse_payload(message)
            except MessageError:
                pass
            finally:
                for fd in message.fds:
                    os.close(fd)
    finally:
        a.close()
        b.close()
        for fd in fds:
            os.close(fd)
