from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtio_nsm.vsock import constants as c
from virtio_nsm.vsock.packet import Header, PacketError, decode, encode_event, problem


def header(**kw: int) -> Header:
    fields = dict(src_cid=5, dst_cid=2, src_port=1, dst_port=2, len=0, type=1, op=c.VIRTIO_VSOCK_OP_RW)
    fields.update(kw)
    return Header(**fields)


def test_layout_matches_linux_struct() -> None:
    h = Header(0x0102030405060708, 2, 0x11223344, 0x55667788, 3, 1, 5, 0, 0x99AABBCC, 0xDDEEFF00)
    raw = h.encode()
    assert len(raw) == c.HEADER_SIZE == 44
    assert raw[:8] == bytes.fromhex("0807060504030201")
    assert raw[16:20] == bytes.fromhex("44332211")
    assert struct.unpack_from("<IHHIII", raw, 24) == (3, 1, 5, 0, 0x99AABBCC, 0xDDEEFF00)


@given(
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=64),
    st.integers(0, 2**16 - 1),
    st.integers(0, 2**16 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
)
def test_round_trip(
    src: int, dst: int, sp: int, dp: int, payload: bytes, ty: int, op: int, fl: int, ba: int, fc: int
) -> None:
    h = Header(src, dst, sp, dp, len(payload), ty, op, fl, ba, fc)
    assert decode(h.encode() + payload + b"trailing") == (h, payload)


def test_short_buffer_and_len_beyond_it_are_refused() -> None:
    with pytest.raises(PacketError, match="shorter than a 44-byte header"):
        decode(b"\0" * 43)
    raw = header(len=10).encode()
    with pytest.raises(PacketError, match="beyond the 9 bytes"):
        decode(raw + b"x" * 9)
    with pytest.raises(PacketError, match="packet limit"):
        decode(header(len=c.MAX_PKT_PAYLOAD + 1).encode() + b"x" * (c.MAX_PKT_PAYLOAD + 1))


def test_fields_are_range_checked() -> None:
    with pytest.raises(PacketError, match="src_port"):
        header(src_port=2**32)
    with pytest.raises(PacketError, match="op"):
        header(op=-1)


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"type": 2}, "unsupported socket type 2"),
        ({"type": 0}, "unsupported socket type 0"),
        ({"op": 0}, "unknown op 0"),
        ({"op": 8}, "unknown op 8"),
        ({"op": c.VIRTIO_VSOCK_OP_REQUEST, "len": 4}, "carries 4 payload bytes"),
        ({"op": c.VIRTIO_VSOCK_OP_SHUTDOWN, "flags": 4}, "unknown SHUTDOWN flags"),
        ({"op": c.VIRTIO_VSOCK_OP_RW, "flags": 1}, "flags 0x1 on op 5"),
    ],
)
def test_problem_names_what_is_wrong(kw: dict[str, int], reason: str) -> None:
    found = problem(header(**kw))
    assert found is not None and reason in found


def test_valid_headers_have_no_problem() -> None:
    assert problem(header(len=100)) is None
    assert problem(header(op=c.VIRTIO_VSOCK_OP_SHUTDOWN, flags=3)) is None
    assert problem(header(op=c.VIRTIO_VSOCK_OP_CREDIT_REQUEST)) is None


def test_event_record() -> None:
    assert encode_event(c.VIRTIO_VSOCK_EVENT_TRANSPORT_RESET) == b"\0\0\0\0"
