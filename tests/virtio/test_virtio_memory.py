from __future__ import annotations

import mmap
import os

import pytest

from virtio_nsm.virtio.memory import GuestMemory, GuestMemoryError, MemoryRegion


def two_regions() -> GuestMemory:
    return GuestMemory(
        [
            MemoryRegion.anonymous(0x1000, 0x1000, user_addr=0x7000_0000),
            MemoryRegion.anonymous(0x2000, 0x1000, user_addr=0x9000_0000),  # adjacent in gpa
            MemoryRegion.anonymous(0x10000, 0x100, user_addr=0x5000),
        ]
    )


def test_read_write_round_trip_and_little_endian_helpers() -> None:
    mem = two_regions()
    mem.write(0x1010, b"\x34\x12\x78\x56")
    assert mem.read(0x1010, 4) == b"\x34\x12\x78\x56"
    assert mem.read_u16(0x1010) == 0x1234
    assert mem.read_u32(0x1010) == 0x56781234
    mem.write_u16(0x10000, 0xBEEF)
    assert mem.read(0x10000, 2) == b"\xef\xbe"


def test_access_crossing_adjacent_regions_is_split() -> None:
    mem = two_regions()
    mem.write(0x1FFE, b"abcd")
    assert mem.read(0x1FFE, 4) == b"abcd"
    assert mem.read(0x2000, 2) == b"cd"


@pytest.mark.parametrize(
    ("gpa", "length"),
    [
        (0x0, 1),  # below every region
        (0xFFF, 2),  # starts outside
        (0x2FFF, 2),  # runs off the end into the gap
        (0x3000, 1),  # in the gap
        (0x100FF, 2),  # straddles the end of the last region
        (0x10000, 0x101),  # longer than the region
        (-1, 1),
        (0xFFFF_FFFF_FFFF_FFFF, 2),  # wraps the address space
    ],
)
def test_out_of_bounds_access_is_refused_and_writes_nothing(gpa: int, length: int) -> None:
    mem = two_regions()
    with pytest.raises(GuestMemoryError):
        mem.read(gpa, length)
    with pytest.raises(GuestMemoryError):
        mem.write(gpa, b"\xff" * length)
    # A refused write leaves every byte of every region untouched.
    assert all(bytes(r.buffer) == bytes(r.size) for r in mem)


def test_view_must_be_inside_one_region() -> None:
    mem = two_regions()
    assert len(mem.view(0x1000, 0x1000)) == 0x1000
    with pytest.raises(GuestMemoryError):
        mem.view(0x1FF0, 0x20)  # adjacent, but two regions
    with pytest.raises(GuestMemoryError):
        mem.view(0x1000, 0)


def test_user_address_translation() -> None:
    mem = two_regions()
    assert mem.user_to_guest(0x7000_0010, 16) == 0x1010
    assert mem.user_to_guest(0x9000_0FF0, 16) == 0x2FF0
    with pytest.raises(GuestMemoryError):
        mem.user_to_guest(0x9000_0FF0, 17)
    with pytest.raises(GuestMemoryError):
        mem.user_to_guest(0x1010, 1)  # a guest address is not a user address


def test_overlapping_regions_are_refused() -> None:
    mem = two_regions()
    with pytest.raises(GuestMemoryError, match="overlaps"):
        mem.add(MemoryRegion.anonymous(0x1800, 0x1000, user_addr=0x1_0000_0000))
    with pytest.raises(GuestMemoryError, match="overlaps"):
        mem.add(MemoryRegion.anonymous(0x20000, 0x1000, user_addr=0x7000_0800))


def test_remove_needs_exact_coordinates() -> None:
    mem = two_regions()
    with pytest.raises(GuestMemoryError):
        mem.remove(0x1000, 0x1000, 0x1234)
    region = mem.remove(0x1000, 0x1000, 0x7000_0000)
    assert region.guest_addr == 0x1000
    with pytest.raises(GuestMemoryError):
        mem.read(0x1000, 1)


def test_from_fd_maps_shared_memory_at_an_unaligned_offset() -> None:
    fd = os.memfd_create("test")
    try:
        os.ftruncate(fd, 3 * mmap.PAGESIZE)
        os.pwrite(fd, b"hello", mmap.PAGESIZE + 8)
        region = MemoryRegion.from_fd(
            fd, guest_addr=0x4000, size=0x100, user_addr=0x8000, mmap_offset=mmap.PAGESIZE + 8
        )
        mem = GuestMemory([region])
        assert mem.read(0x4000, 5) == b"hello"
        mem.write(0x4005, b"!")
        assert os.pread(fd, 6, mmap.PAGESIZE + 8) == b"hello!"  # really shared
        mem.close()
    finally:
        os.close(fd)


def test_from_fd_refuses_a_region_past_the_end_of_the_file() -> None:
    fd = os.memfd_create("test")
    try:
        os.ftruncate(fd, mmap.PAGESIZE)
        with pytest.raises(GuestMemoryError, match="past the end"):
            MemoryRegion.from_fd(
                fd, guest_addr=0, size=2 * mmap.PAGESIZE, user_addr=0, mmap_offset=0
            )
    finally:
        os.close(fd)


def test_from_fd_refuses_a_bad_fd() -> None:
    with pytest.raises(GuestMemoryError):
        MemoryRegion.from_fd(9999, guest_addr=0, size=4096, user_addr=0, mmap_offset=0)


def test_empty_and_overflowing_regions_are_refused() -> None:
    with pytest.raises(GuestMemoryError):
        MemoryRegion.anonymous(0, 0)
    with pytest.raises(GuestMemoryError):
        MemoryRegion(2**64 - 0x10, 0x20, 0, memoryview(bytearray(0x20)))


def test_zero_length_access_needs_no_mapping() -> None:
    mem = two_regions()
    assert mem.read(0, 0) == b""
    mem.write(0xDEAD_0000, b"")
    mem.check(0, 0)


def test_unsealed_memfd_is_mapped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    import fcntl

    sealed = os.memfd_create("sealed", os.MFD_ALLOW_SEALING)
    loose = os.memfd_create("loose")
    try:
        for fd in (sealed, loose):
            os.ftruncate(fd, mmap.PAGESIZE)
        fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        with caplog.at_level("WARNING", logger="virtio_nsm.virtio"):
            MemoryRegion.from_fd(sealed, guest_addr=0, size=4096, user_addr=0, mmap_offset=0).close()
            assert "SIGBUS" not in caplog.text
            MemoryRegion.from_fd(loose, guest_addr=0, size=4096, user_addr=0, mmap_offset=0).close()
            assert "without F_SEAL_SHRINK" in caplog.text
    finally:
        os.close(sealed)
        os.close(loose)
