"""vhost-user messages: wire identifiers, payload layouts and syntax validation.

Theory of operation
-------------------
Every vhost-user message is a 12-byte header (``request``, ``flags``, ``size``,
native byte order, which is little-endian on every host we run on) followed by
``size`` bytes of payload, with file descriptors in SCM_RIGHTS ancillary data.

This module knows, for each frontend request, what the payload must look like and
how many file descriptors may accompany it (:data:`REQUEST_SPECS`), and turns a raw
message into a typed payload (:func:`parse_payload`).  It checks *syntax* only:
sizes, counts, reserved bits.  What a request means is the backend's business.
Adding a request means one
entry in :data:`REQUEST_SPECS`, a payload class if it has a new layout, and a
handler in the backend's dispatch table.

Names are the ones of the vhost-user specification, verbatim.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Final, Protocol

__all__ = [
    "HEADER",
    "MAX_FDS",
    "MAX_PAYLOAD_SIZE",
    "REQUEST_SPECS",
    "U64",
    "VHOST_MEMORY_BASELINE_NREGIONS",
    "VHOST_SET_CONFIG_TYPE_FRONTEND",
    "VHOST_SET_CONFIG_TYPE_MIGRATION",
    "VHOST_TRANSFER_STATE_DIRECTION_LOAD",
    "VHOST_TRANSFER_STATE_DIRECTION_SAVE",
    "VHOST_TRANSFER_STATE_PHASE_STOPPED",
    "VHOST_USER_DEVICE_STATE_NOFD",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VHOST_USER_MAX_CONFIG_SIZE",
    "VHOST_USER_NEED_REPLY_MASK",
    "VHOST_USER_REPLY_MASK",
    "VHOST_USER_VERSION",
    "VHOST_USER_VERSION_MASK",
    "VHOST_USER_VRING_IDX_MASK",
    "VHOST_USER_VRING_NOFD_MASK",
    "DeviceConfig",
    "DeviceStateTransfer",
    "FrontendRequest",
    "Inflight",
    "MemoryRegionDescription",
    "MemoryTable",
    "Message",
    "MessageError",
    "Payload",
    "ProtocolFeature",
    "RequestSpec",
    "SingleMemoryRegion",
    "VringAddr",
    "VringFd",
    "VringState",
    "parse_payload",
]


class MessageError(Exception):
    """A vhost-user message is malformed (wrong size, wrong fds, unknown request, ...)."""


class FrontendRequest(enum.IntEnum):
    """Front-end message types (vhost-user spec, "Front-end message types")."""

    VHOST_USER_GET_FEATURES = 1
    VHOST_USER_SET_FEATURES = 2
    VHOST_USER_SET_OWNER = 3
    VHOST_USER_RESET_OWNER = 4
    VHOST_USER_SET_MEM_TABLE = 5
    VHOST_USER_SET_LOG_BASE = 6
    VHOST_USER_SET_LOG_FD = 7
    VHOST_USER_SET_VRING_NUM = 8
    VHOST_USER_SET_VRING_ADDR = 9
    VHOST_USER_SET_VRING_BASE = 10
    VHOST_USER_GET_VRING_BASE = 11
    VHOST_USER_SET_VRING_KICK = 12
    VHOST_USER_SET_VRING_CALL = 13
    VHOST_USER_SET_VRING_ERR = 14
    VHOST_USER_GET_PROTOCOL_FEATURES = 15
    VHOST_USER_SET_PROTOCOL_FEATURES = 16
    VHOST_USER_GET_QUEUE_NUM = 17
    VHOST_USER_SET_VRING_ENABLE = 18
    VHOST_USER_SEND_RARP = 19
    VHOST_USER_NET_SET_MTU = 20
    VHOST_USER_SET_BACKEND_REQ_FD = 21
    VHOST_USER_IOTLB_MSG = 22
    VHOST_USER_SET_VRING_ENDIAN = 23
    VHOST_USER_GET_CONFIG = 24
    VHOST_USER_SET_CONFIG = 25
    VHOST_USER_CREATE_CRYPTO_SESSION = 26
    VHOST_USER_CLOSE_CRYPTO_SESSION = 27
    VHOST_USER_POSTCOPY_ADVISE = 28
    VHOST_USER_POSTCOPY_LISTEN = 29
    VHOST_USER_POSTCOPY_END = 30
    VHOST_USER_GET_INFLIGHT_FD = 31
    VHOST_USER_SET_INFLIGHT_FD = 32
    VHOST_USER_GPU_SET_SOCKET = 33
    VHOST_USER_RESET_DEVICE = 34
    VHOST_USER_VRING_KICK = 35
    VHOST_USER_GET_MAX_MEM_SLOTS = 36
    VHOST_USER_ADD_MEM_REG = 37
    VHOST_USER_REM_MEM_REG = 38
    VHOST_USER_SET_STATUS = 39
    VHOST_USER_GET_STATUS = 40
    VHOST_USER_GET_SHARED_OBJECT = 41
    VHOST_USER_SET_DEVICE_STATE_FD = 42
    VHOST_USER_CHECK_DEVICE_STATE = 43


class ProtocolFeature(enum.IntEnum):
    """Protocol feature bit numbers (vhost-user spec, "Protocol features")."""

    VHOST_USER_PROTOCOL_F_MQ = 0
    VHOST_USER_PROTOCOL_F_LOG_SHMFD = 1
    VHOST_USER_PROTOCOL_F_RARP = 2
    VHOST_USER_PROTOCOL_F_REPLY_ACK = 3
    VHOST_USER_PROTOCOL_F_NET_MTU = 4
    VHOST_USER_PROTOCOL_F_BACKEND_REQ = 5
    VHOST_USER_PROTOCOL_F_CROSS_ENDIAN = 6
    VHOST_USER_PROTOCOL_F_CRYPTO_SESSION = 7
    VHOST_USER_PROTOCOL_F_PAGEFAULT = 8
    VHOST_USER_PROTOCOL_F_CONFIG = 9
    VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD = 10
    VHOST_USER_PROTOCOL_F_HOST_NOTIFIER = 11
    VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD = 12
    VHOST_USER_PROTOCOL_F_RESET_DEVICE = 13
    VHOST_USER_PROTOCOL_F_INBAND_NOTIFICATIONS = 14
    VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS = 15
    VHOST_USER_PROTOCOL_F_STATUS = 16
    VHOST_USER_PROTOCOL_F_XEN_MMAP = 17
    VHOST_USER_PROTOCOL_F_SHARED_OBJECT = 18
    VHOST_USER_PROTOCOL_F_DEVICE_STATE = 19


#: Feature bit (in GET/SET_FEATURES) announcing protocol-feature negotiation.
VHOST_USER_F_PROTOCOL_FEATURES: Final = 30

VHOST_USER_VERSION: Final = 0x1
VHOST_USER_VERSION_MASK: Final = 0x3
VHOST_USER_REPLY_MASK: Final = 0x1 << 2
VHOST_USER_NEED_REPLY_MASK: Final = 0x1 << 3
VHOST_USER_VRING_IDX_MASK: Final = 0xFF
VHOST_USER_VRING_NOFD_MASK: Final = 0x1 << 8

#: Regions a SET_MEM_TABLE message can carry.
VHOST_MEMORY_BASELINE_NREGIONS: Final = 8
#: The most file descriptors any message may carry; more is a protocol error.
MAX_FDS: Final = VHOST_MEMORY_BASELINE_NREGIONS
#: Largest payload we accept (the biggest fixed layout is the 8-region memory table).
MAX_PAYLOAD_SIZE: Final = 4096

HEADER: Final = struct.Struct("<III")

_KNOWN_FLAGS = VHOST_USER_VERSION_MASK | VHOST_USER_REPLY_MASK | VHOST_USER_NEED_REPLY_MASK


@dataclass(slots=True)
class Message:
    """One message as it travels: header fields, raw payload, received descriptors.

    ``fds`` are owned by the message's receiver, who must close them.
    """

    request: int
    flags: int = VHOST_USER_VERSION
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_NEED_REPLY_MASK)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_REPLY_MASK)

    @property
    def name(self) -> str:
        try:
            return FrontendRequest(self.request).name
        except ValueError:
            return f"request {self.request}"

    def header(self) -> bytes:
        return HEADER.pack(self.request, self.flags, len(self.payload))

    def encode(self) -> bytes:
        return self.header() + self.payload

    @staticmethod
    def check_header(request: int, flags: int, size: int) -> None:
        """Syntax checks that need only the header."""
        if flags & VHOST_USER_VERSION_MASK != VHOST_USER_VERSION:
            raise MessageError(f"request {request}: unsupported version {flags & 3} in flags")
        if flags & ~_KNOWN_FLAGS:
            raise MessageError(f"request {request}: unknown flag bits {flags & ~_KNOWN_FLAGS:#x}")
        if size > MAX_PAYLOAD_SIZE:
            raise MessageError(f"request {request}: payload of {size} bytes is too large")


class Payload(Protocol):
    """A typed payload: fixed or computed layout, ``decode``/``encode``."""

    def encode(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class U64:
    value: int
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<Q")

    @classmethod
    def decode(cls, data: bytes) -> U64:
        return cls(*cls.LAYOUT.unpack(data))

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.value)


@dataclass(frozen=True, slots=True)
class VringState:
    index: int
    num: int
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<II")

    @classmethod
    def decode(cls, data: bytes) -> VringState:
        return cls(*cls.LAYOUT.unpack(data))

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.index, self.num)


@dataclass(frozen=True, slots=True)
class VringAddr:
    """``struct vhost_vring_addr``: ring addresses are frontend (user) addresses."""

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<IIQQQQ")

    @classmethod
    def decode(cls, data: bytes) -> VringAddr:
        return cls(*cls.LAYOUT.unpack(data))

    def encode(self) -> bytes:
        return self.LAYOUT.pack(
            self.index,
            self.flags,
            self.desc_user_addr,
            self.used_user_addr,
            self.avail_user_addr,
            self.log_guest_addr,
        )


@dataclass(frozen=True, slots=True)
class VringFd:
    """The u64 of SET_VRING_KICK/CALL/ERR: ring index and the "no fd" flag."""

    index: int
    nofd: bool

    @classmethod
    def decode(cls, data: bytes) -> VringFd:
        (value,) = U64.LAYOUT.unpack(data)
        if value & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK):
            raise MessageError(f"reserved bits set in vring fd payload {value:#x}")
        return cls(value & VHOST_USER_VRING_IDX_MASK, bool(value & VHOST_USER_VRING_NOFD_MASK))

    def encode(self) -> bytes:
        return U64.LAYOUT.pack(self.index | (VHOST_USER_VRING_NOFD_MASK if self.nofd else 0))


@dataclass(frozen=True, slots=True)
class MemoryRegionDescription:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QQQQ")

    @classmethod
    def decode(cls, data: bytes) -> MemoryRegionDescription:
        region = cls(*cls.LAYOUT.unpack(data))
        if region.memory_size == 0:
            raise MessageError("memory region of size 0")
        for base in (region.guest_phys_addr, region.userspace_addr, region.mmap_offset):
            if base + region.memory_size > 1 << 64:
                raise MessageError("memory region overflows the 64-bit address space")
        return region

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset)


@dataclass(frozen=True, slots=True)
class MemoryTable:
    """``VhostUserMemory``: up to 8 regions, one fd each, in the same order."""

    regions: tuple[MemoryRegionDescription, ...]
    PREFIX: ClassVar[struct.Struct] = struct.Struct("<II")

    @classmethod
    def decode(cls, data: bytes) -> MemoryTable:
        if len(data) < cls.PREFIX.size:
            raise MessageError("memory table payload shorter than its header")
        nregions, _padding = cls.PREFIX.unpack_from(data)
        if not 1 <= nregions <= VHOST_MEMORY_BASELINE_NREGIONS:
            raise MessageError(f"memory table with {nregions} regions (1..8 allowed)")
        size = MemoryRegionDescription.LAYOUT.size
        # QEMU sends the full 8-slot array; accept exactly-sized tables too.
        if len(data) not in (cls.PREFIX.size + size * nregions, cls.PREFIX.size + size * 8):
            raise MessageError(f"memory table of {len(data)} bytes does not match its {nregions} regions")
        regions = tuple(
            MemoryRegionDescription.decode(data[cls.PREFIX.size + i * size :][:size]) for i in range(nregions)
        )
        return cls(regions)

    def encode(self) -> bytes:
        return self.PREFIX.pack(len(self.regions), 0) + b"".join(r.encode() for r in self.regions)


@dataclass(frozen=True, slots=True)
class SingleMemoryRegion:
    """ADD_MEM_REG / REM_MEM_REG payload: 8 bytes of padding, then one region."""

    region: MemoryRegionDescription

    @classmethod
    def decode(cls, data: bytes) -> SingleMemoryRegion:
        return cls(MemoryRegionDescription.decode(data[8:]))

    def encode(self) -> bytes:
        return bytes(8) + self.region.encode()


@dataclass(frozen=True, slots=True)
class Inflight:
    """``VhostUserInflight``: the shared region that tracks inflight descriptors.

    The C structure is naturally aligned, so it travels as 24 bytes (4 of padding).
    """

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QQHH4x")

    @classmethod
    def decode(cls, data: bytes) -> Inflight:
        if len(data) == cls.LAYOUT.size - 4:  # a packed sender; same fields
            data = data + bytes(4)
        if len(data) != cls.LAYOUT.size:
            raise MessageError(f"inflight description of {len(data)} bytes (24 expected)")
        return cls(*cls.LAYOUT.unpack(data))

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)


#: ``transfer direction`` of SET_DEVICE_STATE_FD.
VHOST_TRANSFER_STATE_DIRECTION_SAVE: Final = 0
VHOST_TRANSFER_STATE_DIRECTION_LOAD: Final = 1
#: ``migration phase`` of SET_DEVICE_STATE_FD (the only one defined).
VHOST_TRANSFER_STATE_PHASE_STOPPED: Final = 0
#: Reply bits of SET_DEVICE_STATE_FD: bits 0-7 are an error code, bit 8 "no fd returned".
VHOST_USER_DEVICE_STATE_NOFD: Final = 0x1 << 8


@dataclass(frozen=True, slots=True)
class DeviceStateTransfer:
    """Device state transfer parameters: direction (save/load) and migration phase."""

    direction: int
    phase: int
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<II")

    @classmethod
    def decode(cls, data: bytes) -> DeviceStateTransfer:
        return cls(*cls.LAYOUT.unpack(data))

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.direction, self.phase)


#: Largest configuration space a GET_CONFIG/SET_CONFIG message carries.
VHOST_USER_MAX_CONFIG_SIZE: Final = 256
#: ``flags`` of SET_CONFIG: written by the driver, or restored on migration.
VHOST_SET_CONFIG_TYPE_FRONTEND: Final = 0
VHOST_SET_CONFIG_TYPE_MIGRATION: Final = 1


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """``VhostUserConfig``: a range of the device configuration space.

    ``offset``, ``size`` and ``flags``, then ``size`` bytes (what was read, or is to
    be written); a reply with size 0 and no data reports a failed GET_CONFIG.
    """

    offset: int
    size: int
    flags: int
    data: bytes
    HEADER: ClassVar[struct.Struct] = struct.Struct("<III")

    @classmethod
    def decode(cls, data: bytes) -> DeviceConfig:
        if len(data) < cls.HEADER.size:
            raise MessageError(f"config payload of {len(data)} bytes is shorter than its header")
        offset, size, flags = cls.HEADER.unpack_from(data)
        if size > VHOST_USER_MAX_CONFIG_SIZE:
            raise MessageError(f"config access of {size} bytes (at most {VHOST_USER_MAX_CONFIG_SIZE})")
        if len(data) != cls.HEADER.size + size:
            raise MessageError(f"config payload of {len(data)} bytes for {size} bytes of config")
        return cls(offset, size, flags, data[cls.HEADER.size :])

    def encode(self) -> bytes:
        return self.HEADER.pack(self.offset, self.size, self.flags) + self.data


@dataclass(frozen=True, slots=True)
class Empty:
    @classmethod
    def decode(cls, data: bytes) -> Empty:
        return cls()

    def encode(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """What a request's payload and ancillary data must look like."""

    decode: Callable[[bytes], Payload]
    #: Exact payload size, or ``None`` when ``decode`` checks it.
    size: int | None
    min_fds: int = 0
    max_fds: int = 0


_R = FrontendRequest
_U64_SPEC = RequestSpec(U64.decode, 8)
_EMPTY_SPEC = RequestSpec(Empty.decode, 0)
_STATE_SPEC = RequestSpec(VringState.decode, 8)
_FD_SPEC = RequestSpec(VringFd.decode, 8, 0, 1)

#: Syntax of every request this package understands.  Requests missing here are
#: refused as unknown, before any handler runs.
REQUEST_SPECS: Final[dict[int, RequestSpec]] = {
    _R.VHOST_USER_GET_FEATURES: _EMPTY_SPEC,
    _R.VHOST_USER_SET_FEATURES: _U64_SPEC,
    _R.VHOST_USER_SET_OWNER: _EMPTY_SPEC,
    _R.VHOST_USER_RESET_OWNER: _EMPTY_SPEC,
    _R.VHOST_USER_SET_MEM_TABLE: RequestSpec(MemoryTable.decode, None, 1, MAX_FDS),
    _R.VHOST_USER_SET_VRING_NUM: _STATE_SPEC,
    _R.VHOST_USER_SET_VRING_ADDR: RequestSpec(VringAddr.decode, VringAddr.LAYOUT.size),
    _R.VHOST_USER_SET_VRING_BASE: _STATE_SPEC,
    _R.VHOST_USER_GET_VRING_BASE: _STATE_SPEC,
    _R.VHOST_USER_SET_VRING_KICK: _FD_SPEC,
    _R.VHOST_USER_SET_VRING_CALL: _FD_SPEC,
    _R.VHOST_USER_SET_VRING_ERR: _FD_SPEC,
    _R.VHOST_USER_GET_PROTOCOL_FEATURES: _EMPTY_SPEC,
    _R.VHOST_USER_SET_PROTOCOL_FEATURES: _U64_SPEC,
    _R.VHOST_USER_GET_QUEUE_NUM: _EMPTY_SPEC,
    _R.VHOST_USER_SET_VRING_ENABLE: _STATE_SPEC,
    _R.VHOST_USER_RESET_DEVICE: _EMPTY_SPEC,
    _R.VHOST_USER_GET_MAX_MEM_SLOTS: _EMPTY_SPEC,
    _R.VHOST_USER_ADD_MEM_REG: RequestSpec(SingleMemoryRegion.decode, 40, 1, 1),
    # The spec tolerates (and says to close) one stray fd on REM_MEM_REG.
    _R.VHOST_USER_REM_MEM_REG: RequestSpec(SingleMemoryRegion.decode, 40, 0, 1),
    _R.VHOST_USER_SET_STATUS: _U64_SPEC,
    _R.VHOST_USER_GET_STATUS: _EMPTY_SPEC,
    _R.VHOST_USER_GET_INFLIGHT_FD: RequestSpec(Inflight.decode, None),
    _R.VHOST_USER_SET_INFLIGHT_FD: RequestSpec(Inflight.decode, None, 1, 1),
    _R.VHOST_USER_SET_DEVICE_STATE_FD: RequestSpec(
        DeviceStateTransfer.decode, DeviceStateTransfer.LAYOUT.size, 1, 1
    ),
    _R.VHOST_USER_CHECK_DEVICE_STATE: _EMPTY_SPEC,
    _R.VHOST_USER_GET_CONFIG: RequestSpec(DeviceConfig.decode, None),
    _R.VHOST_USER_SET_CONFIG: RequestSpec(DeviceConfig.decode, None),
}


def parse_payload(message: Message) -> Payload:
    """Check a received message's syntax and decode its payload.

    Raises :class:`MessageError` for unknown requests, reply-flagged requests,
    wrong payload sizes, wrong numbers of file descriptors and reserved bits.
    """
    spec = REQUEST_SPECS.get(message.request)
    if spec is None:
        raise MessageError(f"unknown or unsupported request {message.name}")
    if message.is_reply:
        raise MessageError(f"{message.name} carries the reply flag")
    if spec.size is not None and len(message.payload) != spec.size:
        raise MessageError(f"{message.name}: payload of {len(message.payload)} bytes, expected {spec.size}")
    if not spec.min_fds <= len(message.fds) <= spec.max_fds:
        raise MessageError(
            f"{message.name}: {len(message.fds)} file descriptors, expected {spec.min_fds}..{spec.max_fds}"
        )
    try:
        payload = spec.decode(message.payload)
    except struct.error as exc:
        raise MessageError(f"{message.name}: malformed payload: {exc}") from exc
    if isinstance(payload, MemoryTable) and len(payload.regions) != len(message.fds):
        raise MessageError(f"{message.name}: {len(payload.regions)} regions but {len(message.fds)} fds")
    if isinstance(payload, VringFd) and len(message.fds) != (0 if payload.nofd else 1):
        raise MessageError(
            f"{message.name}: {len(message.fds)} fds with the no-fd flag {'set' if payload.nofd else 'clear'}"
        )
    return payload
