"""NSM queue semantics (facts §3) over fake guest memory, with a fake handler."""

from __future__ import annotations

import pytest

from virtio_nsm.errors import ErrorCode
from virtio_nsm.nsm.protocol import MAX_REQUEST_SIZE, encode_error
from virtio_nsm.nsm.virtio import NsmQueueWorker
from virtio_nsm.virtio.memory import GuestMemory, MemoryRegion
from virtio_nsm.virtio.queue import DeviceQueue, DriverQueue, RingLayout, Segment, VirtqueueError

BASE = 0x20_0000
REQ = BASE + 0x1000
RESP = BASE + 0x4000


class Recorder:
    def __init__(self, reply: bytes | None = None, fail: bool = False) -> None:
        self.requests: list[bytes] = []
        self.reply = reply
        self.fail = fail

    def __call__(self, request: bytes, token: object = None, *, max_response: int | None = None) -> bytes:
        self.requests.append(request)
        if self.fail:
            raise RuntimeError("boom")
        return self.reply if self.reply is not None else b"\x61" + request[:8]


def setup(
    handler: Recorder, size: int = 16
) -> tuple[GuestMemory, DriverQueue, DeviceQueue, NsmQueueWorker]:
    mem = GuestMemory([MemoryRegion.anonymous(BASE, 0x40000)])
    layout = RingLayout.contiguous(size, BASE + 0x30000)
    drv = DriverQueue(mem, layout, event_idx=True)
    dev = DeviceQueue(mem, layout, event_idx=True)
    return mem, drv, dev, NsmQueueWorker(dev, handler)


def linux_request(mem: GuestMemory, drv: DriverQueue, request: bytes, slot: int = 0,
                  resp_len: int = 0x3000) -> tuple[int, int]:
    """What nsm.ko does: one readable chain of the real length, one writable 0x3000 chain."""
    addr = REQ + slot * 0x100
    mem.write(addr, request)
    h1 = drv.add([Segment(addr, len(request))])
    h2 = drv.add([Segment(RESP + slot * 0x3000 if resp_len == 0x3000 else RESP, resp_len, True)])
    return h1, h2


def test_pair_is_answered_request_first_with_len_0_then_exact_response() -> None:
    handler = Recorder(reply=b"\xa1\x61x\x01")
    mem, drv, dev, worker = setup(handler)
    h1, h2 = linux_request(mem, drv, b"\x69GetRandom")
    drv.publish()
    assert worker.process() is True
    assert handler.requests == [b"\x69GetRandom"]
    assert drv.collect_used() == [(h1, 0), (h2, 4)]
    assert mem.read(RESP, 4) == b"\xa1\x61x\x01"
    assert dev.needs_notify() is True


def test_every_available_pair_is_served_in_one_pass() -> None:
    handler = Recorder()
    mem, drv, _dev, worker = setup(handler)
    pairs = [linux_request(mem, drv, bytes([0x41 + i]) * 3, slot=i) for i in range(3)]
    drv.publish()
    assert worker.process() is True
    used = drv.collect_used()
    assert used == [(h, n) for h1, h2 in pairs for h, n in ((h1, 0), (h2, 4))]
    assert handler.requests == [b"AAA", b"BBB", b"CCC"]


def test_single_chain_with_readable_and_writable_parts() -> None:
    handler = Recorder(reply=b"ok")
    mem, drv, _dev, worker = setup(handler)
    mem.write(REQ, b"req")
    head = drv.add([Segment(REQ, 3), Segment(RESP, 0x3000, True)])
    drv.publish()
    worker.process()
    assert drv.collect_used() == [(head, 2)]
    assert handler.requests == [b"req"]


def test_request_waits_for_its_response_chain() -> None:
    handler = Recorder()
    mem, drv, _dev, worker = setup(handler)
    mem.write(REQ, b"abc")
    h1 = drv.add([Segment(REQ, 3)])
    drv.publish()
    assert worker.process() is False  # held, not answered, no error
    assert worker.pending is not None and handler.requests == []
    h2 = drv.add([Segment(RESP, 0x3000, True)])
    drv.publish()
    assert worker.process() is True
    assert drv.collect_used() == [(h1, 0), (h2, 4)]


def test_rewind_gives_back_a_held_request() -> None:
    _mem, drv, dev, worker = setup(Recorder())
    drv.add([Segment(REQ, 3)])
    drv.publish()
    worker.process()
    assert dev.last_avail_idx == 1
    assert worker.rewind() == 0  # what GET_VRING_BASE reports
    assert dev.available() == 1


def test_missing_response_chain_breaks_the_ring() -> None:
    _mem, drv, _dev, worker = setup(Recorder())
    drv.add([Segment(REQ, 3)])
    drv.add([Segment(REQ, 3)])
    drv.publish()
    with pytest.raises(VirtqueueError, match="not a device-writable response buffer"):
        worker.process()


def test_response_chain_without_request_breaks_the_ring() -> None:
    _mem, drv, _dev, worker = setup(Recorder())
    drv.add([Segment(RESP, 0x3000, True)])
    drv.publish()
    with pytest.raises(VirtqueueError, match="no request before it"):
        worker.process()


def test_small_response_buffer_gets_buffer_too_small() -> None:
    handler = Recorder(reply=b"x" * 100)
    mem, drv, _dev, worker = setup(handler)
    h1, h2 = linux_request(mem, drv, b"req", resp_len=64)
    drv.publish()
    worker.process()
    too_small = encode_error(ErrorCode.BufferTooSmall)
    assert drv.collect_used() == [(h1, 0), (h2, len(too_small))]
    assert mem.read(RESP, len(too_small)) == too_small


def test_tiny_response_buffer_gets_nothing() -> None:
    mem, drv, _dev, worker = setup(Recorder(reply=b"x" * 100))
    h1, h2 = linux_request(mem, drv, b"req", resp_len=4)
    drv.publish()
    worker.process()
    assert drv.collect_used() == [(h1, 0), (h2, 0)]


def test_oversized_request_is_passed_truncated_to_limit_plus_one() -> None:
    handler = Recorder()
    _mem, drv, _dev, worker = setup(handler)
    # A 0x2000-byte request made of two descriptors.
    h1 = drv.add([Segment(REQ, 0x1000), Segment(REQ + 0x1000, 0x1000)])
    drv.add([Segment(RESP, 0x3000, True)])
    drv.publish()
    worker.process()
    assert [len(r) for r in handler.requests] == [MAX_REQUEST_SIZE + 1]
    assert drv.collect_used()[0] == (h1, 0)


def test_handler_exception_becomes_internal_error() -> None:
    mem, drv, _dev, worker = setup(Recorder(fail=True))
    h1, h2 = linux_request(mem, drv, b"req")
    drv.publish()
    worker.process()
    internal = encode_error(ErrorCode.InternalError)
    assert drv.collect_used() == [(h1, 0), (h2, len(internal))]
    assert mem.read(RESP, len(internal)) == internal


def test_oversized_handler_response_becomes_internal_error() -> None:
    mem, drv, _dev, worker = setup(Recorder(reply=b"x" * 0x3001))
    _h1, h2 = linux_request(mem, drv, b"req")
    drv.publish()
    worker.process()
    assert drv.collect_used()[1] == (h2, len(encode_error(ErrorCode.InternalError)))
