"""Split virtqueue (virtio 1.x, 2.7), for both the device and the driver role.

Theory of operation
-------------------
A split virtqueue is three areas in guest memory: the descriptor table, the
available ring (driver → device) and the used ring (device → driver).  The
driver links descriptors into *chains*, puts each chain's head on the available
ring and bumps ``avail->idx``; the device walks the chain, reads the readable
part, fills the writable part and reports ``(head, bytes written)`` on the used
ring.  With ``VIRTIO_RING_F_EVENT_IDX`` each side publishes, in the slot just past
its ring, the index at which it wants the next notification; without it, one flag
bit per ring suppresses notifications wholesale.  With
``VIRTIO_RING_F_INDIRECT_DESC`` a chain's head may point at a separate table of
descriptors instead.

:class:`DeviceQueue` is the device role (our vhost-user backend);
:class:`DriverQueue` is the driver role (our Python virtio driver).
:meth:`DeviceQueue.pop_pair` takes a request chain and its response chain (one
readable, then one writable descriptor) in one step, with the same checks as two
:meth:`~DeviceQueue.pop` calls, and leaves anything else to :meth:`~DeviceQueue.pop`;
:meth:`DeviceQueue.serve_pairs` also reads each request, has it answered by a callback,
writes the answer and both used entries, in one call (a device's per-request path).  Both work
on a :class:`~virtio_nsm.virtio.memory.GuestMemory` and never do I/O; the caller
signals the other side when ``publish``/``needs_notify`` say so.

The other side is untrusted.  Ring areas must lie inside one memory region and be
aligned; every descriptor buffer is bounds-checked before use; descriptor indices
are range-checked; a chain visiting more descriptors than its table holds (a loop,
or a chain longer than the queue) is refused; a readable descriptor after a
writable one, a nested or misplaced indirect table, an available index that runs
more than a queue ahead, a used entry naming a buffer that is not in flight: each
raises :class:`VirtqueueError` with the reason.  After such an error the queue must
be considered broken (the device sets ``DEVICE_NEEDS_RESET``).
"""

from __future__ import annotations

import struct
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from . import spec
from .memory import GuestMemory, GuestMemoryError, VirtioError

__all__ = [
    "Chain",
    "DeviceQueue",
    "DriverQueue",
    "RingLayout",
    "Segment",
    "VirtqueueError",
    "memory_barrier",
]

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("virtio rings are little-endian and so must be the host")
# Fields the other side reads concurrently (ring indices, flags, event indices) are
# accessed through memoryviews cast to "H": CPython reads and writes such an item
# with one whole-field copy.  struct.pack_into is not safe for them: it zero-fills
# the field before writing it, and the little-endian formats go byte by byte, so
# the peer can observe 0 or a half-written index.  Descriptors and ring entries
# are only read after the index that publishes them, so struct is fine there.
_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
_U32_LIMIT = 1 << 32
_F_WRITE = spec.VIRTQ_DESC_F_WRITE
_NEXT_OR_INDIRECT = spec.VIRTQ_DESC_F_NEXT | spec.VIRTQ_DESC_F_INDIRECT
_DESC_UNPACK = _DESC.unpack_from
_USED_PACK = _USED_ELEM.pack_into
_USED_PAIR_PACK = struct.Struct("<IIII").pack_into
_USED_UNPACK = _USED_ELEM.unpack_from
_DESC_PACK = _DESC.pack_into
_FENCE = threading.Lock()
# memory_barrier() without its Python frame, for the device's per-request path.
_FENCE_ACQUIRE, _FENCE_RELEASE = _FENCE.acquire, _FENCE.release


def memory_barrier() -> None:
    """A full memory barrier, for a store to a ring followed by a load of the other side's field.

    Notification suppression is a Dekker-style handshake between two processes (we
    publish an index, then read the index at which the peer wants to be told), so a
    store must not be reordered after the following load.  Python has no fence;
    taking and releasing an uncontended CPython lock performs an atomic
    read-modify-write, which orders memory like a full barrier on x86 and arm64.
    """
    _FENCE.acquire()
    _FENCE.release()


class VirtqueueError(VirtioError):
    """The ring contents violate the virtqueue rules (the other side is buggy or hostile)."""


class Segment(NamedTuple):
    """One descriptor's buffer: guest address, length, and whether the device may write it."""

    addr: int
    length: int
    writable: bool = False


_SEGMENT = Segment._make


class Chain:
    """A descriptor chain popped by the device: the readable part, then the writable part."""

    __slots__ = ("avail_index", "head", "readable", "readable_len", "writable", "writable_len")

    def __init__(
        self,
        head: int,
        avail_index: int = 0,
        readable: list[Segment] | None = None,
        readable_len: int = 0,
        writable: list[Segment] | None = None,
        writable_len: int = 0,
    ) -> None:
        self.head = head
        self.avail_index = avail_index
        self.readable: list[Segment] = [] if readable is None else readable
        self.readable_len = readable_len
        self.writable: list[Segment] = [] if writable is None else writable
        self.writable_len = writable_len

    def __repr__(self) -> str:
        return f"<Chain head={self.head} readable={self.readable} writable={self.writable}>"

    def read(self, memory: GuestMemory, limit: int) -> bytes:
        """The first ``limit`` bytes of the readable part (less if it is shorter)."""
        if len(self.readable) == 1:
            seg = self.readable[0]
            return memory.read(seg.addr, min(seg.length, limit))
        parts: list[bytes] = []
        left = limit
        for seg in self.readable:
            if left <= 0:
                break
            n = min(seg.length, left)
            parts.append(memory.read(seg.addr, n))
            left -= n
        return b"".join(parts)

    def write(self, memory: GuestMemory, data: bytes) -> int:
        """Scatter ``data`` over the writable part; returns bytes written (all, or raises)."""
        if len(data) > self.writable_len:
            raise VirtqueueError(
                f"{len(data)} bytes do not fit the {self.writable_len}-byte writable part "
                f"of chain {self.head}"
            )
        if len(self.writable) == 1:
            memory.write(self.writable[0].addr, data)
            return len(data)
        done = 0
        for seg in self.writable:
            if done == len(data):
                break
            n = min(seg.length, len(data) - done)
            memory.write(seg.addr, data[done : done + n])
            done += n
        return done


@dataclass(frozen=True, slots=True)
class RingLayout:
    """Queue size and the guest-physical addresses of the three ring areas."""

    size: int
    desc: int
    avail: int
    used: int

    @classmethod
    def contiguous(cls, size: int, base: int, *, align: int = 4096) -> RingLayout:
        """The legacy-style layout: table, avail ring, used ring on the next ``align``."""
        avail = base + spec.desc_table_size(size)
        used_unaligned = avail + spec.avail_ring_size(size)
        used = -(-used_unaligned // align) * align
        return cls(size, base, avail, used)

    @property
    def end(self) -> int:
        return self.used + spec.used_ring_size(self.size)


class _SplitRing:
    """What both roles share: validated layout and live views of the three areas."""

    def __init__(
        self,
        memory: GuestMemory,
        layout: RingLayout,
        *,
        event_idx: bool = False,
        indirect: bool = False,
    ) -> None:
        size = layout.size
        if not 1 <= size <= spec.VIRTQ_MAX_SIZE or size & (size - 1):
            raise VirtqueueError(f"queue size {size} is not a power of two in 1..32768")
        for name, addr, align in (
            ("descriptor table", layout.desc, spec.VIRTQ_DESC_ALIGN),
            ("available ring", layout.avail, spec.VIRTQ_AVAIL_ALIGN),
            ("used ring", layout.used, spec.VIRTQ_USED_ALIGN),
        ):
            if addr % align:
                raise VirtqueueError(f"{name} at {addr:#x} is not {align}-byte aligned")
        self.memory = memory
        self.layout = layout
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        try:
            self._desc = memory.view(layout.desc, spec.desc_table_size(size))
            self._avail = memory.view(layout.avail, spec.avail_ring_size(size))
            self._used = memory.view(layout.used, spec.used_ring_size(size))
        except GuestMemoryError as exc:
            raise VirtqueueError(f"virtqueue rings are not in guest memory: {exc}") from exc
        self._avail16 = self._avail.cast("H")
        self._used16 = self._used.cast("H")
        self._mask = size - 1
        # Positions, in 16-bit words, of avail->used_event and used->avail_event.
        self._used_event = 2 + size
        self._avail_event = 2 + 4 * size

    def release(self) -> None:
        """Drop the views into guest memory (call before unmapping it)."""
        for view in (self._avail16, self._used16, self._desc, self._avail, self._used):
            view.release()

    # Raw ring fields, for tests and diagnostics.
    @property
    def avail_idx(self) -> int:
        return self._avail16[1]

    @property
    def used_idx(self) -> int:
        return int(self._used16[1])


class DeviceQueue(_SplitRing):
    """The device side: pop available chains, push used elements, decide on interrupts."""

    def __init__(
        self,
        memory: GuestMemory,
        layout: RingLayout,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        last_avail_idx: int = 0,
        used_idx: int | None = None,
    ) -> None:
        super().__init__(memory, layout, event_idx=event_idx, indirect=indirect)
        self.last_avail_idx = last_avail_idx & 0xFFFF
        #: Our copy of ``used->idx`` (published by :meth:`publish_used`).
        self.next_used_idx = self.used_idx if used_idx is None else used_idx & 0xFFFF
        self._signalled_used: int | None = None
        self._in_flight: dict[int, int] = {}  # head -> writable capacity
        self._avail_seen = self.last_avail_idx  # avail->idx as last read
        #: Whether :meth:`publish_avail_event` asks the driver for kicks; a device that
        #: polls the available ring clears it so that the driver need not notify.
        self.kicks_wanted = True

    def __repr__(self) -> str:
        return (
            f"<DeviceQueue size={self.size} last_avail={self.last_avail_idx} "
            f"used={self.next_used_idx} in_flight={len(self._in_flight)}>"
        )

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def available(self) -> int:
        """How many chains the driver has made available and we have not popped."""
        avail_idx = self._avail16[1]
        pending = (avail_idx - self.last_avail_idx) & 0xFFFF
        if not pending:
            self._avail_seen = avail_idx
            return 0
        memory_barrier()  # read the ring entries only after the index that covers them
        if pending > self.size:
            raise VirtqueueError(
                f"available index {self.avail_idx} is {pending} ahead of {self.last_avail_idx}, "
                f"more than the queue size {self.size}"
            )
        self._avail_seen = avail_idx
        return pending

    def avail_moved(self) -> bool:
        """A cheap look (no barrier, no checks) at whether the driver made anything new
        available; for busy polling, followed by :meth:`pop` when it says yes."""
        return self._avail16[1] != self.last_avail_idx

    def pop(self) -> Chain | None:
        """Take the next available chain, fully validated, or ``None`` if there is none."""
        last = self.last_avail_idx
        # Re-read avail->idx only once everything seen so far has been taken.
        if self._avail_seen == last and (self._avail16[1] == last or not self.available()):
            return None
        head = self._avail16[2 + (last & self._mask)]
        in_flight = self._in_flight
        if head in in_flight:
            raise VirtqueueError(f"driver made chain {head} available again while in flight")
        if head < self.size:
            # Fast path for the common one-descriptor chain; anything else takes _walk.
            addr, length, flags, _ = _DESC_UNPACK(self._desc, head << 4)
            if not flags & _NEXT_OR_INDIRECT and length:
                try:
                    self.memory.check(addr, length)
                except GuestMemoryError as exc:
                    raise VirtqueueError(f"chain {head}: descriptor buffer: {exc}") from exc
                self.last_avail_idx = (last + 1) & 0xFFFF
                if flags & _F_WRITE:
                    in_flight[head] = length
                    return Chain(head, last, [], 0, [_SEGMENT((addr, length, True))], length)
                in_flight[head] = 0
                return Chain(head, last, [_SEGMENT((addr, length, False))], length)
        chain = self._walk(Chain(head, last))
        self.last_avail_idx = (last + 1) & 0xFFFF
        in_flight[head] = chain.writable_len
        return chain

    def pop_pair(self) -> tuple[int, int, int, int, int, int] | None:
        """Take the next two chains if they are a request/response pair, else take nothing.

        A pair is a chain of one device-readable descriptor followed by a chain of one
        device-writable descriptor (how e.g. Linux's NSM driver sends a request): the
        answer is ``(request head, address, length, response head, address, length)``,
        both buffers checked and both chains in flight, as :meth:`pop` twice would
        leave them, without building :class:`Chain` objects.  ``None`` when fewer than
        two chains are available or they are anything else, valid or not: :meth:`pop`
        then takes them one at a time (and names what is wrong with them).
        """
        last = self.last_avail_idx
        avail16 = self._avail16
        if (self._avail_seen - last) & 0xFFFF < 2:
            avail_idx = avail16[1]
            pending = (avail_idx - last) & 0xFFFF
            if pending < 2:
                if not pending:
                    self._avail_seen = avail_idx
                return None
            _FENCE_ACQUIRE()  # memory_barrier(): read the ring entries only after
            _FENCE_RELEASE()  # the index that covers them
            if pending > self.size:
                return None  # pop() says what is wrong
            self._avail_seen = avail_idx
        mask, size, in_flight = self._mask, self.size, self._in_flight
        req = avail16[2 + (last & mask)]
        resp = avail16[2 + ((last + 1) & mask)]
        if req >= size or resp >= size or req == resp or req in in_flight or resp in in_flight:
            return None
        req_addr, req_len, req_flags, _ = _DESC_UNPACK(self._desc, req << 4)
        resp_addr, resp_len, resp_flags, _ = _DESC_UNPACK(self._desc, resp << 4)
        if req_flags or resp_flags != _F_WRITE or not req_len or not resp_len:
            return None
        if not self.memory.covers(req_addr, req_len, resp_addr, resp_len):
            return None
        in_flight[req] = 0
        in_flight[resp] = resp_len
        self.last_avail_idx = (last + 2) & 0xFFFF
        return req, req_addr, req_len, resp, resp_addr, resp_len

    def serve_pairs(self, answer: Callable[[bytes, int, int], bytes], limit: int, batch: int) -> int:
        """Answer up to ``batch`` request/response pairs in one call; how many were answered.

        For each pair that :meth:`pop_pair` would take (the same checks, in the same
        order; anything else is left on the ring for :meth:`pop`): the request's first
        ``limit`` bytes are read, ``answer(request, capacity, request head)`` gives the
        response (at most ``capacity`` bytes, the response buffer's length, else
        ValueError with both chains left in flight), which is written to the response
        buffer, and both used entries are written as :meth:`add_used_pair` writes them
        (not published: :meth:`publish_used`).  If ``answer`` raises, the pairs
        answered before stay written.  The per-request path of the NSM's worker: one
        call instead of :meth:`pop_pair`, a read, a write and :meth:`add_used_pair`.
        """
        answered = 0
        avail16, desc, used = self._avail16, self._desc, self._used
        mask, size, in_flight, memory = self._mask, self.size, self._in_flight, self.memory
        while answered < batch:
            last = self.last_avail_idx
            if (self._avail_seen - last) & 0xFFFF < 2:  # as pop_pair
                avail_idx = avail16[1]
                pending = (avail_idx - last) & 0xFFFF
                if pending < 2:
                    if not pending:
                        self._avail_seen = avail_idx
                    break
                _FENCE_ACQUIRE()  # memory_barrier(): read the ring entries only after
                _FENCE_RELEASE()  # the index that covers them
                if pending > size:
                    break
                self._avail_seen = avail_idx
            req = avail16[2 + (last & mask)]
            resp = avail16[2 + ((last + 1) & mask)]
            if req >= size or resp >= size or req == resp or req in in_flight or resp in in_flight:
                break
            req_addr, req_len, req_flags, _ = _DESC_UNPACK(desc, req << 4)
            resp_addr, resp_len, resp_flags, _ = _DESC_UNPACK(desc, resp << 4)
            if req_flags or resp_flags != _F_WRITE or not req_len or not resp_len:
                break
            region = memory.region_holding(req_addr, req_len, resp_addr, resp_len)
            if region is None and not memory.covers(req_addr, req_len, resp_addr, resp_len):
                break
            in_flight[req] = 0
            in_flight[resp] = resp_len
            self.last_avail_idx = (last + 2) & 0xFFFF
            count = req_len if req_len <= limit else limit
            if region is not None:  # both buffers in one region: slice it directly
                buf, start = region.buffer, region.guest_addr
                offset = req_addr - start
                response = answer(buf[offset : offset + count].tobytes(), resp_len, req)
            else:
                response = answer(memory.read(req_addr, count), resp_len, req)
            length = len(response)
            if length > resp_len:
                raise ValueError(f"used length {length} exceeds chain {resp}'s {resp_len} bytes")
            if region is not None:
                offset = resp_addr - start
                buf[offset : offset + length] = response
            else:
                memory.write(resp_addr, response)
            del in_flight[req], in_flight[resp]
            idx = self.next_used_idx
            slot = idx & mask
            if slot != mask:  # both entries side by side
                _USED_PAIR_PACK(used, 4 + 8 * slot, req, 0, resp, length)
            else:
                _USED_PACK(used, 4 + 8 * slot, req, 0)
                _USED_PACK(used, 4, resp, length)
            self.next_used_idx = (idx + 2) & 0xFFFF
            answered += 1
        return answered

    def _walk(self, chain: Chain) -> Chain:
        head = chain.head
        table, table_len, in_indirect = self._desc, self.size, False
        index, visited, total = head, 0, 0
        while True:
            if index >= table_len:
                where = "indirect table" if in_indirect else "descriptor table"
                raise VirtqueueError(
                    f"chain {head}: descriptor index {index} is outside the {where} of {table_len} entries"
                )
            addr, length, flags, nxt = _DESC.unpack_from(table, index * spec.VIRTQ_DESC_SIZE)
            visited += 1
            if visited > table_len:
                raise VirtqueueError(
                    f"chain {head}: more than {table_len} descriptors "
                    "(a loop, or a chain longer than the queue)"
                )
            if flags & spec.VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise VirtqueueError(
                        f"chain {head}: indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC"
                    )
                if in_indirect:
                    raise VirtqueueError(f"chain {head}: nested indirect table")
                if visited != 1 or flags & spec.VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError(f"chain {head}: an indirect descriptor must be the whole chain")
                if length == 0 or length % spec.VIRTQ_DESC_SIZE:
                    raise VirtqueueError(
                        f"chain {head}: indirect table length {length} is not a positive multiple of 16"
                    )
                count = length // spec.VIRTQ_DESC_SIZE
                if count > self.size:
                    raise VirtqueueError(
                        f"chain {head}: indirect table of {count} descriptors is longer "
                        f"than the queue ({self.size})"
                    )
                try:
                    table = self.memory.view(addr, length)
                except GuestMemoryError as exc:
                    raise VirtqueueError(f"chain {head}: indirect table: {exc}") from exc
                table_len, in_indirect, index, visited = count, True, 0, 0
                continue
            total += length
            if total >= _U32_LIMIT:
                raise VirtqueueError(f"chain {head}: total length exceeds 32 bits")
            if length:
                try:
                    self.memory.check(addr, length)
                except GuestMemoryError as exc:
                    raise VirtqueueError(f"chain {head}: descriptor buffer: {exc}") from exc
            if flags & spec.VIRTQ_DESC_F_WRITE:
                chain.writable.append(Segment(addr, length, True))
                chain.writable_len += length
            elif chain.writable:
                raise VirtqueueError(f"chain {head}: device-readable descriptor after a device-writable one")
            else:
                chain.readable.append(Segment(addr, length, False))
                chain.readable_len += length
            if not flags & spec.VIRTQ_DESC_F_NEXT:
                return chain
            index = nxt

    def resubmit(self, head: int) -> Chain:
        """Take the chain at ``head`` again, without the available ring.

        For inflight I/O tracking: after a backend restart, the chains that the
        previous backend took but never returned are known only by their heads
        (the available ring may have moved on).  The chain is validated like a
        popped one and becomes in flight; ``avail_index`` is meaningless for it,
        so it cannot be given back with :meth:`unpop`.
        """
        if not 0 <= head < self.size:
            raise VirtqueueError(f"resubmitted head {head} is outside the queue of {self.size}")
        if head in self._in_flight:
            raise VirtqueueError(f"resubmitted chain {head} is already in flight")
        chain = self._walk(Chain(head, -1))
        self._in_flight[head] = chain.writable_len
        return chain

    def unpop(self, chain: Chain) -> None:
        """Give back the most recently popped chain unanswered (it becomes available again)."""
        if chain.head not in self._in_flight or (chain.avail_index + 1) & 0xFFFF != (self.last_avail_idx):
            raise ValueError("only the most recently popped chain can be given back")
        del self._in_flight[chain.head]
        self.last_avail_idx = chain.avail_index
        self._avail_seen = self.last_avail_idx

    def add_used(self, head: int, length: int) -> None:
        """Write one used element (not yet visible: see :meth:`publish_used`)."""
        capacity = self._in_flight.pop(head, None)
        if capacity is None:
            raise ValueError(f"chain {head} is not in flight")
        if not 0 <= length <= capacity:
            raise ValueError(f"used length {length} exceeds chain {head}'s {capacity} bytes")
        idx = self.next_used_idx
        _USED_PACK(self._used, 4 + 8 * (idx & self._mask), head, length)
        self.next_used_idx = (idx + 1) & 0xFFFF

    def add_used_pair(self, first: int, first_length: int, second: int, second_length: int) -> None:
        """:meth:`add_used` for two chains, in this order."""
        in_flight = self._in_flight
        first_cap, second_cap = in_flight.get(first, -1), in_flight.get(second, -1)
        if not (0 <= first_length <= first_cap and 0 <= second_length <= second_cap) or first == second:
            self._refuse_used_pair(first, first_length, second, second_length)
        del in_flight[first], in_flight[second]
        idx, mask = self.next_used_idx, self._mask
        slot = idx & mask
        if slot != mask:  # both entries side by side
            _USED_PAIR_PACK(self._used, 4 + 8 * slot, first, first_length, second, second_length)
        else:
            _USED_PACK(self._used, 4 + 8 * slot, first, first_length)
            _USED_PACK(self._used, 4, second, second_length)
        self.next_used_idx = (idx + 2) & 0xFFFF

    def _refuse_used_pair(self, first: int, first_length: int, second: int, second_length: int) -> None:
        in_flight = self._in_flight
        if first not in in_flight or first == second:
            raise ValueError(f"chain {first} is not in flight (or given twice)")
        if not 0 <= first_length <= in_flight[first]:
            raise ValueError(f"used length {first_length} exceeds chain {first}'s {in_flight[first]} bytes")
        if second not in in_flight:
            raise ValueError(f"chain {second} is not in flight")
        raise ValueError(f"used length {second_length} exceeds chain {second}'s {in_flight[second]} bytes")

    def publish_used(self) -> None:
        """Make the used elements written so far visible to the driver."""
        _FENCE_ACQUIRE()  # memory_barrier(): the elements must be visible before the
        _FENCE_RELEASE()  # index that covers them
        self._used16[1] = self.next_used_idx

    def needs_notify(self, *, barrier: bool = True) -> bool:
        """Whether the driver asked to be interrupted for what was published since last time.

        Without ``barrier`` the answer may be a stale "no"; use that only for early
        interrupts that are followed by a checked decision.
        """
        if barrier:
            _FENCE_ACQUIRE()  # memory_barrier()
            _FENCE_RELEASE()
        if not self.event_idx:
            flags = self._avail16[0]
            return not flags & spec.VIRTQ_AVAIL_F_NO_INTERRUPT
        new, old = self.next_used_idx, self._signalled_used
        self._signalled_used = new
        if old is None:
            return True
        # spec.vring_need_event, inline (once per pass)
        return ((new - self._avail16[self._used_event] - 1) & 0xFFFF) < ((new - old) & 0xFFFF)

    def publish_avail_event(self) -> int:
        """Tell the driver whether to kick for what it makes available next.

        With :attr:`kicks_wanted`: a kick as soon as anything new is made available
        (``avail_event`` = our next index with EVENT_IDX, else ``VIRTQ_USED_F_NO_NOTIFY``
        cleared), followed by a barrier: the caller must then look at the ring once more,
        since the driver may have published before it could see the request.  Without:
        no kicks (``avail_event`` one behind our next index, which the driver has already
        passed, or the flag set); the caller is polling the ring.

        Returns ``avail->idx`` as read after that (that look, for the caller to compare).
        """
        if self.event_idx:
            last = self.last_avail_idx
            if self.kicks_wanted:
                self._used16[self._avail_event] = last
                _FENCE_ACQUIRE()  # memory_barrier()
                _FENCE_RELEASE()
            else:
                self._used16[self._avail_event] = (last - 1) & 0xFFFF
            return self._avail16[1]
        flags = self._used16[0]
        if self.kicks_wanted:
            if flags & spec.VIRTQ_USED_F_NO_NOTIFY:
                self._used16[0] = flags & ~spec.VIRTQ_USED_F_NO_NOTIFY
            memory_barrier()
        elif not flags & spec.VIRTQ_USED_F_NO_NOTIFY:
            self._used16[0] = flags | spec.VIRTQ_USED_F_NO_NOTIFY
        return self._avail16[1]


class DriverQueue(_SplitRing):
    """The driver side: add chains, decide on kicks, collect and validate used elements."""

    def __init__(
        self,
        memory: GuestMemory,
        layout: RingLayout,
        *,
        event_idx: bool = False,
        indirect: bool = False,
    ) -> None:
        super().__init__(memory, layout, event_idx=event_idx, indirect=indirect)
        # The driver owns the rings: start from a clean state.
        self._avail[:] = bytes(len(self._avail))
        self._used[:] = bytes(len(self._used))
        self._free: list[int] = list(range(self.size - 1, -1, -1))
        self._shadow_avail = 0
        self._published_avail = 0
        self.last_used_idx = 0
        self._in_flight: dict[int, tuple[list[int], int]] = {}  # head -> (descs, writable)

    def __repr__(self) -> str:
        return (
            f"<DriverQueue size={self.size} avail={self._shadow_avail} "
            f"last_used={self.last_used_idx} in_flight={len(self._in_flight)}>"
        )

    @property
    def free_descriptors(self) -> int:
        return len(self._free)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def add(self, segments: Sequence[Segment], *, indirect_table: int | None = None) -> int:
        """Queue one chain (not yet visible: see :meth:`publish`); returns its head.

        With ``indirect_table`` (a guest address with room for ``16 * len(segments)``
        bytes) the chain takes one ring descriptor pointing at an indirect table.
        """
        if not segments:
            raise ValueError("a chain needs at least one segment")
        seen_writable = False
        for seg in segments:
            if seg.writable:
                seen_writable = True
            elif seen_writable:
                raise ValueError("readable segments must come before writable ones")
        writable = sum(s.length for s in segments if s.writable)
        if indirect_table is not None:
            if not self.indirect:
                raise ValueError("VIRTIO_RING_F_INDIRECT_DESC was not negotiated")
            table = bytearray()
            for i, seg in enumerate(segments):
                flags = spec.VIRTQ_DESC_F_WRITE if seg.writable else 0
                if i + 1 < len(segments):
                    flags |= spec.VIRTQ_DESC_F_NEXT
                table += _DESC.pack(seg.addr, seg.length, flags, i + 1)
            self.memory.write(indirect_table, table)
            ring_descs = [(indirect_table, len(table), spec.VIRTQ_DESC_F_INDIRECT)]
        else:
            ring_descs = [(s.addr, s.length, spec.VIRTQ_DESC_F_WRITE if s.writable else 0) for s in segments]
        if len(ring_descs) > len(self._free):
            raise ValueError(f"no room: {len(ring_descs)} descriptors needed, {len(self._free)} free")
        ids = [self._free.pop() for _ in ring_descs]
        for i, (addr, length, flags) in enumerate(ring_descs):
            nxt = 0
            if i + 1 < len(ids):
                flags |= spec.VIRTQ_DESC_F_NEXT
                nxt = ids[i + 1]
            _DESC.pack_into(self._desc, ids[i] * spec.VIRTQ_DESC_SIZE, addr, length, flags, nxt)
        head = ids[0]
        slot = self._shadow_avail % self.size
        self._avail16[2 + slot] = head
        self._shadow_avail = (self._shadow_avail + 1) & 0xFFFF
        self._in_flight[head] = (ids, writable)
        return head

    def add_buffer(self, addr: int, length: int, writable: bool) -> int:
        """Queue a one-descriptor chain (what Linux's nsm.ko does); returns its head."""
        if not self._free:
            raise ValueError("no room: 1 descriptor needed, 0 free")
        head = self._free.pop()
        _DESC.pack_into(
            self._desc,
            head * spec.VIRTQ_DESC_SIZE,
            addr,
            length,
            spec.VIRTQ_DESC_F_WRITE if writable else 0,
            0,
        )
        self._avail16[2 + self._shadow_avail % self.size] = head
        self._shadow_avail = (self._shadow_avail + 1) & 0xFFFF
        self._in_flight[head] = ([head], length if writable else 0)
        return head

    def add_pair(self, request: int, request_len: int, response: int, response_len: int) -> tuple[int, int]:
        """Queue a request and its response buffer as two one-descriptor chains (what
        Linux's nsm.ko does: one device-readable, then one device-writable); their heads."""
        free = self._free
        if len(free) < 2:
            raise ValueError(f"no room: 2 descriptors needed, {len(free)} free")
        req, resp = free.pop(), free.pop()
        desc = self._desc
        _DESC_PACK(desc, req << 4, request, request_len, 0, 0)
        _DESC_PACK(desc, resp << 4, response, response_len, _F_WRITE, 0)
        avail16, shadow, mask = self._avail16, self._shadow_avail, self._mask
        avail16[2 + (shadow & mask)] = req
        avail16[2 + ((shadow + 1) & mask)] = resp
        self._shadow_avail = (shadow + 2) & 0xFFFF
        in_flight = self._in_flight
        in_flight[req] = ([req], 0)
        in_flight[resp] = ([resp], response_len)
        return req, resp

    def publish(self) -> bool:
        """Make added chains visible; returns whether the device wants a kick for them."""
        old, new = self._published_avail, self._shadow_avail
        memory_barrier()  # descriptors and ring entries before the index that covers them
        self._avail16[1] = new
        self._published_avail = new
        if old == new:
            return False
        memory_barrier()
        if self.event_idx:
            avail_event = self._used16[self._avail_event]
            return spec.vring_need_event(avail_event, new, old)
        return not self._used16[0] & spec.VIRTQ_USED_F_NO_NOTIFY

    def request_interrupt_after(self, count: int) -> None:
        """Ask to be interrupted once ``count`` more used elements have been published."""
        if self.event_idx:
            self._avail16[self._used_event] = (self.last_used_idx + count - 1) & 0xFFFF
        else:
            self._avail16[0] = 0
        memory_barrier()

    def suppress_interrupts(self) -> None:
        """Ask for no interrupt for what the device publishes next (a driver about to poll
        the used ring); :meth:`request_interrupt_after` asks again.  No barrier: a device
        that still sees the earlier request may interrupt anyway, which is harmless."""
        if self.event_idx:
            # One behind what we collected: the device has signalled up to there already.
            self._avail16[self._used_event] = (self.last_used_idx - 1) & 0xFFFF
        else:
            self._avail16[0] = spec.VIRTQ_AVAIL_F_NO_INTERRUPT

    def used_moved(self) -> bool:
        """A cheap look (no barrier, no checks) at whether the device published anything
        new; for busy polling, followed by :meth:`collect_used` when it says yes."""
        return self._used16[1] != self.last_used_idx

    def collect_used(self) -> list[tuple[int, int]]:
        """Every newly used ``(head, length)``, validated against what is in flight."""
        last = self.last_used_idx
        count = (self._used16[1] - last) & 0xFFFF
        if not count:
            return []
        memory_barrier()  # read the elements only after the index that covers them
        in_flight = self._in_flight
        if count > len(in_flight):
            raise VirtqueueError(
                f"device advanced the used index by {count} with {len(in_flight)} buffers in flight"
            )
        used, mask, free = self._used, self._mask, self._free
        done: list[tuple[int, int]] = []
        for _ in range(count):
            head, length = _USED_UNPACK(used, 4 + 8 * (last & mask))
            entry = in_flight.pop(head, None)
            if entry is None:
                raise VirtqueueError(f"device returned chain {head}, which is not in flight")
            ids, writable = entry
            if length > writable:
                raise VirtqueueError(
                    f"device reports {length} bytes written to chain {head}, "
                    f"which has {writable} writable bytes"
                )
            if len(ids) == 1:
                free.append(head)
            else:
                free.extend(reversed(ids))
            last = self.last_used_idx = (last + 1) & 0xFFFF
            done.append((head, length))
        return done

    def raw_descriptor(self, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
        """Overwrite one descriptor as-is (for fault injection in tests)."""
        _DESC.pack_into(self._desc, index * spec.VIRTQ_DESC_SIZE, addr, length, flags, nxt)

    def raw_avail(self, heads: Iterable[int], *, idx_delta: int | None = None) -> None:
        """Put raw heads on the available ring and publish (for fault injection in tests)."""
        heads = list(heads)
        for head in heads:
            self._avail16[2 + self._shadow_avail % self.size] = head & 0xFFFF
            self._shadow_avail = (self._shadow_avail + 1) & 0xFFFF
        if idx_delta is not None:
            self._shadow_avail = (self._published_avail + idx_delta) & 0xFFFF
        self._avail16[1] = self._shadow_avail
        self._published_avail = self._shadow_avail
