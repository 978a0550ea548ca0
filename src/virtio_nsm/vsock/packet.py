"""The virtio-vsock packet header (44 bytes, little-endian) and the event-queue record.

:func:`decode` never trusts the other side: a buffer shorter than a header, a
``len`` beyond the bytes that follow it or beyond :data:`MAX_PKT_PAYLOAD` raise
:class:`PacketError`.  Field *meanings* (is this op known, may this op carry data,
are these flags valid) are checked by :func:`problem`, which names what is wrong so
that the connection layer can decide between dropping the packet and a reset.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .constants import (
    EVENT_SIZE,
    HEADER_SIZE,
    MAX_PKT_PAYLOAD,
    U32_MASK,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_MASK,
    VIRTIO_VSOCK_TYPE_STREAM,
)

__all__ = ["Header", "PacketError", "decode", "encode_event", "pack_header", "problem"]

_HEADER = struct.Struct("<QQIIIHHIII")
assert _HEADER.size == HEADER_SIZE
_EVENT = struct.Struct("<I")
assert _EVENT.size == EVENT_SIZE

_U64 = (1 << 64) - 1
_U16 = 0xFFFF


class PacketError(ValueError):
    """A buffer that does not hold a well-formed vsock packet."""


@dataclass(frozen=True, slots=True)
class Header:
    """``struct virtio_vsock_hdr``; every field is range-checked on construction."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0

    def __post_init__(self) -> None:
        try:  # one C-level check of every range; the loop below only names the culprit
            self.encode()
        except struct.error:
            pass
        else:
            return
        for name, limit in (
            ("src_cid", _U64),
            ("dst_cid", _U64),
            ("src_port", U32_MASK),
            ("dst_port", U32_MASK),
            ("len", U32_MASK),
            ("type", _U16),
            ("op", _U16),
            ("flags", U32_MASK),
            ("buf_alloc", U32_MASK),
            ("fwd_cnt", U32_MASK),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= limit:
                raise PacketError(f"header field {name}={value!r} out of range 0..{limit}")
        raise PacketError("header fields out of range")  # pragma: no cover (struct and the loop agree)

    def encode(self) -> bytes:
        return _HEADER.pack(
            self.src_cid,
            self.dst_cid,
            self.src_port,
            self.dst_port,
            self.len,
            self.type,
            self.op,
            self.flags,
            self.buf_alloc,
            self.fwd_cnt,
        )


def pack_header(
    src_cid: int,
    dst_cid: int,
    src_port: int,
    dst_port: int,
    length: int,
    type_: int,
    op: int,
    flags: int,
    buf_alloc: int,
    fwd_cnt: int,
) -> bytes:
    """The 44 header bytes for these fields (the hot path: no :class:`Header` object).

    Out-of-range fields raise :class:`PacketError` as :class:`Header` does.
    """
    try:
        return _HEADER.pack(
            src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc, fwd_cnt
        )
    except struct.error:
        Header(src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc, fwd_cnt)
        raise  # pragma: no cover (Header raised already)


def decode(buf: bytes | memoryview) -> tuple[Header, bytes]:
    """Split ``buf`` (what a tx chain holds) into its header and exactly ``len`` payload bytes.

    Bytes after the payload are ignored.  Raises :class:`PacketError` if ``buf`` is
    shorter than a header, ``len`` exceeds :data:`MAX_PKT_PAYLOAD`, or fewer than
    ``len`` bytes follow the header.
    """
    if len(buf) < HEADER_SIZE:
        raise PacketError(f"{len(buf)} bytes are shorter than a {HEADER_SIZE}-byte header")
    header = Header(*_HEADER.unpack_from(buf))
    if header.len > MAX_PKT_PAYLOAD:
        raise PacketError(f"len {header.len} exceeds the {MAX_PKT_PAYLOAD}-byte packet limit")
    if header.len > len(buf) - HEADER_SIZE:
        raise PacketError(f"len {header.len} is beyond the {len(buf) - HEADER_SIZE} bytes after the header")
    return header, bytes(buf[HEADER_SIZE : HEADER_SIZE + header.len])


def problem(header: Header) -> str | None:
    """What makes ``header`` invalid for a stream connection, or ``None`` if nothing does."""
    if header.type != VIRTIO_VSOCK_TYPE_STREAM:
        return f"unsupported socket type {header.type}"
    if not VIRTIO_VSOCK_OP_REQUEST <= header.op <= VIRTIO_VSOCK_OP_CREDIT_REQUEST:
        return f"unknown op {header.op}"
    if header.op != VIRTIO_VSOCK_OP_RW and header.len:
        return f"op {header.op} carries {header.len} payload bytes"
    if header.op == VIRTIO_VSOCK_OP_SHUTDOWN:
        if header.flags & ~VIRTIO_VSOCK_SHUTDOWN_MASK:
            return f"unknown SHUTDOWN flags {header.flags:#x}"
    elif header.flags:
        return f"flags {header.flags:#x} on op {header.op}"
    return None


def encode_event(event_id: int) -> bytes:
    """``struct virtio_vsock_event`` for the event queue."""
    return _EVENT.pack(event_id)
