"""Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), split virtqueues.

Theory of operation
-------------------
A backend that dies loses track of the chains it had taken from the available
ring and not yet returned.  The vhost-user answer is a shared memory region that
the *backend* creates (``VHOST_USER_GET_INFLIGHT_FD``), the *frontend* keeps, and
hands to every later backend (``VHOST_USER_SET_INFLIGHT_FD``).  Per queue it holds
a 16-byte header and one 16-byte entry per descriptor (the spec's
``QueueRegionSplit`` / ``DescStateSplit``)::

    header: u64 features | u16 version | u16 desc_num | u16 last_batch_head | u16 used_idx
    entry:  u8 inflight | 5 bytes padding | u16 next | u64 counter

Every queue region is rounded up to 64 bytes, as libvhost-user and DPDK do.

* When a chain is taken, its head's entry gets the next value of a counter and
  ``inflight = 1``.
* When chains are returned, each returned head is linked into a "last batch"
  list (``next``, ``last_batch_head``) *before* ``used->idx`` is published; after
  publishing, their ``inflight`` flags are cleared and ``used_idx`` records the
  published index.
* A new backend first repairs a batch that was published but not yet cleared
  (``used_idx`` differs from ``used->idx``: clear the flags along the list), then
  resubmits the heads still marked inflight in counter order, and continues on
  the available ring at ``used->idx`` plus their number.

A region starts all zero (``GET_INFLIGHT_FD`` hands out a zeroed memfd, as
libvhost-user and DPDK do) and is initialised when a ring first starts with it,
*with that ring's* ``used->idx`` as its recorded index -- not at creation, when
the ring is not known: a frontend that gets its first region for a ring that has
already run (a migration destination, whose rings arrive with the guest's memory;
a frontend that tracked nothing before) hands over a region that no backend ever
took a chain under, and its ring may be anywhere.  Version 0 therefore means "no
backend has started a ring with this region": nothing can be in flight in it, the
ring resumes at ``used->idx``, and whatever else the region holds is overwritten.
The header's version is written last, after the recorded index and the entries,
so a backend killed part way through leaves a region that is still version 0 and
is simply initialised again by its successor (a version-1 region with a stale
recorded index would be refused).  A frontend gains nothing by handing over a
fresh region that it could not get by asking for one; what is refused is a region
that claims to have been used and does not add up (unknown version, other
descriptor count, a used index more than a ring ahead of the recorded one, a
corrupt batch list).

The counter is what makes a request recognisable across a crash: head and
counter (a :class:`~virtio_nsm.request.RequestToken`) name one submission, and
survive the backend.  Counters start at a random 62-bit value in every new
region (the spec leaves the start open; it only orders entries), so two regions -- e.g. before and after a VM
reset, which gets a new region -- never produce the same pair, and a durable
record of "the last request I applied" (:mod:`virtio_nsm.persist`) can tell a
resubmission from a new request that happens to use the same head.

The region comes from the frontend, so everything read from it is checked: a
nonsensical batch list or a version we do not know breaks the ring instead of
being trusted.

Every field a successor reads is stored whole, through memoryviews cast to
``H``/``Q`` (one copy of the field, as the ring indices in :mod:`virtio_nsm.virtio.queue`),
never with ``struct.pack_into``: that zero-fills its target before it writes the
value, so a backend SIGKILLed between the two left a recorded used index of 0
behind, and its successor refused the ring ("used index N is N past the recorded
0"; about once in 2500 kills of the torture test).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import secrets
import struct
from typing import Final

from ..request import RequestToken
from ..virtio.memory import VirtioError

__all__ = [
    "INFLIGHT_VERSION",
    "InflightError",
    "InflightQueue",
    "InflightRegion",
    "queue_region_size",
]

INFLIGHT_VERSION: Final = 1
_ALIGN: Final = 64
_HEADER = struct.Struct("<QHHHH")
_ENTRY = struct.Struct("<B5xHQ")
# Fields as items of the queue region cast to u16 / u64 (the region is 64-byte aligned).
_VERSION16 = 4
_DESC_NUM16 = 5
_LAST_BATCH16 = 6
_USED_IDX16 = 7
_NEXT16 = 3  # + 8 * head + 8: an entry's ``next``
_COUNTER64 = 3  # + 2 * head: an entry's ``counter``
#: Largest queue region we map: 32768 descriptors.
_MAX_QUEUE_SIZE = 32768


class InflightError(VirtioError):
    """The inflight region is unusable (wrong size, unknown version, corrupt batch list)."""


def queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's region (header + entries, 64-byte aligned)."""
    raw = _HEADER.size + _ENTRY.size * queue_size
    return -(-raw // _ALIGN) * _ALIGN


class InflightQueue:
    """The tracking state of one split virtqueue inside an :class:`InflightRegion`."""

    def __init__(self, view: memoryview, queue_size: int) -> None:
        self._view = view
        self.size = queue_size
        # Every entry's ``inflight`` byte, as one strided view; the other fields through
        # whole-field casts (see the module docstring).
        self._flags = view[_HEADER.size : _HEADER.size + _ENTRY.size * queue_size : _ENTRY.size]
        self._u16 = view.cast("H")
        self._u64 = view.cast("Q")
        self._batch: list[int] = []
        _features, version, desc_num, _, _ = _HEADER.unpack_from(view)
        #: No backend has started a ring with this region yet (version 0): :meth:`recover`
        #: initialises it at the ring's used index (see the module docstring).
        self.fresh = version == 0
        self.counter = 0
        if self.fresh:
            return
        if version != INFLIGHT_VERSION:
            raise InflightError(f"inflight region version {version} (this backend knows {INFLIGHT_VERSION})")
        if desc_num != queue_size:
            raise InflightError(f"inflight region for {desc_num} descriptors, queue has {queue_size}")
        with view[_HEADER.size : _HEADER.size + _ENTRY.size * queue_size] as entries:
            self.counter = max(counter for _, _, counter in _ENTRY.iter_unpack(entries)) + 1

    def __repr__(self) -> str:
        return f"<InflightQueue size={self.size} inflight={self.inflight_count} counter={self.counter}>"

    def _initialise(self, used_idx: int) -> None:
        """Write fresh entries and header, recording ``used_idx``; the version goes last."""
        base = secrets.randbits(62)
        size = queue_region_size(self.size)
        entries = _ENTRY.pack(0, 0, base) * self.size
        padding = size - _HEADER.size - len(entries)
        self._view[_HEADER.size : size] = entries + bytes(padding)
        u16 = self._u16
        self._u64[0] = 0
        u16[_DESC_NUM16] = self.size
        u16[_LAST_BATCH16] = 0
        u16[_USED_IDX16] = used_idx & 0xFFFF
        # Only now is the region in use: killed before this store, it is still fresh.
        u16[_VERSION16] = INFLIGHT_VERSION
        self.counter = base + 1
        self.fresh = False

    def release(self) -> None:
        for view in (self._flags, self._u16, self._u64, self._view):
            view.release()

    # -- fields ------------------------------------------------------------------

    def counter_of(self, head: int) -> int:
        return int(self._u64[_COUNTER64 + 2 * head])

    def is_inflight(self, head: int) -> bool:
        return bool(self._flags[head])

    @property
    def inflight_count(self) -> int:
        return sum(1 for flag in self._flags if flag)

    @property
    def used_idx(self) -> int:
        return int(self._u16[_USED_IDX16])

    def token(self, head: int) -> RequestToken:
        """What names the submission of chain ``head`` across backend restarts."""
        return RequestToken(head, self.counter_of(head))

    # -- the protocol ------------------------------------------------------------

    def recover(self, ring_used_idx: int) -> list[int]:
        """Repair a half-finished batch; return the heads to resubmit, in counter order.

        ``ring_used_idx`` is ``used->idx`` as the driver sees it now.  A fresh region
        (version 0) is initialised here, recording ``ring_used_idx``: nothing to resubmit.
        """
        if self.fresh:
            self._initialise(ring_used_idx)
            return []
        u16 = self._u16
        recorded = int(u16[_USED_IDX16])
        unfinished = (ring_used_idx - recorded) & 0xFFFF
        if unfinished:
            if unfinished > self.size:
                raise InflightError(
                    f"used index {ring_used_idx} is {unfinished} past the recorded {recorded}, "
                    f"more than the queue size {self.size}"
                )
            head = int(u16[_LAST_BATCH16])
            for _ in range(unfinished):
                if head >= self.size:
                    raise InflightError(f"last batch list names descriptor {head} of {self.size}")
                self._flags[head] = 0
                head = int(u16[_NEXT16 + 8 * head + 8])
            u16[_USED_IDX16] = ring_used_idx & 0xFFFF
        heads = [i for i in range(self.size) if self._flags[i]]
        heads.sort(key=self.counter_of)
        return heads

    def taken(self, head: int) -> None:
        """Chain ``head`` was taken from the available ring."""
        self._u64[_COUNTER64 + 2 * head] = self.counter
        self.counter += 1
        self._flags[head] = 1

    def returned(self, head: int) -> None:
        """Chain ``head`` is on the used ring, not yet published."""
        u16 = self._u16
        u16[_NEXT16 + 8 * head + 8] = u16[_LAST_BATCH16]
        u16[_LAST_BATCH16] = head
        self._batch.append(head)

    def published(self, used_idx: int) -> None:
        """``used->idx`` = ``used_idx`` is visible to the driver: the batch is done."""
        for head in self._batch:
            self._flags[head] = 0
        self._batch.clear()
        self._u16[_USED_IDX16] = used_idx & 0xFFFF


class InflightRegion:
    """A mapped inflight region: ``num_queues`` queue regions of ``queue_size`` entries."""

    def __init__(self, fd: int, mapping: mmap.mmap, num_queues: int, queue_size: int, mmap_size: int) -> None:
        self.fd = fd
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.mmap_size = mmap_size
        self._mapping = mapping
        self._view = memoryview(mapping)
        self._queues: dict[int, InflightQueue] = {}

    def __repr__(self) -> str:
        return (
            f"<InflightRegion fd={self.fd} queues={self.num_queues}x{self.queue_size} "
            f"size={self.mmap_size}>"
        )

    @staticmethod
    def _check_geometry(num_queues: int, queue_size: int) -> int:
        if not 1 <= num_queues <= 256:
            raise InflightError(f"inflight region for {num_queues} queues")
        if not 1 <= queue_size <= _MAX_QUEUE_SIZE or queue_size & (queue_size - 1):
            raise InflightError(f"inflight region for queue size {queue_size}")
        return num_queues * queue_region_size(queue_size)

    @classmethod
    def create(cls, num_queues: int, queue_size: int) -> InflightRegion:
        """A new zeroed region in a memfd (what GET_INFLIGHT_FD hands out).

        Each queue's part is initialised when a ring first starts with it
        (:meth:`InflightQueue.recover`), at that ring's used index.
        """
        size = cls._check_geometry(num_queues, queue_size)
        fd = os.memfd_create("virtio-nsm-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # The frontend keeps this fd and hands it to the next backend, which maps
            # it: sealed, nobody can shrink it under a mapping (SIGBUS).
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, mapping, num_queues, queue_size, size)

    @classmethod
    def from_fd(
        cls, fd: int, mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int
    ) -> InflightRegion:
        """Map a region handed over by SET_INFLIGHT_FD; takes ownership of ``fd``."""
        try:
            needed = cls._check_geometry(num_queues, queue_size)
            if mmap_size < needed:
                raise InflightError(f"inflight region of {mmap_size} bytes, {needed} needed")
            if mmap_offset % mmap.ALLOCATIONGRANULARITY:
                raise InflightError(f"inflight region offset {mmap_offset:#x} is not page aligned")
            try:
                if os.fstat(fd).st_size < mmap_offset + mmap_size:
                    raise InflightError("inflight region file is smaller than the region")
                mapping = mmap.mmap(
                    fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=mmap_offset
                )
            except OSError as exc:
                raise InflightError(f"cannot map the inflight region: {exc}") from exc
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        return cls(fd, mapping, num_queues, queue_size, mmap_size)

    def queue(self, index: int) -> InflightQueue:
        """The tracker of queue ``index`` (checked; a fresh one is initialised by its first ``recover``)."""
        tracker = self._queues.get(index)
        if tracker is None:
            if not 0 <= index < self.num_queues:
                raise InflightError(f"no inflight region for queue {index}")
            size = queue_region_size(self.queue_size)
            tracker = InflightQueue(self._view[index * size : (index + 1) * size], self.queue_size)
            self._queues[index] = tracker
        return tracker

    def close(self) -> None:
        for tracker in self._queues.values():
            tracker.release()
        self._queues.clear()
        self._view.release()
        self._mapping.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)
