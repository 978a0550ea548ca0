"""Writing EIF images in AWS's builder layout, and signing existing ones.

The builder writes the header, then kernel, command line (no trailing NUL),
metadata, each ramdisk, and the signature last when signing; default memory
1 GiB and 2 CPUs unless told otherwise. The inputs are streamed once: the
sections are written (and hashed, and CRC'd) first, after a placeholder
header; the signature needs PCR0 and the header needs the signature's size,
so the header comes last and its CRC is joined to the sections' CRC with
:func:`~.format.crc32_combine`.

Output files are written to a temporary file beside the target and renamed
over it only once complete, so a failure never leaves half an image.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final, Protocol

from .format import (
    CRC_OFFSET,
    CURRENT_VERSION,
    DEFAULT_CPUS,
    DEFAULT_MEMORY,
    FLAG_AARCH64,
    HEADER_SIZE,
    MAX_SECTIONS,
    Arch,
    EifError,
    Header,
    SectionType,
    crc32,
    crc32_combine,
    encode_section_header,
)
from .measure import Measurements, Measurer
from .metadata import Identity, parse_metadata_section
from .reader import CHUNK_SIZE, open_regular, read_stream
from .signature import Signer

_NO_MEASURE: Final = (SectionType.METADATA, SectionType.SIGNATURE)


class _Readable(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...

    def read(self, size: int, /) -> bytes: ...


@dataclass(frozen=True)
class BuildResult:
    measurements: Measurements
    size: int
    crc: int


class _Sections:
    """Writes sections after a placeholder header, tracking offsets, sizes and the CRC."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.offsets: list[int] = []
        self.sizes: list[int] = []
        self.crc = 0
        self.length = 0  # bytes written after the header
        self.measurer = Measurer()
        self._buffer = bytearray(CHUNK_SIZE)
        self._view = memoryview(self._buffer)
        out.seek(0)
        out.write(bytes(HEADER_SIZE))

    def _put(self, data: bytes | memoryview) -> None:
        self.out.write(data)
        self.crc = crc32(data, self.crc)
        self.length += len(data)

    def _begin(self, section_type: SectionType, size: int) -> None:
        if len(self.offsets) == MAX_SECTIONS:
            raise EifError(f"an EIF image holds at most {MAX_SECTIONS} sections")
        self.offsets.append(HEADER_SIZE + self.length)
        self.sizes.append(size)
        self._put(encode_section_header(section_type, size))
        self.measurer.begin(section_type)

    def add_bytes(self, section_type: SectionType, data: bytes) -> None:
        self._begin(section_type, len(data))
        self._put(data)
        if section_type not in _NO_MEASURE:
            self.measurer.update(data)

    def add_stream(self, section_type: SectionType, stream: _Readable, size: int, what: str) -> None:
        self._begin(section_type, size)
        remaining = size
        while remaining:
            got = stream.readinto(self._view[: min(remaining, CHUNK_SIZE)])
            if not got:
                raise EifError(f"{what} ended {remaining} bytes early (did it change while being read?)")
            chunk = self._view[:got]
            self._put(chunk)
            if section_type not in _NO_MEASURE:
                self.measurer.update(chunk)
            remaining -= got
        if stream.read(1):
            raise EifError(f"{what} grew while being read")

    def finish(self, version: int, flags: int, default_mem: int, default_cpus: int) -> int:
        """Write the header (with the CRC of everything) at the start; return the CRC."""
        header = Header(version, flags, default_mem, default_cpus, len(self.offsets),
                        tuple(self.offsets), tuple(self.sizes), 0)
        raw = header.to_bytes()
        crc = crc32_combine(crc32(raw[:CRC_OFFSET]), self.crc, self.length)
        self.out.seek(0)
        self.out.write(raw[:CRC_OFFSET] + crc.to_bytes(4, "big"))
        self.out.seek(0, os.SEEK_END)
        return crc


def _stream_size(stream: io.BufferedIOBase) -> int:
    size = stream.seek(0, os.SEEK_END)
    stream.seek(0)
    return size


def build_stream(
    out: IO[bytes],
    *,
    kernel: io.BufferedIOBase,
    cmdline: str | bytes,
    ramdisks: Sequence[io.BufferedIOBase],
    metadata: Identity | bytes | None,
    arch: Arch = Arch.X86_64,
    default_mem: int = DEFAULT_MEMORY,
    default_cpus: int = DEFAULT_CPUS,
    signer: Signer | None = None,
) -> BuildResult:
    """Write an image to the seekable ``out`` from open inputs (see :func:`build_eif`)."""
    try:
        raw_cmdline = cmdline.encode("utf-8") if isinstance(cmdline, str) else bytes(cmdline)
    except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from an argv byte that is not UTF-8
        raise ValueError(
            f"the kernel command line is not valid UTF-8 text (character {exc.start}: "
            f"{cmdline[exc.start:exc.end]!r})"
        ) from None
    if b"\0" in raw_cmdline:
        raise ValueError("the kernel command line cannot contain a NUL byte")
    if not ramdisks:
        raise ValueError("an enclave image needs at least one ramdisk")
    if not (0 <= default_mem < 1 << 64 and 0 <= default_cpus < 1 << 64):
        raise ValueError("default memory and CPU count must fit in 64 bits")
    raw_metadata = metadata.to_json() if isinstance(metadata, Identity) else metadata
    if raw_metadata is not None:
        parse_metadata_section(raw_metadata)  # never write what the reader would refuse
    sections = _Sections(out)
    sections.add_stream(SectionType.KERNEL, kernel, _stream_size(kernel), "the kernel")
    sections.add_bytes(SectionType.CMDLINE, raw_cmdline)
    if raw_metadata is not None:
        sections.add_bytes(SectionType.METADATA, raw_metadata)
    for n, ramdisk in enumerate(ramdisks, 1):
        sections.add_stream(SectionType.RAMDISK, ramdisk, _stream_size(ramdisk), f"ramdisk {n}")
    unsigned = sections.measurer.result()
    measurements = unsigned
    if signer is not None:
        sections.add_bytes(SectionType.SIGNATURE, signer.signature_section(unsigned.pcr0))
        measurements = sections.measurer.result(signer.certificate_der)
    flags = FLAG_AARCH64 if arch is Arch.AARCH64 else 0
    crc = sections.finish(CURRENT_VERSION, flags, default_mem, default_cpus)
    return BuildResult(measurements, HEADER_SIZE + sections.length, crc)


@contextlib.contextmanager
def _replacing(path: Path, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """A temporary file beside ``path`` that replaces it only if the block succeeds."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w+b") as out:
            yield out
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def build_eif(
    output: str | os.PathLike[str],
    *,
    kernel: str | os.PathLike[str],
    cmdline: str | bytes,
    ramdisks: Sequence[str | os.PathLike[str]],
    metadata: Identity | bytes | None,
    arch: Arch = Arch.X86_64,
    default_mem: int = DEFAULT_MEMORY,
    default_cpus: int = DEFAULT_CPUS,
    signer: Signer | None = None,
) -> BuildResult:
    """Build an image at ``output`` in AWS's builder layout; return its measurements.

    ``metadata`` is the builder's :class:`Identity` (written as AWS's builder
    writes it), raw bytes for the metadata section, or None for no section.
    """
    with contextlib.ExitStack() as stack:
        kernel_file = stack.enter_context(open_regular(kernel, f"the kernel {os.fspath(kernel)}"))
        ramdisk_files = [stack.enter_context(open_regular(r, f"the ramdisk {os.fspath(r)}"))
                         for r in ramdisks]
        with _replacing(Path(output)) as out:
            return build_stream(out, kernel=kernel_file, cmdline=cmdline, ramdisks=ramdisk_files,
                                metadata=metadata, arch=arch, default_mem=default_mem,
                                default_cpus=default_cpus, signer=signer)
    raise AssertionError("unreachable")  # pragma: no cover


def sign_stream(source: io.BufferedIOBase, out: IO[bytes], signer: Signer) -> BuildResult:
    """Copy the image in ``source`` to ``out`` with a new PCR0 signature.

    An existing signature section is replaced where it is; otherwise the
    signature is appended as the last section (where the builder puts it).
    An image whose CRC is wrong is refused: re-signing it would hide damage.
    """
    image = read_stream(source)
    if not image.crc_ok:
        raise EifError(f"the image's CRC is wrong (header 0x{image.header.crc:08x}, contents "
                       f"0x{image.computed_crc:08x}); refusing to sign a damaged image")
    signature = signer.signature_section(image.measurements.pcr0)
    sections = _Sections(out)
    replaced = False
    for section in image.sections:
        if section.type is SectionType.SIGNATURE:
            sections.add_bytes(SectionType.SIGNATURE, signature)
            replaced = True
            continue
        source.seek(section.offset + 12)
        sections.add_stream(section.type, _Bounded(source, section.size), section.size,
                            f"section {section.index}")
    if not replaced:
        sections.add_bytes(SectionType.SIGNATURE, signature)
    header = image.header
    crc = sections.finish(header.version, header.flags, header.default_mem, header.default_cpus)
    return BuildResult(sections.measurer.result(signer.certificate_der), HEADER_SIZE + sections.length, crc)


class _Bounded:
    """At most ``size`` bytes of ``stream`` from its current position."""

    def __init__(self, stream: io.BufferedIOBase, size: int) -> None:
        self.stream = stream
        self.left = size

    def readinto(self, view: memoryview) -> int:
        want = min(len(view), self.left)
        if not want:
            return 0
        got = self.stream.readinto(view[:want])
        self.left -= got
        return got

    def read(self, n: int) -> bytes:
        data = self.stream.read(min(n, self.left))
        self.left -= len(data)
        return data


def sign_eif(path: str | os.PathLike[str], signer: Signer, output: str | os.PathLike[str] | None = None
             ) -> BuildResult:
    """Add or replace the signature of the image at ``path`` (in place unless ``output``)."""
    target = Path(output if output is not None else path)
    with open_regular(path) as source:
        mode = os.fstat(source.fileno()).st_mode & 0o777
        with _replacing(target, mode) as out:
            return sign_stream(source, out, signer)
    raise AssertionError("unreachable")  # pragma: no cover
