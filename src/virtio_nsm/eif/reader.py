"""Reading an EIF file: layout checks, CRC and measurements in one streamed pass.

The file is read once, front to back, in 1 MiB chunks; each chunk of kernel,
command line and ramdisk data goes into the CRC and the two hashes that cover
it. Only the metadata and signature sections (bounded in size) are kept.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

from .. import _files
from .format import (
    CRC_OFFSET,
    HEADER_SIZE,
    SECTION_HEADER_SIZE,
    Arch,
    EifError,
    Header,
    SectionSlot,
    SectionType,
    check_layout,
    crc32,
    parse_header,
    parse_section_header,
)
from .measure import Measurements, Measurer
from .metadata import MAX_METADATA_SECTION, describe_metadata, parse_metadata_section
from .signature import (
    MAX_SIGNATURE_SECTION,
    PcrSignature,
    SignatureCheck,
    certificate_der,
    certificate_info,
    check_signature,
    decode_signature_section,
)

CHUNK_SIZE: Final = 1 << 20
#: Files this large are hashed on two threads.
PARALLEL_THRESHOLD: Final = 8 << 20
_SINGLE: Final = (SectionType.KERNEL, SectionType.CMDLINE, SectionType.METADATA, SectionType.SIGNATURE)
_REQUIRED: Final = (SectionType.KERNEL, SectionType.CMDLINE, SectionType.RAMDISK)


@dataclass(frozen=True)
class Section:
    index: int
    type: SectionType
    offset: int
    size: int


@dataclass(frozen=True)
class EifImage:
    """What reading an image found: checked layout, CRC, measurements, metadata, signature."""

    header: Header
    sections: tuple[Section, ...]
    file_size: int
    computed_crc: int
    measurements: Measurements
    metadata: dict[str, Any] | None
    signatures: tuple[PcrSignature, ...]

    @property
    def version(self) -> int:
        return self.header.version

    @property
    def arch(self) -> Arch:
        return self.header.arch

    @property
    def crc_ok(self) -> bool:
        return self.computed_crc == self.header.crc

    @property
    def is_signed(self) -> bool:
        return bool(self.signatures)

    def signature_check(self) -> SignatureCheck | None:
        """Whether the PCR0 signature is valid for this image (None when unsigned)."""
        if not self.signatures:
            return None
        return check_signature(self.signatures[0], self.measurements.pcr0)

    def describe(self) -> dict[str, Any]:
        """``nitro-cli describe-eif``'s JSON object (same field names and order)."""
        out: dict[str, Any] = {
            "EifVersion": self.version,
            "Measurements": self.measurements.to_json(),
            "IsSigned": self.is_signed,
        }
        check = self.signature_check()
        if self.signatures:
            out["SigningCertificate"] = certificate_info(self.signatures[0].signing_certificate)
        out["CheckCRC"] = self.crc_ok
        if check is not None:
            out["SignatureCheck"] = check.valid
        if self.metadata is not None:
            name, version, described = describe_metadata(self.metadata)
            if name is not None:
                out["ImageName"] = name
            if version is not None:
                out["ImageVersion"] = version
            if described is not None:
                out["Metadata"] = described
        return out


def _read_chunk(stream: io.BufferedIOBase, view: memoryview, remaining: int) -> memoryview:
    got = stream.readinto(view[: min(remaining, len(view))])
    if not got:
        raise EifError(f"truncated file: it ended {remaining} bytes before the end of a section "
                       f"(did it change while being read?)")
    return view[:got]


class _Feeder:
    """Streams section data into the CRC and the measurer's hashes.

    Large images are hashed on two worker threads (hashlib and zlib release
    the GIL on large buffers): each hash gets its chunks in order, one update
    in flight at a time, while this thread computes the CRC and reads the next
    chunk into the other of two buffers. Small ones are hashed inline.
    """

    def __init__(self, stream: io.BufferedIOBase, parallel: bool, file_size: int) -> None:
        self.stream = stream
        size = min(CHUNK_SIZE, max(file_size, 1))
        self.views = [memoryview(bytearray(size)) for _ in range(2 if parallel else 1)]
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="eif-hash") if parallel else None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def feed(self, size: int, crc: int, measurer: Measurer) -> int:
        remaining = size
        if self.pool is None:
            while remaining:
                chunk = _read_chunk(self.stream, self.views[0], remaining)
                remaining -= len(chunk)
                crc = crc32(chunk, crc)
                measurer.update(chunk)
            return crc
        pending: list[Future[None]] = []
        turn = 0
        try:
            while remaining:
                # the buffer read into now was hashed two chunks ago: done (waited below)
                chunk = _read_chunk(self.stream, self.views[turn], remaining)
                remaining -= len(chunk)
                for future in pending:
                    future.result()
                pending = [self.pool.submit(target.update, chunk) for target in measurer.targets]
                crc = crc32(chunk, crc)
                turn ^= 1
        finally:
            for future in pending:
                future.result()
        return crc


def _read_exact(stream: io.BufferedIOBase, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EifError(f"truncated file: needed {size} bytes, got {len(data)}")
    return data


def read_stream(stream: io.BufferedIOBase, *, parallel: bool | None = None) -> EifImage:
    """Read and check an EIF image from a seekable binary stream positioned anywhere.

    ``parallel`` hashes on two threads (default: for files of 8 MiB or more).
    """
    file_size = stream.seek(0, os.SEEK_END)
    stream.seek(0)
    raw_header = stream.read(HEADER_SIZE)
    header = parse_header(raw_header)  # reports truncation, magic, version, reserved fields
    slots = check_layout(header, file_size)
    crc = crc32(raw_header[:CRC_OFFSET])
    measurer = Measurer()
    if parallel is None:
        parallel = file_size >= PARALLEL_THRESHOLD
    feeder = _Feeder(stream, parallel, file_size)
    try:
        return _read_sections(stream, header, slots, crc, measurer, feeder, file_size)
    finally:
        feeder.close()


def _read_sections(stream: io.BufferedIOBase, header: Header, slots: list[SectionSlot], crc: int,
                   measurer: Measurer, feeder: _Feeder, file_size: int) -> EifImage:
    sections: list[Section] = []
    seen: dict[SectionType, int] = {}
    metadata: dict[str, Any] | None = None
    signatures: tuple[PcrSignature, ...] = ()
    for slot in slots:
        raw = _read_exact(stream, SECTION_HEADER_SIZE)
        section_type = parse_section_header(raw, slot)
        if section_type in _SINGLE and section_type in seen:
            raise EifError(f"more than one {section_type.label} section "
                           f"(sections {seen[section_type]} and {slot.index})")
        seen.setdefault(section_type, slot.index)
        crc = crc32(raw, crc)
        sections.append(Section(slot.index, section_type, slot.offset, slot.size))
        if section_type in (SectionType.METADATA, SectionType.SIGNATURE):
            limit = MAX_METADATA_SECTION if section_type is SectionType.METADATA else MAX_SIGNATURE_SECTION
            if slot.size > limit:
                raise EifError(f"{section_type.label} section of {slot.size} bytes is larger than "
                               f"the {limit}-byte limit")
            data = _read_exact(stream, slot.size)
            crc = crc32(data, crc)
            if section_type is SectionType.METADATA:
                metadata = parse_metadata_section(data)
            else:
                signatures = tuple(decode_signature_section(data))
            continue
        measurer.begin(section_type)
        crc = feeder.feed(slot.size, crc, measurer)
    for required in _REQUIRED:
        if required not in seen:
            raise EifError(f"missing {required.label} section (an enclave image needs a kernel, "
                           f"a command line and at least one ramdisk)")
    der = certificate_der(signatures[0].signing_certificate) if signatures else None
    return EifImage(header, tuple(sections), file_size, crc, measurer.result(der), metadata, signatures)


def open_regular(path: str | os.PathLike[str], what: str = "") -> io.BufferedReader:
    """Open a regular file for reading; refuse FIFOs, devices and directories without blocking."""
    try:
        fd = _files.open_regular(path)
    except _files.NotRegularFile:
        raise EifError(f"{what or os.fspath(path)} is not a regular file") from None
    try:
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_eif(path: str | os.PathLike[str], *, parallel: bool | None = None) -> EifImage:
    """Read and check the EIF image at ``path`` (see :func:`read_stream`)."""
    with open_regular(path) as stream:
        return read_stream(stream, parallel=parallel)
