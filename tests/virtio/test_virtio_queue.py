from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtio_nsm.virtio import spec
from virtio_nsm.virtio.memory import GuestMemory, MemoryRegion
from virtio_nsm.virtio.queue import (
    Chain,
    DeviceQueue,
    DriverQueue,
    RingLayout,
    Segment,
    VirtqueueError,
)

BASE = 0x10_0000
SIZE = 8
BUF = BASE + 0x4000  # data area after the rings
MEM_SIZE = 0x10000

F_NEXT = spec.VIRTQ_DESC_F_NEXT
F_WRITE = spec.VIRTQ_DESC_F_WRITE
F_INDIRECT = spec.VIRTQ_DESC_F_INDIRECT


def make(
    *, event_idx: bool = False, indirect: bool = True, size: int = SIZE
) -> tuple[GuestMemory, DriverQueue, DeviceQueue]:
    mem = GuestMemory([MemoryRegion.anonymous(BASE, MEM_SIZE, user_addr=0x7F00_0000)])
    layout = RingLayout.contiguous(size, BASE)
    drv = DriverQueue(mem, layout, event_idx=event_idx, indirect=indirect)
    dev = DeviceQueue(mem, layout, event_idx=event_idx, indirect=indirect)
    return mem, drv, dev


def test_round_trip_request_and_response_chains() -> None:
    mem, drv, dev = make()
    mem.write(BUF, b"request!")
    h1 = drv.add([Segment(BUF, 8)])
    h2 = drv.add([Segment(BUF + 0x100, 0x40, True), Segment(BUF + 0x200, 0x40, True)])
    assert drv.publish() is True
    assert dev.available() == 2

    c1 = dev.pop()
    c2 = dev.pop()
    assert dev.pop() is None
    assert c1 is not None and c2 is not None
    assert (c1.head, c1.readable_len, c1.writable_len) == (h1, 8, 0)
    assert (c2.head, c2.readable_len, c2.writable_len) == (h2, 0, 0x80)
    assert c1.read(mem, 100) == b"request!"
    assert c1.read(mem, 3) == b"req"
    # The response is scattered over both writable descriptors.
    assert c2.write(mem, b"x" * 0x50) == 0x50
    assert mem.read(BUF + 0x100, 0x40) == b"x" * 0x40
    assert mem.read(BUF + 0x200, 0x10) == b"x" * 0x10

    dev.add_used(h1, 0)
    dev.add_used(h2, 0x50)
    assert drv.collect_used() == []  # not published yet
    dev.publish_used()
    assert drv.collect_used() == [(h1, 0), (h2, 0x50)]
    assert drv.free_descriptors == SIZE
    assert dev.in_flight == 0 and drv.in_flight == 0


def test_write_larger_than_writable_part_is_refused() -> None:
    mem, drv, dev = make()
    drv.add([Segment(BUF, 4, True)])
    drv.publish()
    chain = dev.pop()
    assert chain is not None
    with pytest.raises(VirtqueueError, match="do not fit"):
        chain.write(mem, b"12345")


def test_indirect_chain() -> None:
    mem, drv, dev = make()
    mem.write(BUF, b"abc")
    head = drv.add(
        [Segment(BUF, 3), Segment(BUF + 0x10, 0x20, True)], indirect_table=BASE + 0x3000
    )
    assert drv.free_descriptors == SIZE - 1  # one ring descriptor for the whole chain
    drv.publish()
    chain = dev.pop()
    assert chain is not None and chain.head == head
    assert chain.readable == [Segment(BUF, 3)]
    assert chain.writable == [Segment(BUF + 0x10, 0x20, True)]
    dev.add_used(head, 7)
    dev.publish_used()
    assert drv.collect_used() == [(head, 7)]
    assert drv.free_descriptors == SIZE


def test_many_rounds_wrap_the_ring() -> None:
    _mem, drv, dev = make(event_idx=True)
    for i in range(3 * SIZE + 3):
        h = drv.add([Segment(BUF, 1), Segment(BUF + 8, 8, True)])
        drv.publish()
        chain = dev.pop()
        assert chain is not None and chain.head == h
        dev.add_used(h, i % 9)
        dev.publish_used()
        assert drv.collect_used() == [(h, i % 9)]


def test_sixteen_bit_index_wraparound_on_the_device() -> None:
    mem, drv, dev = make()
    layout = dev.layout
    drv.raw_descriptor(0, BUF, 4, 0, 0)
    drv.raw_descriptor(1, BUF, 4, 0, 0)
    # The driver's free-running index has wrapped from 0xFFFF to 0x0001.
    mem.write(layout.avail + 4 + 2 * (0xFFFF % SIZE), struct.pack("<H", 0))
    mem.write(layout.avail + 4 + 2 * (0x0000 % SIZE), struct.pack("<H", 1))
    mem.write(layout.avail + 2, struct.pack("<H", 0x0001))
    wrapped = DeviceQueue(mem, layout, last_avail_idx=0xFFFF, used_idx=0xFFFF)
    assert wrapped.available() == 2
    first, second = wrapped.pop(), wrapped.pop()
    assert first is not None and second is not None
    assert (first.head, second.head) == (0, 1)
    assert wrapped.last_avail_idx == 1
    wrapped.add_used(0, 0)
    wrapped.add_used(1, 0)
    wrapped.publish_used()
    assert wrapped.used_idx == 1


# -- notification suppression --------------------------------------------------------


def test_event_idx_interrupt_only_when_used_event_is_crossed() -> None:
    _mem, drv, dev = make(event_idx=True)
    heads = [drv.add([Segment(BUF + i, 1, True)]) for i in range(4)]
    drv.request_interrupt_after(4)  # used_event = 3
    drv.publish()
    chains = [dev.pop() for _ in heads]
    for chain in chains[:2]:
        assert chain is not None
        dev.add_used(chain.head, 0)
    dev.publish_used()
    assert dev.needs_notify() is True  # first decision is always "yes"
    chain = chains[2]
    assert chain is not None
    dev.add_used(chain.head, 0)
    dev.publish_used()
    assert dev.needs_notify() is False  # used idx 3 has not passed used_event 3
    chain = chains[3]
    assert chain is not None
    dev.add_used(chain.head, 0)
    dev.publish_used()
    assert dev.needs_notify() is True  # used idx 4 passed 3


def test_event_idx_kick_only_when_avail_event_is_crossed() -> None:
    _mem, drv, dev = make(event_idx=True)
    drv.add([Segment(BUF, 1)])
    assert drv.publish() is True  # avail_event 0 crossed by 0 -> 1
    dev.pop()
    # The device has not published avail_event (still 0): no further kicks wanted.
    drv.add([Segment(BUF, 1)])
    assert drv.publish() is False
    dev.pop()
    dev.publish_avail_event()  # now asks for a kick at index 2
    drv.add([Segment(BUF, 1)])
    assert drv.publish() is True
    assert drv.publish() is False  # nothing new


def test_flags_suppress_notifications_without_event_idx() -> None:
    mem, drv, dev = make(event_idx=False)
    layout = dev.layout
    drv.add([Segment(BUF, 1, True)])
    mem.write_u16(layout.used, spec.VIRTQ_USED_F_NO_NOTIFY)
    assert drv.publish() is False
    mem.write_u16(layout.used, 0)
    drv.add([Segment(BUF, 1, True)])
    assert drv.publish() is True
    for _ in range(2):
        chain = dev.pop()
        assert chain is not None
        dev.add_used(chain.head, 0)
    dev.publish_used()
    mem.write_u16(layout.avail, spec.VIRTQ_AVAIL_F_NO_INTERRUPT)
    assert dev.needs_notify() is False
    mem.write_u16(layout.avail, 0)
    assert dev.needs_notify() is True


@pytest.mark.parametrize(
    ("event", "new", "old", "expected"),
    [(0, 1, 0, True), (1, 1, 0, False), (5, 7, 5, True), (0xFFFF, 0, 0xFFFE, True),
     (0xFFFF, 0xFFFF, 0xFFFE, False), (10, 12, 11, False)],
)
def test_vring_need_event(event: int, new: int, old: int, expected: bool) -> None:
    assert spec.vring_need_event(event, new, old) is expected


# -- hostile rings: the device side ------------------------------------------------------


def hostile(*descs: tuple[int, int, int, int], heads: tuple[int, ...] = (0,),
            indirect: bool = True) -> DeviceQueue:
    _mem, drv, dev = make(indirect=indirect)
    for i, d in enumerate(descs):
        drv.raw_descriptor(i, *d)
    drv.raw_avail(heads)
    return dev


@pytest.mark.parametrize(
    ("descs", "heads", "match"),
    [
        ([(BUF, 8, 0, 0)], (SIZE,), "outside the descriptor table"),
        ([(BUF, 8, F_NEXT, SIZE + 3)], (0,), "outside the descriptor table"),
        ([(BUF, 8, F_NEXT, 0)], (0,), "more than 8 descriptors"),  # self loop
        ([(BUF, 8, F_NEXT, 1), (BUF, 8, F_NEXT, 0)], (0,), "more than 8"),  # 2-cycle
        ([(BUF, 8, F_NEXT, i + 1) for i in range(SIZE - 1)] + [(BUF, 8, F_NEXT, 2)], (0,),
         "more than 8"),  # loops back after a long run
        ([(0xDEAD_0000, 8, 0, 0)], (0,), "not backed by guest memory"),
        ([(BASE + MEM_SIZE - 4, 8, 0, 0)], (0,), "not backed"),  # straddles the end
        ([(BUF, 0xFFFF_FFFF, 0, 0)], (0,), "not backed"),
        ([(BUF, 8, F_WRITE | F_NEXT, 1), (BUF, 8, 0, 0)], (0,), "readable descriptor after"),
        ([(BASE + 0x3000, 15, F_INDIRECT, 0)], (0,), "not a positive multiple of 16"),
        ([(BASE + 0x3000, 0, F_INDIRECT, 0)], (0,), "not a positive multiple of 16"),
        ([(BASE + 0x3000, 16 * (SIZE + 1), F_INDIRECT, 0)], (0,), "longer than the queue"),
        ([(0xDEAD_0000, 32, F_INDIRECT, 0)], (0,), "indirect table"),
        ([(BASE + 0x3000, 32, F_INDIRECT | F_NEXT, 1)], (0,), "must be the whole chain"),
        ([(BUF, 8, F_NEXT, 1), (BASE + 0x3000, 32, F_INDIRECT, 0)], (0,),
         "must be the whole chain"),
    ],
)
def test_hostile_descriptors_are_refused(
    descs: list[tuple[int, int, int, int]], heads: tuple[int, ...], match: str
) -> None:
    dev = hostile(*descs, heads=heads)
    with pytest.raises(VirtqueueError, match=match):
        dev.pop()


def test_indirect_without_the_feature_is_refused() -> None:
    dev = hostile((BASE + 0x3000, 32, F_INDIRECT, 0), indirect=False)
    with pytest.raises(VirtqueueError, match="without VIRTIO_RING_F_INDIRECT_DESC"):
        dev.pop()


def test_indirect_table_hostile_contents() -> None:
    mem, drv, dev = make()
    table = BASE + 0x3000
    drv.raw_descriptor(0, table, 32, F_INDIRECT, 0)
    # Entry 0 points to itself: a loop inside the indirect table.
    mem.write(table, struct.pack("<QIHH", BUF, 8, F_NEXT, 0))
    mem.write(table + 16, struct.pack("<QIHH", BUF, 8, 0, 0))
    drv.raw_avail([0])
    with pytest.raises(VirtqueueError, match="more than 2 descriptors"):
        dev.pop()
    mem2, drv2, dev2 = make()
    drv2.raw_descriptor(0, table, 16, F_INDIRECT, 0)
    mem2.write(table, struct.pack("<QIHH", table, 16, F_INDIRECT, 0))  # nested
    drv2.raw_avail([0])
    with pytest.raises(VirtqueueError, match="nested"):
        dev2.pop()
    mem3, drv3, dev3 = make()
    drv3.raw_descriptor(0, table, 16, F_INDIRECT, 0)
    mem3.write(table, struct.pack("<QIHH", BUF, 8, F_NEXT, 5))  # next outside a 1-entry table
    drv3.raw_avail([0])
    with pytest.raises(VirtqueueError, match="outside the indirect table"):
        dev3.pop()


def test_available_index_running_ahead_is_refused() -> None:
    _mem, drv, dev = make()
    drv.raw_avail([], idx_delta=SIZE + 1)
    with pytest.raises(VirtqueueError, match="more than the queue size"):
        dev.available()


def test_head_made_available_twice_while_in_flight_is_refused() -> None:
    _mem, drv, dev = make()
    drv.raw_descriptor(0, BUF, 8, 0, 0)
    drv.raw_avail([0, 0])
    assert dev.pop() is not None
    with pytest.raises(VirtqueueError, match="again while in flight"):
        dev.pop()


def test_total_length_overflow_is_refused() -> None:
    big = GuestMemory([MemoryRegion.anonymous(BASE, MEM_SIZE)])
    layout = RingLayout.contiguous(SIZE, BASE)
    drv = DriverQueue(big, layout)
    dev = DeviceQueue(big, layout)
    # Zero-length descriptors need no memory; two 3 GiB ones can't be checked, so the
    # check order matters: use lengths the memory *cannot* back to get a clear error.
    drv.raw_descriptor(0, BUF, 0x8000_0000, F_NEXT, 1)
    drv.raw_descriptor(1, BUF, 0x8000_0000, 0, 0)
    drv.raw_avail([0])
    with pytest.raises(VirtqueueError):
        dev.pop()


@pytest.mark.parametrize(
    ("layout", "match"),
    [
        (RingLayout(6, BASE, BASE + 0x100, BASE + 0x1000), "power of two"),
        (RingLayout(0, BASE, BASE + 0x100, BASE + 0x1000), "power of two"),
        (RingLayout(8, BASE + 8, BASE + 0x100, BASE + 0x1000), "not 16-byte aligned"),
        (RingLayout(8, BASE, BASE + 0x101, BASE + 0x1000), "not 2-byte aligned"),
        (RingLayout(8, BASE, BASE + 0x100, BASE + 0x1002), "not 4-byte aligned"),
        (RingLayout(8, BASE + MEM_SIZE - 0x40, BASE + 0x100, BASE + 0x1000), "not in guest"),
        (RingLayout(8, BASE, BASE + 0x100, 0xDEAD_0000), "not in guest memory"),
    ],
)
def test_bad_ring_layouts_are_refused(layout: RingLayout, match: str) -> None:
    mem = GuestMemory([MemoryRegion.anonymous(BASE, MEM_SIZE)])
    with pytest.raises(VirtqueueError, match=match):
        DeviceQueue(mem, layout)


def test_device_refuses_its_own_misuse() -> None:
    _mem, drv, dev = make()
    h = drv.add([Segment(BUF, 4, True)])
    drv.publish()
    chain = dev.pop()
    assert chain is not None
    with pytest.raises(ValueError, match="exceeds"):
        dev.add_used(h, 5)
    with pytest.raises(ValueError, match="not in flight"):
        dev.add_used((h + 1) % SIZE, 0)


def test_unpop_gives_the_last_chain_back() -> None:
    _mem, drv, dev = make()
    drv.add([Segment(BUF, 4)])
    drv.publish()
    chain = dev.pop()
    assert chain is not None
    dev.unpop(chain)
    assert dev.available() == 1 and dev.in_flight == 0
    again = dev.pop()
    assert again is not None and again.head == chain.head


# -- hostile rings: the driver side --------------------------------------------------------


def test_driver_refuses_bogus_used_entries() -> None:
    mem, drv, dev = make()
    layout = dev.layout
    h = drv.add([Segment(BUF, 4, True)])
    drv.publish()
    mem.write(layout.used + 4, struct.pack("<II", (h + 1) % SIZE, 0))
    mem.write_u16(layout.used + 2, 1)
    with pytest.raises(VirtqueueError, match="not in flight"):
        drv.collect_used()

    mem, drv, dev = make()
    h = drv.add([Segment(BUF, 4, True)])
    drv.publish()
    mem.write(layout.used + 4, struct.pack("<II", h, 5))
    mem.write_u16(layout.used + 2, 1)
    with pytest.raises(VirtqueueError, match="4 writable bytes"):
        drv.collect_used()

    mem, drv, dev = make()
    drv.add([Segment(BUF, 4, True)])
    drv.publish()
    mem.write_u16(layout.used + 2, 2)
    with pytest.raises(VirtqueueError, match="1 buffers in flight"):
        drv.collect_used()


def test_driver_validates_chains_it_builds() -> None:
    _mem, drv, _dev = make(indirect=False)
    with pytest.raises(ValueError, match="readable segments must come before"):
        drv.add([Segment(BUF, 1, True), Segment(BUF, 1)])
    with pytest.raises(ValueError, match="at least one"):
        drv.add([])
    with pytest.raises(ValueError, match="INDIRECT"):
        drv.add([Segment(BUF, 1)], indirect_table=BASE + 0x3000)
    with pytest.raises(ValueError, match="no room"):
        drv.add([Segment(BUF, 1)] * (SIZE + 1))


# -- fuzzing: whatever the descriptor table says, pop() validates or refuses ------------

_desc = st.tuples(
    st.sampled_from([BUF, BASE, BASE + MEM_SIZE - 8, 0, 0xFFFF_FFFF_FFFF_FFF0, BASE + 0x3000]),
    st.sampled_from([0, 1, 8, 16, 32, 0x1000, 0xFFFF_FFFF]),
    st.integers(0, 7),
    st.integers(0, 12),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    table=st.lists(_desc, min_size=SIZE, max_size=SIZE),
    indirect_table=st.lists(_desc, min_size=0, max_size=4),
    heads=st.lists(st.integers(0, 10), min_size=1, max_size=4),
)
def test_fuzz_pop_never_escapes_guest_memory(
    table: list[tuple[int, int, int, int]],
    indirect_table: list[tuple[int, int, int, int]],
    heads: list[int],
) -> None:
    mem, drv, dev = make()
    for i, d in enumerate(table):
        drv.raw_descriptor(i, *d)
    for i, d in enumerate(indirect_table):
        mem.write(BASE + 0x3000 + 16 * i, struct.pack("<QIHH", *d))
    drv.raw_avail(heads)
    try:
        while (chain := dev.pop()) is not None:
            for seg in chain.readable + chain.writable:
                if seg.length:
                    mem.check(seg.addr, seg.length)  # every accepted buffer is in memory
            assert len(chain.readable) + len(chain.writable) <= SIZE
            assert not any(s.writable for s in chain.readable)
            chain.read(mem, 64)
            chain.write(mem, b"z" * min(chain.writable_len, 64))
    except VirtqueueError:
        pass


# -- pop_pair: a request chain and its response chain in one step ------------------------


def test_pop_pair_takes_a_readable_then_a_writable_chain() -> None:
    mem, drv, dev = make()
    mem.write(BUF, b"request")
    h1 = drv.add_buffer(BUF, 7, False)
    h2 = drv.add_buffer(BUF + 0x100, 0x40, True)
    drv.publish()
    assert dev.pop_pair() == (h1, BUF, 7, h2, BUF + 0x100, 0x40)
    assert dev.in_flight == 2 and dev.pop() is None and dev.pop_pair() is None
    with pytest.raises(ValueError, match="exceeds"):
        dev.add_used_pair(h1, 1, h2, 0)  # the request chain has no writable byte
    with pytest.raises(ValueError, match="exceeds"):
        dev.add_used_pair(h1, 0, h2, 0x41)
    with pytest.raises(ValueError, match="not in flight"):
        dev.add_used_pair(h1, 0, h1, 0)
    dev.add_used_pair(h1, 0, h2, 0x20)
    dev.publish_used()
    assert drv.collect_used() == [(h1, 0), (h2, 0x20)]
    with pytest.raises(ValueError, match="not in flight"):
        dev.add_used_pair(h1, 0, h2, 0)


def test_pop_pair_takes_nothing_but_a_pair() -> None:
    _mem, drv, dev = make()
    drv.add_buffer(BUF, 7, False)
    drv.publish()
    assert dev.pop_pair() is None  # the response chain is not there yet
    drv.add_buffer(BUF + 0x100, 0x40, True)
    drv.publish()
    assert dev.pop_pair() is not None
    for first, second in [
        ([Segment(BUF, 7)], [Segment(BUF, 7)]),  # two requests
        ([Segment(BUF, 7, True)], [Segment(BUF, 7, True)]),  # two responses
        ([Segment(BUF, 7), Segment(BUF + 8, 1)], [Segment(BUF, 7, True)]),  # a longer chain
        ([Segment(BUF, 7)], [Segment(BUF, 7, True), Segment(BUF + 8, 1, True)]),
        ([Segment(BUF, 7)], [Segment(BUF, 0, True)]),  # an empty buffer
    ]:
        _mem, drv, dev = make()
        drv.add(first)
        drv.add(second)
        drv.publish()
        assert dev.pop_pair() is None
        assert dev.in_flight == 0 and dev.last_avail_idx == 0  # nothing taken
        assert dev.pop() is not None  # pop() takes (or refuses) them one by one


@pytest.mark.parametrize(
    ("request_desc", "response_desc", "match"),
    [
        ((0xDEAD_0000_0000, 16, 0, 0), (BUF, 0x40, F_WRITE, 0), "not backed by guest memory"),
        ((BUF, 16, 0, 0), (BASE + MEM_SIZE - 8, 0x40, F_WRITE, 0), "not backed by guest memory"),
        ((BUF, 16, 0, 0), (BUF, 0x40, F_WRITE | F_INDIRECT, 0), "INDIRECT"),
    ],
)
def test_pop_pair_leaves_hostile_pairs_to_pop(
    request_desc: tuple[int, int, int, int], response_desc: tuple[int, int, int, int], match: str
) -> None:
    _mem, drv, dev = make(indirect=False)
    drv.raw_descriptor(0, *request_desc)
    drv.raw_descriptor(1, *response_desc)
    drv.raw_avail([0, 1])
    assert dev.pop_pair() is None and dev.in_flight == 0
    with pytest.raises(VirtqueueError, match=match):
        while dev.pop() is not None:
            pass


def test_pop_pair_refuses_heads_outside_the_table_or_in_flight() -> None:
    _mem, drv, dev = make()
    drv.raw_descriptor(0, BUF, 16, 0, 0)
    drv.raw_descriptor(1, BUF, 0x40, F_WRITE, 0)
    for heads in ([0, SIZE], [SIZE + 3, 1], [0, 0], [1, 1]):
        _mem, drv, dev = make()
        drv.raw_descriptor(0, BUF, 16, 0, 0)
        drv.raw_descriptor(1, BUF, 0x40, F_WRITE, 0)
        drv.raw_avail(heads)
        assert dev.pop_pair() is None and dev.in_flight == 0
    _mem, drv, dev = make()
    drv.raw_descriptor(0, BUF, 16, 0, 0)
    drv.raw_descriptor(1, BUF, 0x40, F_WRITE, 0)
    drv.raw_descriptor(2, BUF, 16, 0, 0)
    drv.raw_avail([0, 2, 0, 1])
    assert dev.pop() is not None and dev.pop() is not None  # 0 and 2 in flight
    assert dev.pop_pair() is None  # 0 again, while in flight
    with pytest.raises(VirtqueueError, match="again while in flight"):
        dev.pop()


def test_pop_pair_and_add_used_pair_across_the_end_of_the_rings() -> None:
    mem, drv, dev = make(event_idx=True)
    for round_ in range(3 * SIZE + 1):  # odd: pairs straddle the last slot and slot 0
        mem.write(BUF, bytes([round_]))
        if round_ % 2:
            h1 = drv.add_buffer(BUF, 1, False)
            h2 = drv.add_buffer(BUF + 0x100, 8, True)
            drv.publish()
            pair = dev.pop_pair()
            assert pair is not None and pair[0] == h1 and pair[3] == h2
            dev.add_used_pair(h1, 0, h2, round_ % 8)
            dev.publish_used()
            assert drv.collect_used() == [(h1, 0), (h2, round_ % 8)]
        else:  # a single chain shifts the pairs by one slot
            h = drv.add_buffer(BUF, 1, False)
            drv.publish()
            chain = dev.pop()
            assert chain is not None and chain.head == h
            dev.add_used(h, 0)
            dev.publish_used()
            assert drv.collect_used() == [(h, 0)]


# Valid requests and responses as often as anything else, so that pairs do occur.
_pair_desc = st.one_of(
    st.tuples(st.just(BUF), st.sampled_from([1, 16, 0x1000]), st.just(0), st.integers(0, 9)),
    st.tuples(st.just(BUF), st.sampled_from([1, 16, 0x1000]), st.just(F_WRITE), st.integers(0, 9)),
    _desc,
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    table=st.lists(_pair_desc, min_size=SIZE, max_size=SIZE),
    heads=st.lists(st.integers(0, 9), min_size=1, max_size=3),
)
def test_fuzz_pop_pair_agrees_with_pop(
    table: list[tuple[int, int, int, int]], heads: list[int]
) -> None:
    """Whatever the ring holds, pop_pair takes exactly what two pops would accept as a
    chain of one (non-empty, direct) readable descriptor and one of a writable one, or
    takes nothing at all."""
    results = []
    for use_pair in (True, False):
        mem, drv, dev = make()
        for i, d in enumerate(table):
            drv.raw_descriptor(i, *d)
        drv.raw_avail(heads)
        if use_pair:
            pair = dev.pop_pair()
            if pair is None:
                assert dev.in_flight == 0 and dev.last_avail_idx == 0
            else:
                mem.check(pair[1], pair[2])
                mem.check(pair[4], pair[5])  # both buffers are in guest memory
            results.append(pair)
            continue
        try:
            first, second = dev.pop(), dev.pop()
        except VirtqueueError:
            results.append(None)
            continue
        def direct(chain: Chain | None) -> bool:  # one descriptor of its own, not empty
            return (chain is not None and not table[chain.head][2] & (F_NEXT | F_INDIRECT)
                    and chain.readable_len + chain.writable_len > 0)

        if (
            direct(first) and direct(second)
            and first is not None and second is not None
            and first.readable and not first.writable
            and second.writable and not second.readable
        ):
            (a1, l1, _), (a2, l2, _) = first.readable[0], second.writable[0]
            results.append((first.head, a1, l1, second.head, a2, l2))
        else:
            results.append(None)
    assert results[0] == results[1]


def test_driver_add_pair_queues_a_request_and_its_response_buffer() -> None:
    mem, drv, dev = make(size=4)
    mem.write(BUF, b"req")
    req, resp = drv.add_pair(BUF, 3, BUF + 0x100, 0x40)
    drv.add_pair(BUF, 3, BUF + 0x200, 0x40)
    with pytest.raises(ValueError, match="no room: 2 descriptors needed, 0 free"):
        drv.add_pair(BUF, 3, BUF + 0x300, 0x40)
    assert drv.publish() is True
    first, second = dev.pop(), dev.pop()
    assert first is not None and second is not None
    assert (first.head, first.readable, first.writable) == (req, [Segment(BUF, 3)], [])
    assert (second.head, second.readable, second.writable) == (resp, [], [Segment(BUF + 0x100, 0x40, True)])
    dev.add_used(req, 0)
    dev.add_used(resp, 0x40)
    dev.publish_used()
    assert drv.collect_used() == [(req, 0), (resp, 0x40)]
    assert drv.free_descriptors == 2  # both descriptors back for the next pair
    pair = dev.pop_pair()  # the second pair
    assert pair is not None
    dev.add_used_pair(pair[0], 0, pair[3], 0x40)
    dev.publish_used()
    assert [length for _, length in drv.collect_used()] == [0, 0x40]
    assert drv.free_descriptors == 4


# -- serve_pairs: pop_pair, read, answer, write and add_used_pair in one call ---------------


def _answer_log(log: list[tuple[bytes, int, int]]) -> Callable[[bytes, int, int], bytes]:
    def answer(request: bytes, capacity: int, head: int) -> bytes:
        log.append((request, capacity, head))
        return (bytes([head]) + request)[: min(capacity, 9)]
    return answer


# Mostly a request descriptor then a response descriptor, in turn, as a driver queues
# them, sometimes anything at all; and heads mostly in that order.
_request_desc = st.tuples(st.sampled_from([BUF, BUF + 0x20]), st.sampled_from([1, 16, 0x1000]),
                          st.just(0), st.integers(0, 9))
_response_desc = st.tuples(st.sampled_from([BUF + 0x100, BASE + MEM_SIZE - 8]),
                           st.sampled_from([1, 8, 0x40]), st.just(F_WRITE), st.integers(0, 9))
_driver_table = st.tuples(*[
    st.integers(0, 4).flatmap(
        lambda k, i=i: _desc if k == 0 else _request_desc if i % 2 == 0 else _response_desc
    )
    for i in range(SIZE)
]).map(list)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    table=st.one_of(_driver_table, st.lists(_pair_desc, min_size=SIZE, max_size=SIZE)),
    heads=st.one_of(
        st.integers(1, SIZE // 2).map(lambda n: list(range(2 * n))),
        st.integers(1, SIZE // 2).map(lambda n: list(range(2 * n))),
        st.lists(st.integers(0, 9), min_size=0, max_size=6),
    ),
    limit=st.sampled_from([1, 4, 0x1001]),
    batch=st.integers(1, 4),
)
def test_fuzz_serve_pairs_does_what_pop_pair_and_add_used_pair_do(
    table: list[tuple[int, int, int, int]], heads: list[int], limit: int, batch: int
) -> None:
    """Whatever the ring holds, serve_pairs answers the same pairs with the same bytes,
    leaves the ring, the used entries and guest memory as the step-by-step path does,
    and takes nothing that is not a pair."""
    outcomes = []
    for fused in (True, False):
        mem, drv, dev = make()
        mem.write(BUF, bytes(range(64)))
        for i, d in enumerate(table):
            drv.raw_descriptor(i, *d)
        drv.raw_avail(heads)
        log: list[tuple[bytes, int, int]] = []
        answer = _answer_log(log)
        if fused:
            count = dev.serve_pairs(answer, limit, batch)
        else:
            count = 0
            while count < batch and (pair := dev.pop_pair()) is not None:
                req, req_addr, req_len, resp, resp_addr, resp_len = pair
                response = answer(mem.read(req_addr, min(req_len, limit)), resp_len, req)
                mem.write(resp_addr, response)
                dev.add_used_pair(req, 0, resp, len(response))
                count += 1
        dev.publish_used()
        outcomes.append((count, log, dev.last_avail_idx, dev.in_flight, dev.next_used_idx,
                         mem.read(BASE, MEM_SIZE)))
        try:  # and what is left is pop()'s, as before
            outcomes.append(dev.pop() is None)
        except VirtqueueError as exc:
            outcomes.append(str(exc))
    assert outcomes[0] == outcomes[2] and outcomes[1] == outcomes[3]


def test_serve_pairs_answers_a_pair_whose_buffers_lie_in_two_regions() -> None:
    low = MemoryRegion.anonymous(BASE, MEM_SIZE, user_addr=0x7F00_0000)
    high = MemoryRegion.anonymous(BASE + MEM_SIZE, MEM_SIZE, user_addr=0x7F10_0000)
    mem = GuestMemory([low, high])
    layout = RingLayout.contiguous(SIZE, BASE)
    drv, dev = DriverQueue(mem, layout), DeviceQueue(mem, layout)
    mem.write(BUF, b"ping")
    resp_addr = BASE + MEM_SIZE + 0x100
    for response_at in (resp_addr, BASE + MEM_SIZE - 4):  # in the other region; across both
        req, resp = drv.add_pair(BUF, 4, response_at, 8)
        drv.publish()
        log: list[tuple[bytes, int, int]] = []
        assert dev.serve_pairs(_answer_log(log), 0x1001, 16) == 1
        assert log == [(b"ping", 8, req)]
        dev.publish_used()
        assert drv.collect_used() == [(req, 0), (resp, 5)]
        assert mem.read(response_at, 5) == bytes([req]) + b"ping"


def test_serve_pairs_refuses_an_answer_longer_than_the_response_buffer() -> None:
    mem, drv, dev = make()
    drv.add_pair(BUF, 4, BUF + 0x100, 2)
    drv.publish()
    with pytest.raises(ValueError, match="exceeds"):
        dev.serve_pairs(lambda request, capacity, head: b"too long", 0x1001, 16)
    assert dev.in_flight == 2 and dev.next_used_idx == 0  # nothing was written for them
    assert mem.read(BUF + 0x100, 2) == b"\0\0"
