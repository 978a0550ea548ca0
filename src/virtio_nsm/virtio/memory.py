"""Guest memory as the device sees it: a set of mapped regions, every access checked.

Theory of operation
-------------------
A vhost-user frontend (QEMU, or our own Python driver) shares guest RAM as file
descriptors (memfd, hugetlbfs, ...).  Each region comes with three coordinates:
its *guest-physical* address (what descriptors contain), its *user* address (the
frontend's virtual address, which is what ``VHOST_USER_SET_VRING_ADDR`` carries)
and an offset into the file.  :class:`GuestMemory` keeps the regions sorted by
guest address and translates both kinds of address.

Everything the guest hands us is untrusted.  Every read and write names a guest
address and a length, and the whole range must lie inside mapped regions
(adjacent regions are crossed transparently); otherwise :class:`GuestMemoryError`
is raised and nothing is touched.  Python's slicing never reaches outside a
mapping, so a bug here cannot turn into a stray access either.

Tests use regions backed by a plain ``bytearray`` (see :meth:`MemoryRegion.anonymous`).
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import logging
import mmap
import os
import stat
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

__all__ = ["NOT_A_FILE", "GuestMemory", "GuestMemoryError", "MemoryRegion", "VirtioError", "shrink_hazard"]

log = logging.getLogger("virtio_nsm.virtio")

_U64_LIMIT = 1 << 64
_PAGE = mmap.PAGESIZE


class VirtioError(Exception):
    """Base class of every error caused by what a virtio peer put in shared memory."""


class GuestMemoryError(VirtioError):
    """A guest or user address range is not (entirely) backed by mapped memory."""


@dataclass(eq=False)
class MemoryRegion:
    """One contiguous range of guest memory and the buffer that backs it."""

    guest_addr: int
    size: int
    user_addr: int
    buffer: memoryview
    mmap_offset: int = 0
    _mapping: mmap.mmap | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise GuestMemoryError(f"memory region of size {self.size} is empty")
        for name, base in (("guest", self.guest_addr), ("user", self.user_addr)):
            if base < 0 or base + self.size > _U64_LIMIT:
                raise GuestMemoryError(
                    f"memory region {name} range {base:#x}+{self.size:#x} overflows 64 bits"
                )
        if len(self.buffer) != self.size or self.buffer.readonly:
            raise GuestMemoryError("memory region buffer must be writable and of its size")

    @classmethod
    def anonymous(cls, guest_addr: int, size: int, user_addr: int | None = None) -> MemoryRegion:
        """A region backed by private process memory (for tests and benchmarks)."""
        return cls(
            guest_addr,
            size,
            guest_addr if user_addr is None else user_addr,
            memoryview(bytearray(size)),
        )

    @classmethod
    def from_fd(
        cls, fd: int, *, guest_addr: int, size: int, user_addr: int, mmap_offset: int
    ) -> MemoryRegion:
        """Map ``size`` bytes of ``fd`` starting at ``mmap_offset`` (shared, read/write).

        The file must be at least ``mmap_offset + size`` bytes long; touching a page
        past the end of a file raises SIGBUS, so a short file is refused here.
        The caller keeps ownership of ``fd`` (it may be closed right after).
        """
        if size <= 0 or mmap_offset < 0 or mmap_offset + size > _U64_LIMIT:
            raise GuestMemoryError(f"bad memory region: size {size:#x} offset {mmap_offset:#x}")
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise GuestMemoryError(f"memory region fd {fd} is not usable: {exc}") from exc
        if st.st_size and mmap_offset + size > st.st_size:
            raise GuestMemoryError(
                f"memory region {mmap_offset:#x}+{size:#x} extends past the end of its "
                f"file ({st.st_size:#x} bytes)"
            )
        _warn_if_shrinkable(fd)
        aligned = mmap_offset - mmap_offset % _PAGE
        skip = mmap_offset - aligned
        try:
            mapping = mmap.mmap(
                fd,
                size + skip,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=aligned,
            )
        except (OSError, ValueError, OverflowError) as exc:
            raise GuestMemoryError(
                f"cannot map memory region (fd {fd}, {mmap_offset:#x}+{size:#x}): {exc}"
            ) from exc
        view = memoryview(mapping)[skip : skip + size]
        return cls(guest_addr, size, user_addr, view, mmap_offset, mapping)

    @property
    def guest_end(self) -> int:
        return self.guest_addr + self.size

    @property
    def user_end(self) -> int:
        return self.user_addr + self.size

    def close(self) -> None:
        """Unmap the region.  Safe to call twice."""
        self.buffer.release()
        if self._mapping is not None:
            # Views handed out earlier keep the mapping alive; it goes away with them.
            with contextlib.suppress(BufferError):
                self._mapping.close()
            self._mapping = None


#: :func:`shrink_hazard`'s answer for an fd that is no file at all (a pipe, an eventfd...).
NOT_A_FILE = "not a regular file or memfd"


def shrink_hazard(fd: int) -> str | None:
    """Why the file behind ``fd`` could shrink under a mapping of it, or None if it cannot.

    A mapped file that its owner truncates turns the next access to a page past the
    new end into SIGBUS, which Python cannot turn into an exception: the process dies.
    Only a memfd (or another shmem file) carrying ``F_SEAL_SHRINK`` is safe: QEMU's
    ``memory-backend-memfd`` seals its memfds so by default (``seal=on``).  A regular
    file (``memory-backend-file``, on /dev/shm or hugetlbfs) or an unsealed memfd can
    be shrunk by whoever else holds it.
    """
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        return f"an unusable fd ({exc})"
    if not stat.S_ISREG(mode):
        return NOT_A_FILE
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return "a file that cannot be sealed against shrinking"
    if not seals & fcntl.F_SEAL_SHRINK:
        return "a memfd (or shmem file) without F_SEAL_SHRINK"
    return None


def _warn_if_shrinkable(fd: int) -> None:
    reason = shrink_hazard(fd)
    if reason is not None:
        log.warning(
            "guest memory fd %d is %s: if the frontend shrinks it, this process "
            "dies of SIGBUS",
            fd,
            reason,
        )


class GuestMemory:
    """A set of non-overlapping :class:`MemoryRegion` with checked access."""

    def __init__(self, regions: Iterable[MemoryRegion] = ()) -> None:
        self._regions: list[MemoryRegion] = []
        self._starts: list[int] = []
        # The region of the last access: nearly every access hits it again.
        self._last: MemoryRegion | None = None
        for region in regions:
            self.add(region)

    def __repr__(self) -> str:
        spans = ", ".join(f"{r.guest_addr:#x}+{r.size:#x}" for r in self._regions)
        return f"<GuestMemory [{spans}]>"

    def __len__(self) -> int:
        return len(self._regions)

    def __iter__(self) -> Iterator[MemoryRegion]:
        return iter(self._regions)

    # -- region table ---------------------------------------------------------------

    def add(self, region: MemoryRegion) -> None:
        """Insert a region; it must overlap no other region, by guest or user address."""
        for other in self._regions:
            if region.guest_addr < other.guest_end and other.guest_addr < region.guest_end:
                raise GuestMemoryError(
                    f"memory region at guest {region.guest_addr:#x}+{region.size:#x} overlaps "
                    f"{other.guest_addr:#x}+{other.size:#x}"
                )
            if region.user_addr < other.user_end and other.user_addr < region.user_end:
                raise GuestMemoryError(
                    f"memory region at user {region.user_addr:#x}+{region.size:#x} overlaps "
                    f"{other.user_addr:#x}+{other.size:#x}"
                )
        i = bisect.bisect(self._starts, region.guest_addr)
        self._regions.insert(i, region)
        self._starts.insert(i, region.guest_addr)

    def remove(self, guest_addr: int, size: int, user_addr: int) -> MemoryRegion:
        """Detach and return the region with exactly these coordinates (not unmapped)."""
        for i, region in enumerate(self._regions):
            if (region.guest_addr, region.size, region.user_addr) == (guest_addr, size, user_addr):
                del self._regions[i]
                del self._starts[i]
                self._last = None
                return region
        raise GuestMemoryError(f"no memory region at guest {guest_addr:#x}+{size:#x} user {user_addr:#x}")

    def close(self) -> None:
        """Unmap every region."""
        for region in self._regions:
            region.close()
        self._regions.clear()
        self._starts.clear()
        self._last = None

    # -- translation ----------------------------------------------------------------

    def _locate(self, gpa: int) -> MemoryRegion | None:
        i = bisect.bisect(self._starts, gpa) - 1
        if i >= 0:
            region = self._regions[i]
            if gpa < region.guest_end:
                self._last = region
                return region
        return None

    def _pieces(self, gpa: int, length: int) -> Iterator[tuple[memoryview, int, int]]:
        """Yield (buffer, offset, count) covering ``[gpa, gpa+length)``, all checked first."""
        if length < 0 or gpa < 0 or gpa + length > _U64_LIMIT:
            raise GuestMemoryError(f"invalid guest range {gpa:#x}+{length:#x}")
        pieces: list[tuple[memoryview, int, int]] = []
        if length == 0:
            return iter(pieces)  # touches nothing, so needs no mapping
        addr, left = gpa, length
        while True:
            region = self._locate(addr)
            if region is None:
                raise GuestMemoryError(
                    f"guest range {gpa:#x}+{length:#x} is not backed by guest memory (no region at {addr:#x})"
                )
            offset = addr - region.guest_addr
            count = min(left, region.size - offset)
            pieces.append((region.buffer, offset, count))
            left -= count
            addr += count
            if left == 0:
                return iter(pieces)

    def check(self, gpa: int, length: int) -> None:
        """Raise :class:`GuestMemoryError` unless the whole range is mapped."""
        region = self._last
        if region is not None and length > 0:
            offset = gpa - region.guest_addr
            if offset >= 0 and offset + length <= region.size:
                return
        for _ in self._pieces(gpa, length):
            pass

    def region_holding(self, gpa: int, length: int, gpa2: int, length2: int) -> MemoryRegion | None:
        """The region that wholly holds both (non-empty) ranges, if one does.

        For a caller that then slices the region's buffer itself (offsets from its
        ``guest_addr``); None does not mean unmapped (the ranges may span regions).
        """
        region = self._last
        if region is None or not (region.guest_addr <= gpa < region.guest_end):
            region = self._locate(gpa) if gpa >= 0 else None
            if region is None:
                return None
        start, size = region.guest_addr, region.size
        if length > 0 and length2 > 0 and gpa - start + length <= size and (
            start <= gpa2 and gpa2 - start + length2 <= size
        ):
            return region
        return None

    def covers(self, gpa: int, length: int, gpa2: int, length2: int) -> bool:
        """Whether both ranges are wholly mapped (:meth:`check` for two, without raising)."""
        region = self._last
        if region is not None and length > 0 and length2 > 0:
            start, size = region.guest_addr, region.size
            if start <= gpa and gpa - start + length <= size and (
                start <= gpa2 and gpa2 - start + length2 <= size
            ):
                return True
        try:
            self.check(gpa, length)
            self.check(gpa2, length2)
        except GuestMemoryError:
            return False
        return True

    def view(self, gpa: int, length: int) -> memoryview:
        """A live view of a range that lies within a single region."""
        if length <= 0:
            raise GuestMemoryError(f"invalid guest range {gpa:#x}+{length:#x}")
        region = self._locate(gpa) if gpa >= 0 else None
        if region is None or gpa + length > region.guest_end:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not inside a single memory region")
        offset = gpa - region.guest_addr
        return region.buffer[offset : offset + length]

    def user_to_guest(self, uva: int, length: int) -> int:
        """Translate a frontend virtual address range (inside one region) to a guest address."""
        for region in self._regions:
            if region.user_addr <= uva < region.user_end:
                if uva + length > region.user_end:
                    break
                return region.guest_addr + (uva - region.user_addr)
        raise GuestMemoryError(f"user range {uva:#x}+{length:#x} is not inside a single memory region")

    # -- access -----------------------------------------------------------------------

    def read(self, gpa: int, length: int) -> bytes:
        region = self._last  # _hit(), inline: nearly every access takes this path
        if region is not None and length > 0:
            off = gpa - region.guest_addr
            if off >= 0 and off + length <= region.size:
                return region.buffer[off : off + length].tobytes()
        pieces = list(self._pieces(gpa, length))
        if len(pieces) == 1:
            buf, off, n = pieces[0]
            return bytes(buf[off : off + n])
        return b"".join(bytes(buf[off : off + n]) for buf, off, n in pieces)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        region = self._last  # _hit(), inline: nearly every access takes this path
        length = len(data)
        if region is not None and length > 0:
            off = gpa - region.guest_addr
            if off >= 0 and off + length <= region.size:
                region.buffer[off : off + length] = data
                return
        done = 0
        for buf, off, n in self._pieces(gpa, len(data)):
            buf[off : off + n] = data[done : done + n]
            done += n

    def read_u16(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 2), "little")

    def write_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<H", value))

    def read_u32(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 4), "little")
