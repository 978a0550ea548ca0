"""The inflight region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), split-ring layout."""

from __future__ import annotations

import contextlib
import os
import struct
from typing import Any

import pytest

from virtio_nsm.vhost_user import inflight
from virtio_nsm.vhost_user.inflight import (
    INFLIGHT_VERSION,
    InflightError,
    InflightRegion,
    queue_region_size,
)
from virtio_nsm.vhost_user.message import Inflight, MessageError
from virtio_nsm.virtio.memory import GuestMemory, MemoryRegion
from virtio_nsm.virtio.queue import DeviceQueue, DriverQueue, RingLayout, Segment, VirtqueueError


def test_layout_matches_the_spec() -> None:
    # 16-byte header + 16 bytes per descriptor, each queue region 64-byte aligned
    # (what libvhost-user and DPDK compute for QEMU).
    assert queue_region_size(64) == 16 + 16 * 64 + 48
    assert queue_region_size(256) == 16 + 16 * 256 + 48
    region = InflightRegion.create(2, 64)
    try:
        assert region.mmap_size == 2 * queue_region_size(64)
        # GET_INFLIGHT_FD hands out zeroes (version 0: no ring has started with it yet).
        assert _read(region.fd) == bytes(region.mmap_size)
        for q, ring_used_idx in ((0, 0), (1, 5)):
            assert region.queue(q).recover(ring_used_idx) == []
        raw = _read(region.fd)
        for q, ring_used_idx in ((0, 0), (1, 5)):
            base = q * queue_region_size(64)
            features, version, desc_num, last_batch, used_idx = struct.unpack_from("<QHHHH", raw, base)
            assert (features, version, desc_num, last_batch, used_idx) == (0, INFLIGHT_VERSION, 64, 0, ring_used_idx)
            flags = [raw[base + 16 + 16 * i] for i in range(64)]
            assert flags == [0] * 64
    finally:
        region.close()


def _read(fd: int) -> bytes:
    with open(f"/proc/self/fd/{fd}", "rb") as fh:
        return fh.read()


def test_taken_returned_published_and_the_counter_order() -> None:
    region = InflightRegion.create(1, 16)
    try:
        q = region.queue(0)
        assert q.recover(ring_used_idx=0) == []
        for head in (5, 2, 9):
            q.taken(head)
        assert [q.is_inflight(h) for h in (5, 2, 9, 0)] == [True, True, True, False]
        tokens = [q.token(h) for h in (5, 2, 9)]
        assert [t.counter for t in tokens] == sorted(t.counter for t in tokens)
        q.returned(5)
        q.published(1)
        assert not q.is_inflight(5) and q.used_idx == 1
        # A new backend on the same region resubmits what is left, in the order taken,
        # and names each request exactly as before.
        successor = InflightRegion.from_fd(os.dup(region.fd), region.mmap_size, 0, 1, 16)
        again = successor.queue(0)
        assert again.recover(ring_used_idx=1) == [2, 9]
        assert [again.token(h) for h in (2, 9)] == tokens[1:]
        assert again.counter > tokens[-1].counter
        successor.close()
    finally:
        region.close()


def test_batch_published_but_not_cleared_is_repaired() -> None:
    region = InflightRegion.create(1, 16)
    try:
        q = region.queue(0)
        assert q.recover(ring_used_idx=0) == []
        for head in (1, 3, 4):
            q.taken(head)
        q.returned(1)
        q.returned(3)
        # The backend published used->idx = 2 and died before clearing the flags.
        assert q.used_idx == 0
        assert q.recover(ring_used_idx=2) == [4]
        assert q.used_idx == 2 and not q.is_inflight(1) and not q.is_inflight(3)
    finally:
        region.close()


def test_counters_start_at_a_random_base_per_region() -> None:
    a, b = InflightRegion.create(1, 8), InflightRegion.create(1, 8)
    try:
        qa, qb = a.queue(0), b.queue(0)
        assert qa.recover(0) == qb.recover(0) == []
        qa.taken(0)
        qb.taken(0)
        assert qa.token(0) != qb.token(0)
    finally:
        a.close()
        b.close()


def test_a_zeroed_region_from_the_frontend_is_initialised() -> None:
    fd = os.memfd_create("test-inflight")
    os.ftruncate(fd, queue_region_size(8))
    region = InflightRegion.from_fd(fd, queue_region_size(8), 0, 1, 8)
    try:
        q = region.queue(0)
        assert q.recover(0) == [] and q.inflight_count == 0
    finally:
        region.close()


def test_first_region_for_a_ring_that_has_run_starts_at_its_used_index() -> None:
    # A frontend's first region may meet a ring that is far along: a migration
    # destination (the rings come with the guest's memory), or a frontend whose ring
    # ran before it had a region. No backend ever took a chain under the region, so
    # nothing is in flight and the ring goes on at used->idx. (This was refused as
    # "used index 23052 is 23052 past the recorded 0".)
    region = InflightRegion.create(1, 64)
    try:
        q = region.queue(0)
        assert q.recover(ring_used_idx=23052) == []
        assert q.used_idx == 23052 and q.inflight_count == 0
        # From then on it is a region in use like any other.
        q.taken(7)
        successor = InflightRegion.from_fd(os.dup(region.fd), region.mmap_size, 0, 1, 64)
        try:
            assert successor.queue(0).recover(ring_used_idx=23052) == [7]
        finally:
            successor.close()
    finally:
        region.close()


class Died(BaseException):
    """The backend is SIGKILLed here."""


class StoreKiller:
    """Counts the stores a backend makes into its region; it dies just before store ``at``."""

    def __init__(self, at: int) -> None:
        self.left = at

    def store(self) -> None:
        self.left -= 1
        if self.left == 0:
            raise Died


class Fields:
    """A tracker's view of the region whose every item store may be the one it dies before."""

    def __init__(self, view: Any, killer: StoreKiller) -> None:
        self.view, self.killer = view, killer

    def __getitem__(self, index: int) -> Any:
        return self.view[index]

    def __setitem__(self, index: int, value: int) -> None:
        self.killer.store()
        self.view[index] = value

    def __iter__(self) -> Any:
        return iter(self.view)

    def release(self) -> None:
        self.view.release()


class PackInto:
    """``struct`` as CPython implements ``pack_into``: the target zero-filled, then the value.

    A backend can die between the two stores (two kill points)."""

    def __init__(self, killer: StoreKiller) -> None:
        self.killer = killer

    def __getattr__(self, name: str) -> Any:
        return getattr(struct, name)

    def pack_into(self, fmt: str, buffer: Any, offset: int, *values: Any) -> None:
        size = struct.calcsize(fmt)
        self.killer.store()
        with memoryview(buffer) as raw:
            raw[offset : offset + size] = bytes(size)
        self.killer.store()
        struct.pack_into(fmt, buffer, offset, *values)


def _life(region: InflightRegion, killer: StoreKiller, ring: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend's work on a ring, as the NSM worker does it: resume, serve a request, take the next."""
    q = region.queue(0)
    for name in ("_u16", "_u64", "_flags"):
        if hasattr(q, name):
            setattr(q, name, Fields(getattr(q, name), killer))
    with monkeypatch.context() as patch:
        patch.setattr(inflight, "struct", PackInto(killer))
        for head in q.recover(ring[0]):  # served again first, each answer published
            q.returned(head)
            ring[0] = (ring[0] + 1) & 0xFFFF  # publish_used: the driver sees the answer
            q.published(ring[0])
        q.taken(1)
        q.taken(2)
        q.returned(1)
        q.returned(2)
        ring[0] = (ring[0] + 2) & 0xFFFF
        q.published(ring[0])
        q.taken(3)  # a request still pending when the life ends


@pytest.mark.parametrize("wrap", [False, True], ids=["mid-range", "used-index-wraps"])
def test_a_backend_killed_at_any_store_leaves_a_region_its_successor_takes(
    monkeypatch: pytest.MonkeyPatch, wrap: bool
) -> None:
    # Each store into the region is whole: a successor sees it done or not done, never
    # a zero-filled or half-written field. (The tracker used struct.pack_into, which
    # zero-fills first: killed in between, a backend left the recorded used index at 0
    # and its successor refused the ring, "used index 23052 is 23052 past the recorded
    # 0": the SIGKILL torture test's rare failure.)
    start = 0xFFFF if wrap else 23050
    for at in range(1, 40):
        region = InflightRegion.create(1, 8)
        try:
            ring = [start]
            _life(region, StoreKiller(10**9), ring, monkeypatch)  # a first life, not killed
            published_before = ring[0]
            killer = StoreKiller(at)
            with contextlib.suppress(Died):
                _life(region, killer, ring, monkeypatch)
            successor = InflightRegion.from_fd(os.dup(region.fd), region.mmap_size, 0, 1, 8)
            try:
                q = successor.queue(0)
                resubmit = q.recover(ring[0])
                # Whatever the kill point: the region now records where the ring is,
                # and what is resubmitted was taken and its answer never published.
                assert q.used_idx == ring[0]
                if (ring[0] - published_before) & 0xFFFF == 3:  # 1 and 2 were published
                    assert resubmit in ([], [3])
                else:
                    assert set(resubmit) <= {1, 2, 3}
            finally:
                successor.close()
        finally:
            region.close()
        if killer.left > 0:
            break  # this life made fewer stores than `at`: every kill point was tried
    else:
        pytest.fail("the life makes more stores than the test tries")


def test_a_region_left_half_initialised_is_fresh_again() -> None:
    # A backend killed before the version store (the last one of the initialisation)
    # leaves version 0 whatever else it wrote; the successor initialises it afresh.
    fd = os.memfd_create("test-inflight")
    os.ftruncate(fd, queue_region_size(8))
    os.pwrite(fd, struct.pack("<QHHHH", 0, 0, 8, 3, 1234) + struct.pack("<B5xHQ", 1, 5, 77) * 8, 0)
    region = InflightRegion.from_fd(fd, queue_region_size(8), 0, 1, 8)
    try:
        q = region.queue(0)
        assert q.fresh
        assert q.recover(ring_used_idx=301) == [] and q.used_idx == 301 and q.inflight_count == 0
    finally:
        region.close()


def test_region_in_use_with_a_used_index_far_ahead_is_still_refused() -> None:
    region = InflightRegion.create(1, 8)
    try:
        assert region.queue(0).recover(ring_used_idx=100) == []
        successor = InflightRegion.from_fd(os.dup(region.fd), region.mmap_size, 0, 1, 8)
        try:
            with pytest.raises(InflightError, match="used index 200 is 100 past the recorded 100"):
                successor.queue(0).recover(ring_used_idx=200)
        finally:
            successor.close()
    finally:
        region.close()


def _raw_region(size: int, version: int, desc_num: int, last_batch: int = 0) -> int:
    fd = os.memfd_create("test-inflight")
    os.ftruncate(fd, queue_region_size(size))
    os.pwrite(fd, struct.pack("<QHHHH", 0, version, desc_num, last_batch, 0), 0)
    return fd


@pytest.mark.parametrize(
    ("version", "desc_num", "reason"),
    [(2, 8, "version 2"), (1, 16, "16 descriptors")],
)
def test_foreign_region_is_refused(version: int, desc_num: int, reason: str) -> None:
    region = InflightRegion.from_fd(_raw_region(8, version, desc_num), queue_region_size(8), 0, 1, 8)
    try:
        with pytest.raises(InflightError, match=reason):
            region.queue(0)
    finally:
        region.close()


def test_corrupt_batch_list_is_refused() -> None:
    region = InflightRegion.from_fd(_raw_region(8, 1, 8, last_batch=99), queue_region_size(8), 0, 1, 8)
    try:
        with pytest.raises(InflightError, match="descriptor 99"):
            region.queue(0).recover(ring_used_idx=1)
        with pytest.raises(InflightError, match="more than the queue size"):
            region.queue(0).recover(ring_used_idx=9)
    finally:
        region.close()


def test_region_too_small_or_misplaced_is_refused() -> None:
    with pytest.raises(InflightError, match="bytes"):
        InflightRegion.from_fd(_raw_region(8, 1, 8), queue_region_size(8), 0, 2, 8)
    with pytest.raises(InflightError, match="page aligned"):
        InflightRegion.from_fd(_raw_region(8, 1, 8), 64, 64, 1, 1)
    with pytest.raises(InflightError, match="queue size"):
        InflightRegion.create(1, 12)


def test_inflight_description_wire_format() -> None:
    desc = Inflight(4096, 0, 1, 64)
    assert len(desc.encode()) == 24  # the naturally aligned C struct QEMU sends
    assert Inflight.decode(desc.encode()) == desc
    assert Inflight.decode(desc.encode()[:20]) == desc
    with pytest.raises(MessageError):
        Inflight.decode(bytes(16))


def test_device_queue_resubmits_a_chain_by_its_head() -> None:
    mem = GuestMemory([MemoryRegion.anonymous(0x10000, 0x10000)])
    layout = RingLayout.contiguous(8, 0x10000)
    drv = DriverQueue(mem, layout)
    dev = DeviceQueue(mem, layout)
    head = drv.add([Segment(0x18000, 5), Segment(0x19000, 16, True)])
    drv.publish()
    popped = dev.pop()
    assert popped is not None
    dev.add_used(head, 0)
    # A restarted device knows only the head: the same chain comes back, checked again.
    again = dev.resubmit(head)
    assert (again.readable, again.writable) == (popped.readable, popped.writable)
    with pytest.raises(VirtqueueError, match="already in flight"):
        dev.resubmit(head)
    with pytest.raises(VirtqueueError, match="outside"):
        dev.resubmit(8)
