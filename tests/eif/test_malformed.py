"""Malformed images are refused with an error naming the problem, never a traceback."""

from __future__ import annotations

import io
import struct
import zlib

import pytest

from virtio_nsm.eif import EifError, read_stream
from virtio_nsm.eif.format import HEADER_SIZE


def _read(data: bytes):
    return read_stream(io.BytesIO(data))


def _with_crc(data: bytes | bytearray) -> bytes:
    """``data`` with its CRC field made right (so the check under test is the one that fails)."""
    data = bytearray(data)
    data[544:548] = struct.pack(">I", zlib.crc32(bytes(data[:544] + data[548:])))
    return bytes(data)


def _patch(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return _with_crc(out)


def _refused(data: bytes, *words: str) -> str:
    with pytest.raises(EifError) as info:
        _read(data)
    message = str(info.value)
    for word in words:
        assert word in message, message
    return message


def test_bad_magic(make_image) -> None:
    _refused(b"EIF!" + make_image()[4:], "bad magic")


@pytest.mark.parametrize("version", [0, 1, 5, 0xFFFF])
def test_unsupported_version(make_image, version: int) -> None:
    _refused(_patch(make_image(), 4, ">H", version), "unsupported EIF version", str(version))


@pytest.mark.parametrize("version", [2, 3])
def test_older_versions_are_read(make_image, version: int) -> None:
    assert _read(_patch(make_image(), 4, ">H", version)).version == version


@pytest.mark.parametrize("size", [0, 3, 100, HEADER_SIZE - 1])
def test_truncated_header(make_image, size: int) -> None:
    data = make_image()[:size]
    if size >= 4:
        _refused(data, "truncated")
    else:
        with pytest.raises(EifError):
            _read(data)


def test_truncated_section(make_image) -> None:
    _refused(make_image()[:-1], "truncated")


def test_extra_bytes_after_last_section(make_image) -> None:
    _refused(make_image() + b"\0", "after the last section")


def test_section_outside_the_file(make_image) -> None:
    _refused(_patch(make_image(), 28 + 8 * 4, ">Q", 10_000), "section 4", "outside the file")


def test_overlapping_sections(make_image) -> None:
    data = make_image()
    offset = struct.unpack_from(">Q", data, 28 + 8)[0]
    _refused(_patch(data, 28 + 8, ">Q", offset - 1), "section 1", "overlaps section 0")


def test_section_overlapping_the_header(make_image) -> None:
    _refused(_patch(make_image(), 28, ">Q", 100), "section 0", "overlaps the header")


def test_gap_between_sections(make_image) -> None:
    data = make_image()
    offset = struct.unpack_from(">Q", data, 28 + 8)[0]
    _refused(_patch(data, 28 + 8, ">Q", offset + 1), "belong to no section")


def test_header_and_section_header_disagree_on_size(make_image) -> None:
    data = bytearray(make_image())
    # grow the kernel by one byte in the section header only, keep the layout
    offset = struct.unpack_from(">Q", data, 28)[0]
    struct.pack_into(">Q", data, offset + 4, 7)
    _refused(_with_crc(data), "section 0", "the EIF header says 6 bytes", "says 7")


@pytest.mark.parametrize(("code", "word"), [(0, "type 0 (invalid)"), (6, "unknown section type 6"),
                                            (0xFFFF, "unknown section type 65535")])
def test_unknown_or_invalid_section_type(make_image, code: int, word: str) -> None:
    data = make_image()
    offset = struct.unpack_from(">Q", data, 28 + 8 * 3)[0]
    _refused(_patch(data, offset, ">H", code), "section 3", word)


def test_non_zero_section_flags(make_image) -> None:
    data = make_image()
    offset = struct.unpack_from(">Q", data, 28)[0]
    _refused(_patch(data, offset + 2, ">H", 1), "non-zero reserved section flags")


@pytest.mark.parametrize(("offset", "fmt", "value", "word"), [
    (6, ">H", 2, "reserved header flags"),
    (6, ">H", 0x8000, "reserved header flags"),
    (24, ">H", 1, "reserved header field"),
    (540, ">I", 1, "unused header field"),
])
def test_non_zero_reserved_header_fields(make_image, offset, fmt, value, word) -> None:
    _refused(_patch(make_image(), offset, fmt, value), word)


def test_aarch64_flag_is_read(make_image) -> None:
    assert _read(_patch(make_image(), 6, ">H", 1)).arch.value == "aarch64"


def test_too_many_sections(make_image) -> None:
    _refused(_patch(make_image(), 26, ">H", 33), "33 sections", "at most 32")


def test_unused_slot_not_zero(make_image) -> None:
    _refused(_patch(make_image(), 284 + 8 * 31, ">Q", 5), "slot 31", "unused slots must be zero")


@pytest.mark.parametrize(("ramdisks", "kernel_type", "missing"), [
    ((), None, "ramdisk"),
    ((b"R",), 3, "kernel"),
])
def test_missing_required_section(make_image, ramdisks, kernel_type, missing) -> None:
    if ramdisks:
        data = make_image(ramdisks=ramdisks)
        offset = struct.unpack_from(">Q", data, 28)[0]
        data = _patch(data, offset, ">H", kernel_type)  # the kernel becomes a ramdisk
    else:
        # drop both ramdisks from the facts image: header count 3, file cut after metadata
        data = make_image()
        end = struct.unpack_from(">Q", data, 28 + 8 * 3)[0]
        out = bytearray(data[:end])
        struct.pack_into(">H", out, 26, 3)
        for slot in (3, 4):
            struct.pack_into(">Q", out, 28 + 8 * slot, 0)
            struct.pack_into(">Q", out, 284 + 8 * slot, 0)
        data = _with_crc(out)
    _refused(data, f"missing {missing} section")


def test_missing_cmdline(make_image) -> None:
    data = make_image()
    offset = struct.unpack_from(">Q", data, 28 + 8)[0]
    _refused(_patch(data, offset, ">H", 3), "missing cmdline section")


def test_duplicate_kernel(make_image) -> None:
    data = make_image()
    offset = struct.unpack_from(">Q", data, 28 + 8 * 3)[0]
    _refused(_patch(data, offset, ">H", 1), "more than one kernel section", "sections 0 and 3")


def test_metadata_not_json(make_image) -> None:
    data = make_image(metadata=b'{"a":1}').replace(b'{"a":1}', b"{not js")
    _refused(_with_crc(data), "metadata section is not JSON")


def test_empty_file() -> None:
    _refused(b"", "truncated")


def _every_field_value(field_offset: int, size: int) -> list[bytes]:
    top = (1 << (8 * size)) - 1
    return [v.to_bytes(size, "big") for v in {0, 1, 2, 4, 5, 6, 0x80, 548, 645, 10_000, top, top - 1}
            if v <= top]


HEADER_FIELDS = [(0, 4), (4, 2), (6, 2), (8, 8), (16, 8), (24, 2), (26, 2)]
HEADER_FIELDS += [(28 + 8 * i, 8) for i in range(32)] + [(284 + 8 * i, 8) for i in range(32)]
HEADER_FIELDS += [(540, 4), (544, 4)]


@pytest.mark.parametrize(("offset", "size"), HEADER_FIELDS)
def test_every_header_field_mutated(make_image, offset: int, size: int) -> None:
    original = make_image()
    for value in _every_field_value(offset, size):
        data = bytearray(original)
        data[offset:offset + size] = value
        for candidate in (bytes(data), _with_crc(data)):
            _outcome(original, candidate)


def _outcome(original: bytes, data: bytes) -> None:
    """A changed image is either refused with EifError or read with a CRC mismatch."""
    try:
        image = _read(data)
    except EifError as exc:
        assert str(exc)
        return
    if data == original:
        assert image.crc_ok
        return
    changed_crc_field = data[544:548] != original[544:548]
    rest_same = data[:544] + data[548:] == original[:544] + original[548:]
    if rest_same and changed_crc_field:
        assert not image.crc_ok
    elif not image.crc_ok:
        pass
    else:
        # a valid CRC over changed contents: only possible when we recomputed it;
        # then the image must still be well-formed and describable
        image.describe()


def test_every_byte_mutated(make_image) -> None:
    original = make_image()
    for position in range(len(original)):
        for flip in (0x01, 0x80, 0xFF):
            data = bytearray(original)
            data[position] ^= flip
            try:
                image = _read(bytes(data))
            except EifError as exc:
                assert str(exc)
                continue
            assert not image.crc_ok, f"byte {position} ^ {flip:#x} went unnoticed"
            image.describe()


def test_every_byte_of_a_signed_image_mutated(make_image, signer) -> None:
    original = make_image(signer=signer, metadata=b'{"ImageName":"x"}')
    for position in range(len(original)):
        data = bytearray(original)
        data[position] ^= 0x41
        try:
            image = _read(bytes(data))
        except EifError as exc:
            assert str(exc)
            continue
        assert not image.crc_ok, f"byte {position} went unnoticed"
        image.describe()
