"""An append-only journal of checksummed records in a preallocated file.

What :class:`~virtio_nsm.persist.StateStore` writes on every state change: one
record in the next free slot, then one ``fdatasync``. The file is created at
its full size with real zeros (not a sparse or merely reserved file), so an
append rewrites blocks the file system already maps: no allocation, no size or
directory change, nothing for the ``fdatasync`` to flush but the data.

Layout (``SLOT`` = 4096 bytes)::

    slot 0      header: MAGIC | version u16 | slots u32 | SHA-256 of the fields before
    slot 1..N   records: REC_MAGIC | generation u64 | index u32 | length u32 |
                payload | SHA-256 of everything before; zero padded to the slot

A *generation* is the sequence number of the ``state.bin`` the records follow;
record ``i`` of a generation sits in slot ``1 + i``. Records are written one at
a time, each made durable before the next is written, so after a crash at most
the one record being written is incomplete (torn) and everything before it is
complete. :meth:`Journal.records` therefore returns the records of a generation
up to the first slot that does not hold the next one, and refuses
(:class:`JournalError`) if any later slot holds a complete record of the same
generation: that means a complete record before it was damaged, and dropping
it could undo an acknowledged change. Records of other generations are left
over from before the last compaction and ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

SLOT: Final = 4096
MAGIC: Final = b"NSMJOURN"
VERSION: Final = 1
REC_MAGIC: Final = b"NSMR"
#: Records per journal file by default: a change costs one slot, a full journal one compaction.
DEFAULT_SLOTS: Final = 256
MAX_SLOTS: Final = 1 << 16
_HEADER: Final = struct.Struct(">8sHI")
_RECORD: Final = struct.Struct(">4sQII")
_DIGEST: Final = 32
#: The largest payload one slot holds.
MAX_PAYLOAD: Final = SLOT - _RECORD.size - _DIGEST


class JournalError(Exception):
    """The journal file is damaged or not a journal; the message says how."""


def create(path: Path, slots: int = DEFAULT_SLOTS, *, durable: bool = True) -> None:
    """Write a new, empty journal of ``slots`` records at ``path`` (atomically, mode 0600)."""
    if not 1 <= slots <= MAX_SLOTS:
        raise ValueError(f"a journal has 1 to {MAX_SLOTS} slots")
    fields = _HEADER.pack(MAGIC, VERSION, slots)
    header = fields + hashlib.sha256(fields).digest()
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            _write_all(fd, header.ljust(SLOT, b"\0"), 0)
            zeros = bytes(SLOT * 64)
            for first in range(0, slots, 64):
                count = min(64, slots - first)
                _write_all(fd, zeros[:count * SLOT], (1 + first) * SLOT)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


@dataclass(frozen=True, slots=True)
class _Slot:
    generation: int
    index: int
    payload: bytes


class Journal:
    """An open journal file (see the module docstring). ``writable`` opens it for appends."""

    def __init__(self, path: Path, *, writable: bool = False) -> None:
        self.path = path
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            self.fd = os.open(path, flags)
        except OSError as exc:
            raise JournalError(f"cannot open {path}: {exc.strerror}") from None
        try:
            self.slots = self._check_header()
        except BaseException:
            os.close(self.fd)
            raise

    def _check_header(self) -> int:
        info = os.fstat(self.fd)
        if not stat.S_ISREG(info.st_mode):
            raise JournalError(f"{self.path} is not a regular file")
        head = os.pread(self.fd, _HEADER.size + _DIGEST, 0)
        if len(head) < _HEADER.size + _DIGEST:
            raise JournalError(f"{self.path}: truncated header")
        magic, version, slots = _HEADER.unpack_from(head)
        if magic != MAGIC:
            raise JournalError(f"{self.path} is not a virtio-nsm journal")
        if hashlib.sha256(head[:_HEADER.size]).digest() != head[_HEADER.size:]:
            raise JournalError(f"{self.path}: header checksum mismatch (corrupt)")
        if version != VERSION:
            raise JournalError(f"{self.path}: journal version {version}, this virtio-nsm reads {VERSION}")
        if not 1 <= slots <= MAX_SLOTS:
            raise JournalError(f"{self.path}: {slots} slots")
        if info.st_size != (1 + slots) * SLOT:
            raise JournalError(f"{self.path} is {info.st_size} bytes, its header says "
                               f"{(1 + slots) * SLOT} (truncated or extended)")
        return int(slots)

    def _slot(self, raw: bytes) -> _Slot | None:
        """The record in one slot's bytes, or None if it holds no complete record."""
        if raw[:4] != REC_MAGIC:
            return None
        _, generation, index, length = _RECORD.unpack_from(raw)
        end = _RECORD.size + length
        if length > MAX_PAYLOAD or hashlib.sha256(raw[:end]).digest() != raw[end:end + _DIGEST]:
            return None
        return _Slot(generation, index, raw[_RECORD.size:end])

    def records(self, generation: int) -> list[bytes]:
        """The payloads of ``generation``'s complete records, in order (see the module docstring)."""
        data = b""
        want = (1 + self.slots) * SLOT
        while len(data) < want:
            chunk = os.pread(self.fd, want - len(data), len(data))
            if not chunk:
                raise JournalError(f"{self.path} shrank while being read")
            data += chunk
        payloads: list[bytes] = []
        for i in range(self.slots):
            record = self._slot(data[(1 + i) * SLOT:(2 + i) * SLOT])
            if record is None or record.generation != generation or record.index != i:
                break
            payloads.append(record.payload)
        tail = len(payloads)
        for j in range(tail, self.slots):
            record = self._slot(data[(1 + j) * SLOT:(2 + j) * SLOT])
            if record is not None and record.generation == generation:
                raise JournalError(
                    f"{self.path}: record {tail} of generation {generation} is damaged or missing "
                    f"but slot {1 + j} holds a later complete record of it (record {record.index}); "
                    "an acknowledged change would be lost")
        return payloads

    @staticmethod
    def encode(generation: int, index: int, payload: bytes) -> bytes:
        """One slot's bytes; ValueError if ``payload`` does not fit a slot."""
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"a journal record holds at most {MAX_PAYLOAD} bytes")
        head = _RECORD.pack(REC_MAGIC, generation, index, len(payload)) + payload
        return (head + hashlib.sha256(head).digest()).ljust(SLOT, b"\0")

    def write(self, index: int, slot: bytes, *, durable: bool = True) -> None:
        """Write record ``index``'s slot bytes (from :meth:`encode`) and make them durable."""
        if not 0 <= index < self.slots:
            raise IndexError(f"record {index} is beyond the journal's {self.slots} slots")
        _write_all(self.fd, slot, (1 + index) * SLOT)
        if durable:
            os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
