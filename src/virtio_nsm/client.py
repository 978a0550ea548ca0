"""A client for NSM devices, over any transport.

A transport moves one request's bytes to a device and brings back the
response's bytes; :class:`Nsm` encodes requests exactly as the AWS client does
and checks answers with the AWS client's rules. Transports:

- :class:`LocalTransport`: an in-process :class:`~virtio_nsm.NsmDevice`;
- :class:`DevNsmTransport`: ``/dev/nsm`` of Linux's ``nsm.ko`` (the ``NSM_IOCTL_RAW`` ioctl);
- ``VhostUserTransport`` (:mod:`virtio_nsm.vhost_user.frontend`): a Python virtio
  driver talking to any vhost-user NSM backend.

:meth:`Nsm.open` picks one from a device string: ``/dev/nsm`` (or any path),
``vhost-user:SOCKET``, or ``local`` (a throwaway in-process device).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from types import TracebackType
from typing import Final, Protocol, TypeVar

from .errors import DeviceNotFoundError, ErrorCode, NsmError, TransportError
from .nsm import protocol
from .nsm.device import NsmDevice
from .nsm.protocol import (
    MAX_RESPONSE_SIZE,
    Attestation,
    AttestationResponse,
    DescribeNSM,
    DescribeNSMResponse,
    DescribePCR,
    DescribePCRResponse,
    ErrorResponse,
    ExtendPCR,
    ExtendPCRResponse,
    GetRandom,
    GetRandomResponse,
    LockPCR,
    LockPCRResponse,
    LockPCRs,
    LockPCRsResponse,
    Request,
    Response,
)

#: What ``describe_pcr`` returns: ``lock`` (bool) and ``data`` (the PCR value).
PcrDescription = DescribePCRResponse
#: What ``describe_nsm`` returns.
NsmDescription = DescribeNSMResponse

#: Environment variable naming the default device.
DEVICE_ENV: Final = "NSM_DEVICE"
DEFAULT_DEVICE: Final = "/dev/nsm"
VHOST_USER_PREFIX: Final = "vhost-user:"
LOCAL_DEVICE: Final = "local"


class Transport(Protocol):
    """Carries one request to a device and returns the device's response bytes."""

    def exchange(self, request: bytes) -> bytes: ...

    def close(self) -> None: ...


class LocalTransport:
    """An in-process device."""

    def __init__(self, device: NsmDevice | None = None) -> None:
        self.device = device if device is not None else NsmDevice()

    def exchange(self, request: bytes) -> bytes:
        return self.device.handle(request)

    def close(self) -> None:
        pass


# -- /dev/nsm ----------------------------------------------------------------

_IOC_WRITE: Final = 1
_IOC_READ: Final = 2


def _iowr(type_: int, nr: int, size: int) -> int:
    """Linux's ``_IOWR(type, nr, size)`` (generic ioctl encoding)."""
    return ((_IOC_READ | _IOC_WRITE) << 30) | (size << 16) | (type_ << 8) | nr


#: ``struct nsm_raw { struct nsm_iovec request, response; }``, each ``{u64 addr; u64 len;}``.
NSM_RAW: Final = struct.Struct("=QQQQ")
#: ``NSM_IOCTL_RAW = _IOWR(0x0A, 0, struct nsm_raw)``.
NSM_IOCTL_RAW: Final = _iowr(0x0A, 0, NSM_RAW.size)


def pack_nsm_raw(request_addr: int, request_len: int, response_addr: int, response_len: int) -> bytes:
    return NSM_RAW.pack(request_addr, request_len, response_addr, response_len)


def unpack_nsm_raw(raw: bytes | bytearray) -> tuple[int, int, int, int]:
    addr_in, len_in, addr_out, len_out = NSM_RAW.unpack(raw)
    return addr_in, len_in, addr_out, len_out


class DevNsmTransport:
    """``/dev/nsm``: one ``NSM_IOCTL_RAW`` ioctl per request."""

    def __init__(self, path: str = DEFAULT_DEVICE) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise DeviceNotFoundError(
                errno.ENOENT,
                f"no NSM device at {path}: run inside a Nitro enclave or a guest with nsm.ko, "
                "or start a backend with `nsm serve` and use --device vhost-user:SOCKET "
                "(or --device local for a throwaway in-process device)",
            ) from None
        except OSError as exc:
            raise TransportError(exc.errno, f"cannot open {path}: {exc.strerror}") from None
        self._response = ctypes.create_string_buffer(MAX_RESPONSE_SIZE)

    def exchange(self, request: bytes) -> bytes:
        if self._fd < 0:
            raise TransportError(errno.EBADF, f"{self.path} is closed")
        req = ctypes.create_string_buffer(request, max(len(request), 1))
        raw = bytearray(pack_nsm_raw(ctypes.addressof(req), len(request),
                                     ctypes.addressof(self._response), MAX_RESPONSE_SIZE))
        try:
            fcntl.ioctl(self._fd, NSM_IOCTL_RAW, raw, True)
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                raise NsmError(ErrorCode.InputTooLarge, "the kernel refused the request size") from None
            raise TransportError(exc.errno, f"NSM ioctl on {self.path} failed: {exc.strerror}") from None
        length = unpack_nsm_raw(raw)[3]
        if length > MAX_RESPONSE_SIZE:
            raise NsmError(ErrorCode.InvalidResponse, f"response length {length} is out of range")
        return self._response.raw[:length]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def open_transport(device: str | None = None) -> Transport:
    """A transport for a device string (default: ``$NSM_DEVICE``, else ``/dev/nsm``)."""
    spec = device or os.environ.get(DEVICE_ENV) or DEFAULT_DEVICE
    if spec == LOCAL_DEVICE:
        return LocalTransport()
    if spec.startswith(VHOST_USER_PREFIX):
        from .nsm.frontend import VhostUserTransport

        return VhostUserTransport(spec[len(VHOST_USER_PREFIX):])
    return DevNsmTransport(spec)


# -- the client ----------------------------------------------------------------

_R = TypeVar("_R", bound=Response)


class Nsm:
    """An NSM client. Error answers raise :class:`NsmError` with their ErrorCode.

    >>> with Nsm.open("local") as nsm:
    ...     len(nsm.get_random())
    256
    """

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    @classmethod
    def open(cls, device: str | None = None) -> Nsm:
        return cls(open_transport(device))

    @classmethod
    def local(cls, device: NsmDevice | None = None) -> Nsm:
        return cls(LocalTransport(device))

    def __enter__(self) -> Nsm:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.transport.close()

    def request(self, request: Request) -> Response:
        """Send one typed request; return the typed answer (errors are returned, not raised)."""
        return protocol.decode_response(self.transport.exchange(protocol.encode_request(request)))

    def _call(self, request: Request, expected: type[_R]) -> _R:
        response = self.request(request)
        if isinstance(response, ErrorResponse):
            raise NsmError(response.code)
        if not isinstance(response, expected):
            raise NsmError(ErrorCode.InvalidResponse,
                           f"expected {expected.__name__}, got {type(response).__name__}")
        return response

    def describe_pcr(self, index: int) -> PcrDescription:
        return self._call(DescribePCR(_u16(index)), DescribePCRResponse)

    def extend_pcr(self, index: int, data: bytes) -> bytes:
        """Extend PCR ``index`` with ``data``; return the new value."""
        return self._call(ExtendPCR(_u16(index), bytes(data)), ExtendPCRResponse).data

    def lock_pcr(self, index: int) -> None:
        self._call(LockPCR(_u16(index)), LockPCRResponse)

    def lock_pcrs(self, range: int) -> None:
        """Lock PCRs ``0 .. range-1``."""
        self._call(LockPCRs(_u16(range)), LockPCRsResponse)

    def describe_nsm(self) -> NsmDescription:
        return self._call(DescribeNSM(), DescribeNSMResponse)

    def attestation(self, user_data: bytes | None = None, nonce: bytes | None = None,
                    public_key: bytes | None = None) -> bytes:
        """A signed attestation document (COSE_Sign1 bytes)."""
        return self._call(Attestation(user_data, nonce, public_key), AttestationResponse).document

    def get_random(self) -> bytes:
        return self._call(GetRandom(), GetRandomResponse).random


def _u16(value: int) -> int:
    if type(value) is not int or not 0 <= value <= 0xFFFF:
        raise ValueError(f"{value!r} is not a u16 PCR index/range")
    return value
