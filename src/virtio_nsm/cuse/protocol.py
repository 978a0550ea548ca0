"""The FUSE wire protocol as CUSE speaks it over ``/dev/cuse``: bytes in, typed messages out.

Sans-IO: :func:`parse_request` turns one message the kernel wrote (one
``read`` of ``/dev/cuse``) into a typed request; the ``reply_*`` functions
build the bytes to ``write`` back. Nothing here opens a file.

Layouts (Linux ``include/uapi/linux/fuse.h``, little-endian, 64-bit aligned):

* ``fuse_in_header``  {u32 len; u32 opcode; u64 unique; u64 nodeid; u32 uid;
  u32 gid; u32 pid; u16 total_extlen; u16 padding} = 40 bytes, then the
  opcode's argument;
* ``fuse_out_header`` {u32 len; s32 error; u64 unique} = 16 bytes, then the
  reply's argument (none when ``error`` is a negative errno);
* ``cuse_init_in`` {u32 major, minor, unused, flags}; ``cuse_init_out``
  {u32 major, minor, unused, flags, max_read, max_write, dev_major, dev_minor,
  spare[10]} followed by the device info, ``KEY=VALUE\\0`` strings
  (``DEVNAME=<name>``), at most 4096 bytes in all;
* ``fuse_ioctl_in`` {u64 fh; u32 flags; u32 cmd; u64 arg; u32 in_size;
  u32 out_size} followed by ``in_size`` bytes; ``fuse_ioctl_out`` {s32 result;
  u32 flags; u32 in_iovs; u32 out_iovs} followed by either the output bytes or,
  with ``FUSE_IOCTL_RETRY``, ``in_iovs + out_iovs`` ``fuse_ioctl_iovec``
  {u64 base; u64 len}.

Every length is checked against the bytes actually read: a short message, a
header length that disagrees with the read, or an argument longer than what
follows raises :class:`ProtocolError` (with the request's ``unique`` when the
header itself was readable, so the caller can still answer it with an error).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

# --------------------------------------------------------------------------- constants

FUSE_KERNEL_VERSION: Final = 7
#: The protocol minor we speak (we answer ``min(kernel's, ours)``). The kernel
#: needs >= 11 for CUSE; the ``fuse_ioctl_iovec`` retry format needs >= 16.
FUSE_OUR_MINOR: Final = 31
FUSE_MIN_MINOR: Final = 16

# opcodes (the subset a CUSE channel can carry, plus those that take no reply)
FUSE_FORGET: Final = 2
FUSE_OPEN: Final = 14
FUSE_READ: Final = 15
FUSE_WRITE: Final = 16
FUSE_RELEASE: Final = 18
FUSE_FSYNC: Final = 20
FUSE_FLUSH: Final = 25
FUSE_INIT: Final = 26
FUSE_INTERRUPT: Final = 36
FUSE_DESTROY: Final = 38
FUSE_IOCTL: Final = 39
FUSE_POLL: Final = 40
FUSE_NOTIFY_REPLY: Final = 41
FUSE_BATCH_FORGET: Final = 42
CUSE_INIT: Final = 4096

#: Opcodes the kernel expects no reply to.
NO_REPLY_OPCODES: Final = frozenset({FUSE_FORGET, FUSE_INTERRUPT, FUSE_NOTIFY_REPLY,
                                     FUSE_BATCH_FORGET})

CUSE_UNRESTRICTED_IOCTL: Final = 1 << 0

FUSE_IOCTL_COMPAT: Final = 1 << 0
FUSE_IOCTL_UNRESTRICTED: Final = 1 << 1
FUSE_IOCTL_RETRY: Final = 1 << 2
FUSE_IOCTL_32BIT: Final = 1 << 3
FUSE_IOCTL_DIR: Final = 1 << 4
FUSE_IOCTL_MAX_IOV: Final = 256

FOPEN_DIRECT_IO: Final = 1 << 0

#: The kernel refuses a read buffer smaller than this.
FUSE_MIN_READ_BUFFER: Final = 8192
#: Room for the device info strings in the CUSE_INIT reply.
CUSE_INIT_INFO_MAX: Final = 4096

# --------------------------------------------------------------------------- layouts

IN_HEADER: Final = struct.Struct("<IIQQIIIHH")
OUT_HEADER: Final = struct.Struct("<IiQ")
CUSE_INIT_IN: Final = struct.Struct("<IIII")
CUSE_INIT_OUT: Final = struct.Struct("<IIIIIIII40x")
OPEN_IN: Final = struct.Struct("<II")
OPEN_OUT: Final = struct.Struct("<QII")
RELEASE_IN: Final = struct.Struct("<QIIQ")
READ_IN: Final = struct.Struct("<QQIIQII")  # fh, offset, size, read_flags, lock_owner, flags, pad
WRITE_IN: Final = struct.Struct("<QQIIQII")  # fh, offset, size, write_flags, lock_owner, flags, pad
INTERRUPT_IN: Final = struct.Struct("<Q")
IOCTL_IN: Final = struct.Struct("<QIIQII")
IOCTL_OUT: Final = struct.Struct("<iIII")
IOVEC: Final = struct.Struct("<QQ")

_U32_MAX: Final = 0xFFFF_FFFF


class ProtocolError(ValueError):
    """A message that does not parse. ``unique`` is set when its header did."""

    def __init__(self, message: str, unique: int | None = None, opcode: int | None = None) -> None:
        super().__init__(message)
        self.unique = unique
        self.opcode = opcode


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class Header:
    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int


@dataclass(frozen=True, slots=True)
class CuseInit:
    header: Header
    major: int
    minor: int
    flags: int


@dataclass(frozen=True, slots=True)
class Open:
    header: Header
    flags: int


@dataclass(frozen=True, slots=True)
class Release:
    header: Header
    fh: int
    flags: int


@dataclass(frozen=True, slots=True)
class Read:
    header: Header
    fh: int
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class Write:
    header: Header
    fh: int
    offset: int
    size: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Ioctl:
    header: Header
    fh: int
    flags: int
    cmd: int
    arg: int
    in_size: int
    out_size: int
    data: bytes
    """the ``in_size`` bytes the kernel copied from the caller's in iovecs"""


@dataclass(frozen=True, slots=True)
class Interrupt:
    header: Header
    target: int
    """``unique`` of the interrupted request"""


@dataclass(frozen=True, slots=True)
class Other:
    """Any other opcode (POLL, FLUSH, DESTROY, FORGET, unknown ones): header and raw argument."""

    header: Header
    body: bytes


Request = CuseInit | Open | Release | Read | Write | Ioctl | Interrupt | Other


def _need(body: memoryview, layout: struct.Struct, what: str, header: Header) -> None:
    if len(body) < layout.size:
        raise ProtocolError(f"{what}: {len(body)} argument bytes, {layout.size} needed",
                            header.unique, header.opcode)


def parse_header(message: bytes | bytearray | memoryview) -> Header:
    """The ``fuse_in_header`` of one message; its length must match the message exactly."""
    if len(message) < IN_HEADER.size:
        raise ProtocolError(f"short message: {len(message)} bytes, a header is {IN_HEADER.size}")
    length, opcode, unique, nodeid, uid, gid, pid, _extlen, _pad = IN_HEADER.unpack_from(message)
    header = Header(length, opcode, unique, nodeid, uid, gid, pid)
    if length != len(message):
        raise ProtocolError(f"header says {length} bytes, the read returned {len(message)}",
                            unique, opcode)
    return header


def parse_request(message: bytes | bytearray | memoryview) -> Request:
    """Decode one message read from ``/dev/cuse``; raises :class:`ProtocolError`."""
    view = memoryview(message).cast("B") if not isinstance(message, memoryview) else message
    header = parse_header(view)
    body = view[IN_HEADER.size:]
    op = header.opcode
    if op == FUSE_IOCTL:
        _need(body, IOCTL_IN, "FUSE_IOCTL", header)
        fh, flags, cmd, arg, in_size, out_size = IOCTL_IN.unpack_from(body)
        data = body[IOCTL_IN.size:]
        if len(data) != in_size:
            raise ProtocolError(f"FUSE_IOCTL: in_size {in_size} but {len(data)} bytes follow",
                                header.unique, op)
        return Ioctl(header, fh, flags, cmd, arg, in_size, out_size, bytes(data))
    if op == CUSE_INIT:
        _need(body, CUSE_INIT_IN, "CUSE_INIT", header)
        major, minor, _unused, flags = CUSE_INIT_IN.unpack_from(body)
        return CuseInit(header, major, minor, flags)
    if op == FUSE_OPEN:
        _need(body, OPEN_IN, "FUSE_OPEN", header)
        return Open(header, OPEN_IN.unpack_from(body)[0])
    if op == FUSE_RELEASE:
        _need(body, RELEASE_IN, "FUSE_RELEASE", header)
        fh, flags, _release_flags, _owner = RELEASE_IN.unpack_from(body)
        return Release(header, fh, flags)
    if op == FUSE_READ:
        _need(body, READ_IN, "FUSE_READ", header)
        fh, offset, size, *_ = READ_IN.unpack_from(body)
        return Read(header, fh, offset, size)
    if op == FUSE_WRITE:
        _need(body, WRITE_IN, "FUSE_WRITE", header)
        fh, offset, size, *_ = WRITE_IN.unpack_from(body)
        data = body[WRITE_IN.size:]
        if len(data) != size:
            raise ProtocolError(f"FUSE_WRITE: size {size} but {len(data)} bytes follow",
                                header.unique, op)
        return Write(header, fh, offset, size, bytes(data))
    if op == FUSE_INTERRUPT:
        _need(body, INTERRUPT_IN, "FUSE_INTERRUPT", header)
        return Interrupt(header, INTERRUPT_IN.unpack_from(body)[0])
    return Other(header, bytes(body))


# --------------------------------------------------------------------------- replies


def reply(unique: int, payload: bytes = b"") -> bytes:
    """A successful reply carrying ``payload``."""
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique) + payload


def reply_error(unique: int, err: int) -> bytes:
    """An error reply: ``err`` is a positive errno number, sent negated."""
    if not 0 < err < 4096:
        raise ValueError(f"not an errno: {err}")
    return OUT_HEADER.pack(OUT_HEADER.size, -err, unique)


def device_info(name: str) -> bytes:
    """The CUSE device info strings for a device called ``name`` (``/dev/<name>``)."""
    check_device_name(name)
    info = f"DEVNAME={name}".encode() + b"\0"
    if len(info) > CUSE_INIT_INFO_MAX:
        raise ValueError("device info too long")
    return info


def check_device_name(name: str) -> None:
    """A name the kernel and devtmpfs take as one plain file under /dev; raises ValueError."""
    if not name or len(name) > 64 or name in (".", "..") or name.startswith(".") or not all(
            c.isascii() and (c.isalnum() or c in "._-") for c in name):
        raise ValueError(f"invalid device name {name!r}: use 1-64 of A-Z a-z 0-9 . _ - "
                         "(not starting with a dot)")


def reply_cuse_init(unique: int, minor: int, name: str, *, max_read: int = 4096,
                    max_write: int = 4096, flags: int = CUSE_UNRESTRICTED_IOCTL,
                    dev_major: int = 0, dev_minor: int = 0) -> bytes:
    """The CUSE_INIT reply: protocol 7.``minor``, limits, flags and ``DEVNAME=name``.

    ``dev_major`` 0 lets the kernel pick a free major."""
    body = CUSE_INIT_OUT.pack(FUSE_KERNEL_VERSION, minor, 0, flags, max_read, max_write,
                              dev_major, dev_minor)
    return reply(unique, body + device_info(name))


def reply_open(unique: int, fh: int, open_flags: int = FOPEN_DIRECT_IO) -> bytes:
    return reply(unique, OPEN_OUT.pack(fh, open_flags, 0))


def reply_ioctl(unique: int, result: int, data: bytes = b"") -> bytes:
    """The ioctl's final answer: its return value and the bytes for the out iovecs."""
    return reply(unique, IOCTL_OUT.pack(result, 0, 0, 0) + data)


def reply_ioctl_retry(unique: int, in_iovs: list[tuple[int, int]],
                      out_iovs: list[tuple[int, int]], *, compat: bool = False) -> bytes:
    """Ask the kernel to call again with these caller memory ranges copied in and out."""
    if len(in_iovs) + len(out_iovs) > FUSE_IOCTL_MAX_IOV:
        raise ValueError("too many iovecs")
    limit = _U32_MAX if compat else 0xFFFF_FFFF_FFFF_FFFF
    for base, length in (*in_iovs, *out_iovs):
        if not (0 <= base <= limit and 0 <= length <= limit):
            raise ValueError(f"iovec ({base:#x}, {length:#x}) out of range")
    iovs = b"".join(IOVEC.pack(b, n) for b, n in (*in_iovs, *out_iovs))
    return reply(unique, IOCTL_OUT.pack(0, FUSE_IOCTL_RETRY, len(in_iovs), len(out_iovs)) + iovs)

