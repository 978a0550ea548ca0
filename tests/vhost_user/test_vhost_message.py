from __future__ import annotations

import os

import pytest

from virtio_nsm.vhost_user.message import (
    HEADER,
    U64,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    FrontendRequest,
    MemoryRegionDescription,
    MemoryTable,
    Message,
    MessageError,
    SingleMemoryRegion,
    VringAddr,
    VringFd,
    VringState,
    parse_payload,
)

R = FrontendRequest


def test_header_layout_and_identifiers() -> None:
    msg = Message(R.VHOST_USER_GET_FEATURES)
    assert msg.encode() == bytes.fromhex("01000000 01000000 00000000")
    assert HEADER.size == 12
    assert R.VHOST_USER_GET_STATUS == 40 and R.VHOST_USER_ADD_MEM_REG == 37
    assert VringAddr.LAYOUT.size == 40


def test_payloads_round_trip() -> None:
    assert parse_payload(Message(R.VHOST_USER_SET_FEATURES, payload=U64(5).encode())) == U64(5)
    state = VringState(0, 64)
    assert parse_payload(Message(R.VHOST_USER_SET_VRING_NUM, payload=state.encode())) == state
    addr = VringAddr(0, 0, 1, 2, 3, 4)
    assert parse_payload(Message(R.VHOST_USER_SET_VRING_ADDR, payload=addr.encode())) == addr
    region = MemoryRegionDescription(0x1000, 0x2000, 0x7000, 0)
    single = SingleMemoryRegion(region)
    fd = os.eventfd(0)
    try:
        got = parse_payload(Message(R.VHOST_USER_ADD_MEM_REG, payload=single.encode(), fds=[fd]))
        assert got == single
        table = MemoryTable((region,))
        assert parse_payload(
            Message(R.VHOST_USER_SET_MEM_TABLE, payload=table.encode(), fds=[fd])
        ) == table
        # QEMU sends all 8 slots, only the first nregions meaningful.
        padded = table.encode() + bytes(32 * 7)
        assert parse_payload(
            Message(R.VHOST_USER_SET_MEM_TABLE, payload=padded, fds=[fd])
        ) == table
        assert parse_payload(
            Message(R.VHOST_USER_SET_VRING_KICK, payload=VringFd(0, False).encode(), fds=[fd])
        ) == VringFd(0, False)
    finally:
        os.close(fd)
    assert parse_payload(
        Message(R.VHOST_USER_SET_VRING_CALL, payload=VringFd(3, True).encode())
    ) == VringFd(3, True)


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (Message(999), "unknown"),
        (Message(R.VHOST_USER_SET_LOG_BASE, payload=bytes(16)), "unsupported"),
        (Message(R.VHOST_USER_GET_FEATURES, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK),
         "reply flag"),
        (Message(R.VHOST_USER_SET_FEATURES, payload=bytes(7)), "expected 8"),
        (Message(R.VHOST_USER_GET_FEATURES, payload=bytes(1)), "expected 0"),
        (Message(R.VHOST_USER_SET_VRING_ADDR, payload=bytes(39)), "expected 40"),
        (Message(R.VHOST_USER_SET_VRING_KICK, payload=(0x200).to_bytes(8, "little")),
         "reserved bits"),
        (Message(R.VHOST_USER_SET_VRING_KICK, payload=VringFd(0, False).encode()),
         "0 fds with the no-fd flag clear"),
        (Message(R.VHOST_USER_SET_MEM_TABLE, payload=bytes(4)), "file descriptors"),
        (Message(R.VHOST_USER_ADD_MEM_REG, payload=bytes(40)), "file descriptors"),
    ],
)
def test_malformed_messages(message: Message, match: str) -> None:
    with pytest.raises(MessageError, match=match):
        parse_payload(message)


def test_fd_counts_are_enforced() -> None:
    fds = [os.eventfd(0) for _ in range(3)]
    try:
        with pytest.raises(MessageError, match="file descriptors"):
            parse_payload(Message(R.VHOST_USER_SET_OWNER, fds=fds[:1]))
        with pytest.raises(MessageError, match="no-fd flag set"):
            parse_payload(
                Message(R.VHOST_USER_SET_VRING_CALL, payload=VringFd(0, True).encode(),
                        fds=fds[:1])
            )
        region = MemoryRegionDescription(0, 0x1000, 0, 0)
        table = MemoryTable((region, MemoryRegionDescription(0x1000, 0x1000, 0x1000, 0)))
        with pytest.raises(MessageError, match="2 regions but 3 fds"):
            parse_payload(Message(R.VHOST_USER_SET_MEM_TABLE, payload=table.encode(), fds=fds))
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize(
    "payload",
    [
        MemoryTable.PREFIX.pack(0, 0),
        MemoryTable.PREFIX.pack(9, 0) + bytes(32 * 9),
        MemoryTable.PREFIX.pack(2, 0) + bytes(32 * 3),
        MemoryTable.PREFIX.pack(1, 0) + MemoryRegionDescription.LAYOUT.pack(0, 0, 0, 0),
        MemoryTable.PREFIX.pack(1, 0) + MemoryRegionDescription.LAYOUT.pack(2**64 - 1, 2, 0, 0),
    ],
)
def test_bad_memory_tables(payload: bytes) -> None:
    fd = os.eventfd(0)
    try:
        with pytest.raises(MessageError):
            parse_payload(Message(R.VHOST_USER_SET_MEM_TABLE, payload=payload, fds=[fd]))
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("flags", "size", "match"),
    [(0, 0, "version"), (2, 0, "version"), (1 | 0x10, 0, "unknown flag"),
     (1, 1 << 20, "too large")],
)
def test_header_checks(flags: int, size: int, match: str) -> None:
    with pytest.raises(MessageError, match=match):
        Message.check_header(1, flags, size)
