"""The backend's protocol state machine, driven with messages directly (no socket)."""

from __future__ import annotations

import logging
import os
import select

import pytest
from vhost_support import sealed_memfd

from virtio_nsm.nsm.virtio import NsmVirtioDevice
from virtio_nsm.vhost_user.backend import (
    MAX_MEM_SLOTS,
    OFFERED_PROTOCOL_FEATURES,
    TRANSPORT_FEATURES,
    BackendError,
    VhostUserBackend,
)
from virtio_nsm.vhost_user.message import (
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    FrontendRequest,
    MemoryRegionDescription,
    MemoryTable,
    Message,
    MessageError,
    ProtocolFeature,
    SingleMemoryRegion,
    VringAddr,
    VringFd,
    VringState,
)
from virtio_nsm.virtio import spec
from virtio_nsm.virtio.memory import GuestMemory, MemoryRegion
from virtio_nsm.virtio.queue import DriverQueue, RingLayout, Segment

R = FrontendRequest
GPA = 0x8000_0000
UVA = 0x7F00_0000_0000
SIZE = 0x20000
QSIZE = 16
REQ = GPA + 0x4000
RESP = GPA + 0x8000
ALL_PROTOCOL = OFFERED_PROTOCOL_FEATURES
FEATURES = TRANSPORT_FEATURES


class Device:
    """Stands in for NsmDevice: counts requests, state survives everything."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, request: bytes, token: object = None, *, max_response: int | None = None) -> bytes:
        self.count += 1
        return b"\x18" + bytes([self.count])  # CBOR uint8


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


class Harness:
    def __init__(self) -> None:
        self.device = Device()
        self.backend = VhostUserBackend(NsmVirtioDevice(self.device))
        self.memfd = sealed_memfd(SIZE)
        self.mem = GuestMemory(
            [MemoryRegion.from_fd(self.memfd, guest_addr=GPA, size=SIZE, user_addr=UVA,
                                  mmap_offset=0)]
        )
        self.layout = RingLayout.contiguous(QSIZE, GPA)
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.err = os.eventfd(0, os.EFD_NONBLOCK)
        self.drv: DriverQueue | None = None

    def close(self) -> None:
        self.backend.disconnect()
        if self.drv is not None:
            self.drv.release()
        self.mem.close()
        for fd in (self.memfd, self.call, self.kick, self.err):
            os.close(fd)

    def send(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = (),
             need_reply: bool = True) -> Message | None:
        flags = VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY_MASK if need_reply else 0)
        return self.backend.handle(Message(request, flags, payload, [os.dup(fd) for fd in fds]))

    def ack(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> int:
        reply = self.send(request, payload, fds)
        assert reply is not None and reply.flags == VHOST_USER_VERSION | VHOST_USER_REPLY_MASK
        return U64.decode(reply.payload).value

    def uva(self, gpa: int) -> int:
        return gpa - GPA + UVA

    def negotiate(self, features: int = FEATURES, protocol: int = ALL_PROTOCOL) -> None:
        self.send(R.VHOST_USER_SET_PROTOCOL_FEATURES, U64(protocol).encode(), need_reply=False)
        assert self.ack(R.VHOST_USER_SET_OWNER) == 0
        assert self.ack(R.VHOST_USER_SET_FEATURES, U64(features).encode()) == 0
        table = MemoryTable((MemoryRegionDescription(GPA, SIZE, UVA, 0),))
        assert self.ack(R.VHOST_USER_SET_MEM_TABLE, table.encode(), (self.memfd,)) == 0
        self.drv = DriverQueue(
            self.mem, self.layout,
            event_idx=bool(features & 1 << spec.VIRTIO_RING_F_EVENT_IDX),
        )

    def program_ring(self, *, call: bool = True, kick: bool = True, enable: bool = True) -> None:
        lay = self.layout
        assert self.ack(R.VHOST_USER_SET_VRING_NUM, VringState(0, QSIZE).encode()) == 0
        assert self.ack(R.VHOST_USER_SET_VRING_BASE, VringState(0, 0).encode()) == 0
        addr = VringAddr(0, 0, self.uva(lay.desc), self.uva(lay.used), self.uva(lay.avail), 0)
        assert self.ack(R.VHOST_USER_SET_VRING_ADDR, addr.encode()) == 0
        assert self.ack(R.VHOST_USER_SET_VRING_ERR, VringFd(0, False).encode(), (self.err,)) == 0
        if call:
            self.set_call()
        if kick:
            assert self.ack(
                R.VHOST_USER_SET_VRING_KICK, VringFd(0, False).encode(), (self.kick,)
            ) == 0
        if enable:
            assert self.ack(R.VHOST_USER_SET_VRING_ENABLE, VringState(0, 1).encode()) == 0

    def set_call(self) -> None:
        assert self.ack(R.VHOST_USER_SET_VRING_CALL, VringFd(0, False).encode(), (self.call,)) == 0

    def queue_request(self, data: bytes = b"req", slot: int = 0) -> tuple[int, int]:
        assert self.drv is not None
        self.mem.write(REQ + 0x10 * slot, data)
        h1 = self.drv.add([Segment(REQ + 0x10 * slot, len(data))])
        h2 = self.drv.add([Segment(RESP + 0x3000 * slot, 0x3000, True)])
        self.drv.publish()
        return h1, h2

    def status(self) -> int:
        reply = self.send(R.VHOST_USER_GET_STATUS, need_reply=False)
        assert reply is not None
        return U64.decode(reply.payload).value


@pytest.fixture
def h() -> Harness:
    harness = Harness()
    yield harness  # type: ignore[misc]
    harness.close()


def test_feature_replies(h: Harness) -> None:
    for request, value in [
        (R.VHOST_USER_GET_FEATURES, FEATURES),
        (R.VHOST_USER_GET_PROTOCOL_FEATURES, ALL_PROTOCOL),
        (R.VHOST_USER_GET_QUEUE_NUM, 1),
        (R.VHOST_USER_GET_MAX_MEM_SLOTS, MAX_MEM_SLOTS),
    ]:
        reply = h.send(request, need_reply=False)
        assert reply is not None
        assert reply.request == request and U64.decode(reply.payload).value == value
    assert FEATURES == (1 << 32 | 1 << 30 | 1 << 29 | 1 << 28)
    pf = ProtocolFeature
    for bit in (pf.VHOST_USER_PROTOCOL_F_REPLY_ACK, pf.VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS,
                pf.VHOST_USER_PROTOCOL_F_RESET_DEVICE, pf.VHOST_USER_PROTOCOL_F_STATUS,
                pf.VHOST_USER_PROTOCOL_F_MQ):
        assert ALL_PROTOCOL & (1 << bit)
    assert not ALL_PROTOCOL & (1 << pf.VHOST_USER_PROTOCOL_F_CONFIG)  # config size 0


def test_reply_ack_success_and_failure(h: Harness) -> None:
    h.negotiate()
    assert h.ack(R.VHOST_USER_SET_FEATURES, U64(1 << 3).encode()) == 1  # never offered
    assert h.ack(R.VHOST_USER_SET_VRING_NUM, VringState(0, 12).encode()) == 1  # not 2^n
    assert h.ack(R.VHOST_USER_SET_VRING_NUM, VringState(5, 16).encode()) == 1  # no vring 5
    assert h.ack(R.VHOST_USER_SET_VRING_BASE, VringState(0, 1 << 16).encode()) == 1
    assert h.ack(R.VHOST_USER_SET_VRING_ENABLE, VringState(0, 2).encode()) == 1
    assert h.ack(R.VHOST_USER_SET_STATUS, U64(0x100).encode()) == 1
    assert h.ack(R.VHOST_USER_SET_VRING_KICK, VringFd(0, True).encode()) == 1  # polling
    # Without need_reply nothing can be said: the caller must drop the connection.
    with pytest.raises(BackendError):
        h.send(R.VHOST_USER_SET_FEATURES, U64(1 << 3).encode(), need_reply=False)


def test_without_reply_ack_no_acknowledgements(h: Harness) -> None:
    h.send(R.VHOST_USER_SET_PROTOCOL_FEATURES, U64(0).encode(), need_reply=False)
    assert h.send(R.VHOST_USER_SET_OWNER) is None
    with pytest.raises(BackendError, match="were not offered"):
        h.send(R.VHOST_USER_SET_PROTOCOL_FEATURES, U64(1 << 9).encode())


def test_request_served_and_call_signalled(h: Harness) -> None:
    h.negotiate()
    h.program_ring()
    h1, h2 = h.queue_request()
    h.backend.kick(0)
    assert h.drv is not None
    assert h.drv.collect_used() == [(h1, 0), (h2, 2)]
    assert h.mem.read(RESP, 2) == b"\x18\x01"
    assert readable(h.call)
    assert os.eventfd_read(h.call) == 1  # exactly one interrupt


def test_early_kick_is_served_when_the_ring_is_enabled(h: Harness) -> None:
    h.negotiate()
    h.program_ring(enable=False)
    h.queue_request()
    h.backend.kick(0)  # kicked before SET_VRING_ENABLE: rings start disabled
    assert h.device.count == 0
    assert h.ack(R.VHOST_USER_SET_VRING_ENABLE, VringState(0, 1).encode()) == 0
    assert h.device.count == 1
    assert readable(h.call)


def test_chains_queued_before_the_kick_fd_arrives_are_served(h: Harness) -> None:
    h.negotiate()
    h.program_ring(kick=False)
    h.queue_request()
    assert h.device.count == 0
    assert h.ack(R.VHOST_USER_SET_VRING_KICK, VringFd(0, False).encode(), (h.kick,)) == 0
    assert h.device.count == 1


def test_without_protocol_features_rings_start_enabled(h: Harness) -> None:
    h.negotiate(features=FEATURES & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES))
    h.program_ring(enable=False)
    h.queue_request()
    h.backend.kick(0)
    assert h.device.count == 1


def test_late_call_fd_gets_the_pending_interrupt(h: Harness) -> None:
    h.negotiate()
    h.program_ring(call=False)
    h.queue_request()
    h.backend.kick(0)
    assert h.device.count == 1 and not readable(h.call)
    h.set_call()
    assert readable(h.call)
    assert os.eventfd_read(h.call) == 1


def test_get_vring_base_stops_the_ring_and_gives_back_a_held_request(h: Harness) -> None:
    h.negotiate()
    h.program_ring()
    h.queue_request()
    h.backend.kick(0)
    assert h.drv is not None
    assert len(h.drv.collect_used()) == 2
    # A lone request chain: held, waiting for its response chain.
    h.mem.write(REQ, b"q")
    h.drv.add([Segment(REQ, 1)])
    h.drv.publish()
    h.backend.kick(0)
    reply = h.send(R.VHOST_USER_GET_VRING_BASE, VringState(0, 0).encode(), need_reply=False)
    assert reply is not None
    assert VringState.decode(reply.payload) == VringState(0, 2)  # not 3: given back
    assert h.backend.kick_fds() == {}
    h.drv.add([Segment(RESP, 0x3000, True)])
    h.drv.publish()
    h.backend.kick(0)
    assert h.device.count == 1  # stopped: nothing processed
    # Restart where it stopped: the pair is served.
    assert h.ack(R.VHOST_USER_SET_VRING_BASE, VringState(0, 2).encode()) == 0
    assert h.ack(R.VHOST_USER_SET_VRING_KICK, VringFd(0, False).encode(), (h.kick,)) == 0
    assert h.device.count == 2
    assert [n for _, n in h.drv.collect_used()] == [0, 2]


def test_hostile_ring_sets_needs_reset_and_signals_err(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    h.negotiate()
    h.program_ring()
    assert h.ack(R.VHOST_USER_SET_STATUS, U64(0xF).encode()) == 0
    assert h.drv is not None
    h.drv.raw_descriptor(0, 0xDEAD_BEEF_0000, 16, 0, 0)
    h.drv.raw_avail([0])
    with caplog.at_level(logging.ERROR, logger="virtio_nsm.vhost_user"):
        h.backend.kick(0)
    assert h.status() == 0xF | spec.VIRTIO_CONFIG_S_NEEDS_RESET
    assert readable(h.err)
    assert "device needs reset" in caplog.text and "not backed by guest memory" in caplog.text
    assert h.device.count == 0
    # A virtio reset clears it; the device itself is untouched.
    assert h.ack(R.VHOST_USER_SET_STATUS, U64(0).encode()) == 0
    assert h.status() == 0


def test_reset_device_keeps_device_state(h: Harness) -> None:
    h.negotiate()
    h.program_ring()
    h.queue_request()
    h.backend.kick(0)
    assert h.ack(R.VHOST_USER_RESET_DEVICE) == 0
    assert h.backend.kick_fds() == {} and h.backend.features == 0
    # Reinitialise like a guest after reset: rings start from zero again.
    h.drv = None
    h.negotiate()
    h.program_ring()
    h.queue_request()
    h.backend.kick(0)
    assert h.mem.read(RESP, 2) == b"\x18\x02"  # the device kept counting


def test_add_and_remove_memory_regions(h: Harness) -> None:
    h.send(R.VHOST_USER_SET_PROTOCOL_FEATURES, U64(ALL_PROTOCOL).encode(), need_reply=False)
    region = MemoryRegionDescription(GPA, SIZE, UVA, 0)
    assert h.ack(R.VHOST_USER_ADD_MEM_REG, SingleMemoryRegion(region).encode(), (h.memfd,)) == 0
    # Overlap with itself.
    assert h.ack(R.VHOST_USER_ADD_MEM_REG, SingleMemoryRegion(region).encode(), (h.memfd,)) == 1
    assert h.ack(R.VHOST_USER_SET_FEATURES, U64(FEATURES).encode()) == 0
    h.drv = DriverQueue(h.mem, h.layout, event_idx=True)
    h.program_ring()
    h.queue_request()
    h.backend.kick(0)
    assert h.device.count == 1
    other = MemoryRegionDescription(GPA, SIZE, UVA + 0x1000, 0)
    assert h.ack(R.VHOST_USER_REM_MEM_REG, SingleMemoryRegion(other).encode()) == 1
    assert h.ack(R.VHOST_USER_REM_MEM_REG, SingleMemoryRegion(region).encode()) == 0
    assert len(h.backend.memory) == 0
    h.queue_request(slot=1)
    h.backend.kick(0)
    assert h.device.count == 1  # no memory, no processing, no crash


def test_memory_table_longer_than_its_file_is_refused(h: Harness) -> None:
    h.send(R.VHOST_USER_SET_PROTOCOL_FEATURES, U64(ALL_PROTOCOL).encode(), need_reply=False)
    table = MemoryTable((MemoryRegionDescription(GPA, SIZE * 2, UVA, 0),))
    assert h.ack(R.VHOST_USER_SET_MEM_TABLE, table.encode(), (h.memfd,)) == 1
    assert len(h.backend.memory) == 0


def test_ring_addresses_outside_memory_break_the_ring(h: Harness) -> None:
    h.negotiate()
    addr = VringAddr(0, 0, 0x1234_0000, UVA, UVA + 0x1000, 0)
    assert h.ack(R.VHOST_USER_SET_VRING_NUM, VringState(0, QSIZE).encode()) == 0
    assert h.ack(R.VHOST_USER_SET_VRING_ADDR, addr.encode()) == 0
    assert h.ack(R.VHOST_USER_SET_VRING_KICK, VringFd(0, False).encode(), (h.kick,)) == 0
    assert h.ack(R.VHOST_USER_SET_VRING_ENABLE, VringState(0, 1).encode()) == 0
    assert h.status() & spec.VIRTIO_CONFIG_S_NEEDS_RESET


def test_received_fds_are_closed_on_errors(h: Harness) -> None:
    fd = os.eventfd(0)
    with pytest.raises(MessageError):
        h.backend.handle(Message(R.VHOST_USER_SET_OWNER, fds=[fd]))
    with pytest.raises(OSError):
        os.fstat(fd)


def test_disconnect_drops_transport_state(h: Harness) -> None:
    h.negotiate()
    h.program_ring()
    h.backend.disconnect()
    assert h.backend.kick_fds() == {}
    assert len(h.backend.memory) == 0
    assert (h.backend.features, h.backend.protocol_features, h.backend.owner) == (0, 0, False)
