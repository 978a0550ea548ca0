"""The EIF container: header, section headers and layout rules (no I/O).

Everything here works on bytes already read; :mod:`.reader` and :mod:`.writer`
do the file handling. All integers are big-endian and nothing is padded:

* the 548-byte header (magic ``.eif``, version, flags, default memory and CPU
  count, a reserved u16, the section count, 32 section offsets and 32 section
  sizes, an unused u32 and the CRC32 of everything else in the file);
* then the sections one after the other, each a 12-byte section header
  (type u16, flags u16, data size u64) and its data.

Versions: the header has had this layout in every image AWS's public tools
have written (version 2, the first public one, added the CRC; 3 added the
signature section; 4 the metadata section). nitro-cli reads every version
without looking at the number; QEMU's loader wants 4 or later. This reader
accepts 2, 3 and 4 and refuses anything else as unsupported.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass
from typing import Final

MAGIC: Final = b".eif"
HEADER_SIZE: Final = 548
SECTION_HEADER_SIZE: Final = 12
MAX_SECTIONS: Final = 32
#: Offset of the CRC32 field: the CRC covers the header bytes before it.
CRC_OFFSET: Final = 544
CURRENT_VERSION: Final = 4
SUPPORTED_VERSIONS: Final = (2, 3, 4)
#: Header flag bit 0: the image is for aarch64 (clear: x86_64).
FLAG_AARCH64: Final = 0x1
#: What AWS's builder writes as the default enclave memory and CPU count.
DEFAULT_MEMORY: Final = 1 << 30
DEFAULT_CPUS: Final = 2

_HEADER_HEAD = struct.Struct(">4sHHQQHH")  # 28 bytes, up to the offset table
_TABLE = struct.Struct(f">{MAX_SECTIONS}Q")
_HEADER_TAIL = struct.Struct(">II")
_SECTION = struct.Struct(">HHQ")


class EifError(ValueError):
    """The file is not an EIF image this reader accepts; the message says what is wrong."""


class SectionType(enum.IntEnum):
    INVALID = 0
    KERNEL = 1
    CMDLINE = 2
    RAMDISK = 3
    SIGNATURE = 4
    METADATA = 5

    @property
    def label(self) -> str:
        return self.name.lower()


class Arch(enum.Enum):
    X86_64 = "x86_64"
    AARCH64 = "aarch64"


@dataclass(frozen=True)
class Header:
    """The EIF header as stored (``offsets``/``sizes`` hold all 32 slots)."""

    version: int
    flags: int
    default_mem: int
    default_cpus: int
    section_count: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    crc: int
    reserved: int = 0
    unused: int = 0

    @property
    def arch(self) -> Arch:
        return Arch.AARCH64 if self.flags & FLAG_AARCH64 else Arch.X86_64

    def to_bytes(self) -> bytes:
        offsets = tuple(self.offsets) + (0,) * (MAX_SECTIONS - len(self.offsets))
        sizes = tuple(self.sizes) + (0,) * (MAX_SECTIONS - len(self.sizes))
        return (
            _HEADER_HEAD.pack(MAGIC, self.version, self.flags, self.default_mem, self.default_cpus,
                              self.reserved, self.section_count)
            + _TABLE.pack(*offsets)
            + _TABLE.pack(*sizes)
            + _HEADER_TAIL.pack(self.unused, self.crc)
        )


def unpack_header(data: bytes) -> Header:
    """Split 548 header bytes into fields, checking only the magic."""
    if len(data) < HEADER_SIZE:
        raise EifError(f"truncated file: {len(data)} bytes, the EIF header alone is {HEADER_SIZE}")
    magic, version, flags, mem, cpus, reserved, count = _HEADER_HEAD.unpack_from(data, 0)
    if magic != MAGIC:
        raise EifError(f"bad magic {magic!r}: an EIF image starts with {MAGIC!r}")
    offsets = _TABLE.unpack_from(data, _HEADER_HEAD.size)
    sizes = _TABLE.unpack_from(data, _HEADER_HEAD.size + _TABLE.size)
    unused, crc = _HEADER_TAIL.unpack_from(data, _HEADER_HEAD.size + 2 * _TABLE.size)
    return Header(version, flags, mem, cpus, count, offsets, sizes, crc, reserved, unused)


def parse_header(data: bytes) -> Header:
    """Unpack and check everything the header says on its own (not the sections)."""
    header = unpack_header(data)
    if header.version not in SUPPORTED_VERSIONS:
        raise EifError(
            f"unsupported EIF version {header.version} (this reader reads versions "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))})"
        )
    if header.flags & ~FLAG_AARCH64:
        raise EifError(f"non-zero reserved header flags 0x{header.flags & ~FLAG_AARCH64 & 0xFFFF:04x} "
                       f"(only bit 0, aarch64, is defined)")
    if header.reserved:
        raise EifError(f"non-zero reserved header field (0x{header.reserved:04x})")
    if header.unused:
        raise EifError(f"non-zero unused header field (0x{header.unused:08x})")
    if header.section_count > MAX_SECTIONS:
        raise EifError(f"header lists {header.section_count} sections, at most {MAX_SECTIONS} fit")
    for slot in range(header.section_count, MAX_SECTIONS):
        if header.offsets[slot] or header.sizes[slot]:
            raise EifError(
                f"header slot {slot} has offset {header.offsets[slot]} and size {header.sizes[slot]} "
                f"but the image has only {header.section_count} sections (unused slots must be zero)"
            )
    return header


@dataclass(frozen=True)
class SectionSlot:
    """Where the header says section ``index`` is: its section header at ``offset``."""

    index: int
    offset: int
    size: int

    @property
    def data_offset(self) -> int:
        return self.offset + SECTION_HEADER_SIZE

    @property
    def end(self) -> int:
        return self.offset + SECTION_HEADER_SIZE + self.size


def check_layout(header: Header, file_size: int) -> list[SectionSlot]:
    """The sections as the header places them, refused unless they tile the file.

    Every image AWS's builder writes has its sections in header order, each
    starting where the previous one ends and the last ending at the end of the
    file. nitro-cli reads the sections one after the other from the end of the
    header and QEMU seeks to each header offset: the two agree only on such an
    image, so anything else (an offset outside the file, overlapping sections,
    bytes that belong to no section, a short file) is refused.
    """
    slots = []
    position = HEADER_SIZE
    for index in range(header.section_count):
        offset, size = header.offsets[index], header.sizes[index]
        what = f"section {index}"
        if offset >= file_size:
            raise EifError(f"{what} starts at offset {offset}, outside the file ({file_size} bytes)")
        if offset < position:
            before = "the header" if index == 0 else f"section {index - 1}"
            raise EifError(f"{what} at offset {offset} overlaps {before} (which ends at {position})")
        if offset > position:
            raise EifError(f"{offset - position} bytes at offset {position} belong to no section "
                           f"(section {index} starts at {offset})")
        slot = SectionSlot(index, offset, size)
        if slot.end > file_size:
            raise EifError(f"truncated file: {what} needs bytes {offset}..{slot.end} "
                           f"but the file has {file_size}")
        slots.append(slot)
        position = slot.end
    if position < file_size:
        raise EifError(f"{file_size - position} bytes after the last section (at offset {position}) "
                       f"belong to no section")
    return slots


def encode_section_header(section_type: SectionType, size: int) -> bytes:
    return _SECTION.pack(int(section_type), 0, size)


def parse_section_header(data: bytes, slot: SectionSlot) -> SectionType:
    """Check a section header against the header's slot; return its type."""
    type_code, flags, size = _SECTION.unpack(data)
    what = f"section {slot.index} (offset {slot.offset})"
    try:
        section_type = SectionType(type_code)
    except ValueError:
        raise EifError(f"{what} has unknown section type {type_code}") from None
    if section_type is SectionType.INVALID:
        raise EifError(f"{what} has section type 0 (invalid)")
    if flags:
        raise EifError(f"{what} has non-zero reserved section flags 0x{flags:04x}")
    if size != slot.size:
        raise EifError(f"{what}: the EIF header says {slot.size} bytes, "
                       f"its section header says {size}")
    return section_type


# --- CRC32 ---------------------------------------------------------------
# The writer computes the CRC of the sections before the header exists (the
# header holds the signature size, known only once everything is measured).
# crc32_combine joins the header's CRC and the sections' CRC without reading
# the sections again (zlib's algorithm: apply len2 zero bytes to crc1 as a
# GF(2) matrix power, then xor).

_CRC_POLY: Final = 0xEDB88320


def _gf2_times(matrix: list[int], vector: int) -> int:
    total = 0
    i = 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector >>= 1
        i += 1
    return total


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, matrix[n]) for n in range(32)]


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC32 of ``A || B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)``."""
    if len2 <= 0:
        return crc1
    odd = [_CRC_POLY] + [1 << n for n in range(31)]  # operator for one zero bit
    even = _gf2_square(odd)  # two zero bits
    odd = _gf2_square(even)  # four zero bits
    while True:
        even = _gf2_square(odd)  # first pass: one zero byte
        if len2 & 1:
            crc1 = _gf2_times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = _gf2_square(even)
        if len2 & 1:
            crc1 = _gf2_times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2


def crc32(data: bytes | memoryview, value: int = 0) -> int:
    return zlib.crc32(data, value)
