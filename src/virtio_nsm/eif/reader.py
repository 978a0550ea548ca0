"""Reading an EIF file: layout checks, CRC and measurements in one streamed pass.

The file is read once, front to back, in 1 MiB chunks; each chunk of kernel,
command line and ramdisk data goes into the CRC and the two hashes that cover
it. Only the metadata and signature sections (bounded in size) are kept.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from .format import (
    CRC_OFFSET,
    HEADER_SIZE,
    SECTION_HEADER_SIZE,
    Arch,
    EifError,
    Header,
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


def _chunks(
    stream: io.BufferedIOBase, size: int, buffer: bytearray, view: memoryview
) -> Iterator[memoryview]:
    remaining = size
    while remaining:
        want = min(remaining, len(buffer))
        got = stream.readinto(view[:want])
        if not got:
            raise EifError(f"truncated file: it ended {remaining} bytes before the end of a section "
                           f"(it changed while being read?)")
        remaining -= got
        yield view[:got]


def _read_exact(stream: io.BufferedIOBase, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EifError(f"truncated file: needed {size} bytes, got {len(data)}")
    return data


def read_stream(stream: io.BufferedIOBase) -> EifImage:
    """Read and check an EIF image from a seekable binary stream positioned anywhere."""
    file_size = stream.seek(0, os.SEEK_END)
    stream.seek(0)
    raw_header = stream.read(HEADER_SIZE)
    header = parse_header(raw_header)  # reports truncation, magic, version, reserved fields
    slots = check_layout(header, file_size)
    crc = crc32(raw_header[:CRC_OFFSET])
    measurer = Measurer()
    buffer = bytearray(min(CHUNK_SIZE, max(file_size, 1)))
    view = memoryview(buffer)
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
        for chunk in _chunks(stream, slot.size, buffer, view):
            crc = crc32(chunk, crc)
            measurer.update(chunk)
    for required in _REQUIRED:
        if required not in seen:
            raise EifError(f"missing {required.label} section (an enclave image needs a kernel, "
                           f"a command line and at least one ramdisk)")
    der = certificate_der(signatures[0].signing_certificate) if signatures else None
    return EifImage(header, tuple(sections), file_size, crc, measurer.result(der), metadata, signatures)


def read_eif(path: str | os.PathLike[str]) -> EifImage:
    """Read and check the EIF image at ``path`` (see :func:`read_stream`)."""
    with open(path, "rb") as stream:
        return read_stream(stream)
