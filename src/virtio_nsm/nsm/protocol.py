"""NSM wire protocol: typed requests and responses and their CBOR form.

Theory of operation
-------------------
Every NSM message is one CBOR item. Requests and responses are Rust enums
serialised by serde_cbor: a unit variant is a bare text string
(``"DescribeNSM"``), a struct variant a one-entry map from the variant name to
a map of fields (``{"DescribePCR": {"index": 0}}``). Errors are
``{"Error": "<ErrorCode name>"}``.

Decoding a request follows the real device (facts sheet §2): anything that is
not one of the seven request forms is ``InvalidOperation`` -- broken CBOR,
trailing bytes, unknown names, extra top-level entries, missing or mistyped
fields, integers that do not fit a u16. Unknown fields inside the inner map
are ignored. Range checks against the PCR bank (``InvalidIndex``) belong to the
device, not to the codec.

Encoding is byte-exact with serde_cbor: shortest heads, definite lengths,
fields in declaration order. Responses are assembled from precomputed
fragments, so the exact bytes are visible here rather than left to a generic
encoder.

Decoding a response follows the AWS client: the outer map must be exactly a
one-entry map, nothing may follow the item, unknown names are rejected, inner
fields may come in any order and unknown inner fields are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from .. import _strict_cbor, cbor
from .._strict_cbor import shown
from ..errors import ErrorCode, NsmError

#: Largest request the device accepts (the request buffer of the spec).
MAX_REQUEST_SIZE: Final = 0x1000
#: Size of the response buffer; no response is ever longer.
MAX_RESPONSE_SIZE: Final = 0x3000
#: Largest value of a u16 field.
_U16_MAX: Final = 0xFFFF


class RequestRejected(Exception):
    """A request cannot be decoded; ``code`` is the error the device answers."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"{code.name}: {reason}")


# --------------------------------------------------------------------------
# Requests


@dataclass(frozen=True, slots=True)
class DescribePCR:
    index: int


@dataclass(frozen=True, slots=True)
class ExtendPCR:
    index: int
    data: bytes


@dataclass(frozen=True, slots=True)
class LockPCR:
    index: int


@dataclass(frozen=True, slots=True)
class LockPCRs:
    range: int


@dataclass(frozen=True, slots=True)
class DescribeNSM:
    pass


@dataclass(frozen=True, slots=True)
class Attestation:
    user_data: bytes | None = None
    nonce: bytes | None = None
    public_key: bytes | None = None


@dataclass(frozen=True, slots=True)
class GetRandom:
    pass


Request = DescribePCR | ExtendPCR | LockPCR | LockPCRs | DescribeNSM | Attestation | GetRandom


# --------------------------------------------------------------------------
# Responses


@dataclass(frozen=True, slots=True)
class DescribePCRResponse:
    lock: bool
    data: bytes


@dataclass(frozen=True, slots=True)
class ExtendPCRResponse:
    data: bytes


@dataclass(frozen=True, slots=True)
class LockPCRResponse:
    pass


@dataclass(frozen=True, slots=True)
class LockPCRsResponse:
    pass


@dataclass(frozen=True, slots=True)
class DescribeNSMResponse:
    version_major: int
    version_minor: int
    version_patch: int
    module_id: str
    max_pcrs: int
    locked_pcrs: tuple[int, ...]
    digest: str


@dataclass(frozen=True, slots=True)
class AttestationResponse:
    document: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class GetRandomResponse:
    random: bytes


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    code: ErrorCode


Response = (
    DescribePCRResponse
    | ExtendPCRResponse
    | LockPCRResponse
    | LockPCRsResponse
    | DescribeNSMResponse
    | AttestationResponse
    | GetRandomResponse
    | ErrorResponse
)

#: Digest names a DescribeNSM response may carry.
DIGEST_NAMES: Final = ("SHA256", "SHA384", "SHA512")

# --------------------------------------------------------------------------
# Decoding requests

_DESCRIBE_PCR_PREFIX: Final = b"\xa1" + cbor.tstr("DescribePCR") + b"\xa1" + cbor.tstr("index")


#: Nesting the decoder accepts: NSM messages nest three levels; the rest is
#: headroom for unknown (ignored) inner fields.
MAX_DEPTH: Final = 64


def load_exact(data: bytes) -> Any:
    """Decode exactly one CBOR item that spans all of ``data``.

    Uses the strict reader (:mod:`virtio_nsm._strict_cbor`): no tag is
    accepted -- no NSM message uses one, and tags 28/29 (shared references)
    would let a few hundred bytes build an exponential structure -- nor a
    duplicate map key (serde_cbor refuses duplicate struct fields). The cost is
    linear in ``len(data)``. ``undefined`` and unassigned simple values decode
    to :class:`~virtio_nsm._strict_cbor.Simple`, a type no field accepts.
    Raises ``ValueError`` with a short message.
    """
    try:
        return _strict_cbor.loads(data, max_depth=MAX_DEPTH, allow_simple=True)
    except _strict_cbor.TrailingBytes as exc:
        raise ValueError(f"{exc.count} bytes after the CBOR item") from None
    except _strict_cbor.StrictCborError as exc:
        raise ValueError(f"invalid CBOR: {exc}") from None
    except RecursionError:  # not reachable with MAX_DEPTH; fail closed all the same
        raise ValueError("invalid CBOR: nested too deeply") from None


def _invalid(reason: str) -> RequestRejected:
    return RequestRejected(ErrorCode.InvalidOperation, reason)


def _u16(fields: Mapping[Any, Any], name: str, variant: str) -> int:
    if name not in fields:
        raise _invalid(f"{variant}: missing field {name!r}")
    value = fields[name]
    if type(value) is not int:
        raise _invalid(f"{variant}.{name}: expected an integer, got {type(value).__name__}")
    if not 0 <= value <= _U16_MAX:
        raise _invalid(f"{variant}.{name}: {value} does not fit in a u16")
    return value


def _byte_field(value: Any, where: str) -> bytes:
    # serde_bytes accepts byte strings and text strings (as their UTF-8 bytes).
    if type(value) is bytes:
        return value
    if type(value) is str:
        return value.encode("utf-8")
    raise _invalid(f"{where}: expected bytes or text, got {type(value).__name__}")


def _optional_bytes(fields: Mapping[Any, Any], name: str) -> bytes | None:
    value = fields.get(name)
    if value is None:
        return None
    return _byte_field(value, f"Attestation.{name}")


def _inner_map(value: Any, variant: str) -> Mapping[Any, Any]:
    if not isinstance(value, dict):
        raise _invalid(f"{variant}: expected a map of fields, got {type(value).__name__}")
    return value


_DESCRIBE_NSM_REQUEST: Final = b"\x6bDescribeNSM"
_GET_RANDOM_REQUEST: Final = b"\x69GetRandom"
_DESCRIBE_NSM: Final = DescribeNSM()
_GET_RANDOM: Final = GetRandom()


#: How every ExtendPCR in the AWS client's shape starts (see :func:`canonical_extend`).
EXTEND_PCR_PREFIX: Final = b"\xa1" + cbor.tstr("ExtendPCR") + b"\xa2" + cbor.tstr("index")
_EXTEND_PCR_PREFIX: Final = EXTEND_PCR_PREFIX
_DATA_KEY: Final = cbor.tstr("data")


def canonical_extend(data: bytes) -> tuple[int, bytes] | None:
    """``(index, data)`` of an ExtendPCR in the AWS client's exact shape, else ``None``.

    ``None`` means: not this shape, use :func:`decode_request` (which reads the
    same bytes to the same request when this function does not return ``None``).
    The shape is ``{"ExtendPCR": {"index": u16, "data": bytes}}`` with exactly
    these two fields in this order, each head one of the forms read here, and the
    byte string ending exactly at the end of ``data``: there is no other way to
    read such bytes, so the answer is the general decoder's.
    """
    if not data.startswith(_EXTEND_PCR_PREFIX):
        return None
    return canonical_extend_after_prefix(data)


def canonical_extend_after_prefix(data: bytes) -> tuple[int, bytes] | None:
    """:func:`canonical_extend` for ``data`` known to start with :data:`EXTEND_PCR_PREFIX`.

    """
    try:
        pos = len(_EXTEND_PCR_PREFIX)
        head = data[pos]
        if head < 24:
            index, pos = head, pos + 1
        elif head == 0x18:
            index, pos = data[pos + 1], pos + 2
        elif head == 0x19:
            index, pos = (data[pos + 1] << 8) | data[pos + 2], pos + 3
        else:
            return None
        if data[pos:pos + 5] != _DATA_KEY:
            return None
        head = data[pos + 5]
        if 0x40 <= head < 0x58:
            length, pos = head - 0x40, pos + 6
        elif head == 0x58:
            length, pos = data[pos + 6], pos + 7
        elif head == 0x59:
            length, pos = (data[pos + 6] << 8) | data[pos + 7], pos + 8
        else:
            return None
    except IndexError:  # shorter than its heads: the decoder says why
        return None
    if len(data) - pos != length:
        return None
    return index, data[pos:]


def decode_request(data: bytes) -> Request:
    """Decode one request, or raise :class:`RequestRejected` with the device's error."""
    if len(data) > MAX_REQUEST_SIZE:
        raise RequestRejected(
            ErrorCode.InputTooLarge,
            f"request is {len(data)} bytes, the limit is {MAX_REQUEST_SIZE}",
        )
    # Fast paths for the most frequent requests in their canonical encoding. The
    # canonical bytes are unambiguous, so this is the same decision as below.
    if data == _DESCRIBE_NSM_REQUEST:
        return _DESCRIBE_NSM
    if data == _GET_RANDOM_REQUEST:
        return _GET_RANDOM
    if data.startswith(_DESCRIBE_PCR_PREFIX):
        rest = data[len(_DESCRIBE_PCR_PREFIX):]
        if len(rest) == 1 and rest[0] < 24:
            return DescribePCR(rest[0])
        if len(rest) == 2 and rest[0] == 0x18 and rest[1] >= 24:
            return DescribePCR(rest[1])
    elif data.startswith(_EXTEND_PCR_PREFIX):
        canonical = canonical_extend_after_prefix(data)
        if canonical is not None:
            return ExtendPCR(*canonical)
    try:
        item = load_exact(data)
    except ValueError as exc:
        raise _invalid(str(exc)) from None
    if type(item) is str:
        if item == "DescribeNSM":
            return DescribeNSM()
        if item == "GetRandom":
            return GetRandom()
        raise _invalid(f"unknown request {shown(item)}")
    if not isinstance(item, dict):
        raise _invalid(f"a request is a text or a one-entry map, got {type(item).__name__}")
    if len(item) != 1:
        raise _invalid(f"a request map has exactly one entry, got {len(item)}")
    ((name, value),) = item.items()
    if name == "DescribePCR":
        return DescribePCR(_u16(_inner_map(value, name), "index", name))
    if name == "ExtendPCR":
        fields = _inner_map(value, name)
        index = _u16(fields, "index", name)
        if "data" not in fields:
            raise _invalid("ExtendPCR: missing field 'data'")
        return ExtendPCR(index, _byte_field(fields["data"], "ExtendPCR.data"))
    if name == "LockPCR":
        return LockPCR(_u16(_inner_map(value, name), "index", name))
    if name == "LockPCRs":
        return LockPCRs(_u16(_inner_map(value, name), "range", name))
    if name == "Attestation":
        fields = _inner_map(value, name)
        return Attestation(
            user_data=_optional_bytes(fields, "user_data"),
            nonce=_optional_bytes(fields, "nonce"),
            public_key=_optional_bytes(fields, "public_key"),
        )
    raise _invalid(f"unknown request {shown(name)}")


# --------------------------------------------------------------------------
# Encoding requests (the driver side), byte-identical with the AWS client


def _opt(value: bytes | None) -> bytes:
    return cbor.NULL if value is None else cbor.bstr(value)


_K_INDEX: Final = cbor.tstr("index")
_K_DATA: Final = cbor.tstr("data")


def encode_request(request: Request) -> bytes:
    """The CBOR bytes the AWS client sends for ``request``."""
    match request:
        case DescribePCR(index):
            return _DESCRIBE_PCR_PREFIX + cbor.uint(index)
        case ExtendPCR(index, data):
            return (b"\xa1" + cbor.tstr("ExtendPCR") + b"\xa2" + _K_INDEX + cbor.uint(index)
                    + _K_DATA + cbor.bstr(data))
        case LockPCR(index):
            return b"\xa1" + cbor.tstr("LockPCR") + b"\xa1" + _K_INDEX + cbor.uint(index)
        case LockPCRs(range_):
            return (b"\xa1" + cbor.tstr("LockPCRs") + b"\xa1" + cbor.tstr("range")
                    + cbor.uint(range_))
        case DescribeNSM():
            return cbor.tstr("DescribeNSM")
        case Attestation(user_data, nonce, public_key):
            return (b"\xa1" + cbor.tstr("Attestation") + b"\xa3"
                    + cbor.tstr("user_data") + _opt(user_data)
                    + cbor.tstr("nonce") + _opt(nonce)
                    + cbor.tstr("public_key") + _opt(public_key))
        case GetRandom():
            return cbor.tstr("GetRandom")
    raise TypeError(f"not an NSM request: {request!r}")


# --------------------------------------------------------------------------
# Encoding responses (the device side)

_R_DESCRIBE_PCR: Final = b"\xa1" + cbor.tstr("DescribePCR") + b"\xa2" + cbor.tstr("lock")
_R_EXTEND_PCR: Final = b"\xa1" + cbor.tstr("ExtendPCR") + b"\xa1" + _K_DATA
_R_LOCK_PCR: Final = cbor.tstr("LockPCR")
_R_LOCK_PCRS: Final = cbor.tstr("LockPCRs")
_R_ATTESTATION: Final = b"\xa1" + cbor.tstr("Attestation") + b"\xa1" + cbor.tstr("document")
#: The exact prefix Linux's hwrng parser expects before the random bytes.
GET_RANDOM_PREFIX: Final = b"\xa1" + cbor.tstr("GetRandom") + b"\xa1" + cbor.tstr("random")
_R_ERRORS: Final[dict[ErrorCode, bytes]] = {
    code: b"\xa1" + cbor.tstr("Error") + cbor.tstr(code.name)
    for code in ErrorCode
    if code is not ErrorCode.Success
}
_R_DESCRIBE_NSM_KEYS: Final = tuple(
    cbor.tstr(k)
    for k in ("version_major", "version_minor", "version_patch", "module_id", "max_pcrs",
              "locked_pcrs", "digest")
)


_R_EXTEND_PCR_HEADS: Final = {n: _R_EXTEND_PCR + cbor.head(cbor.MAJOR_BYTES, n) for n in (32, 48, 64)}


def encode_extend_pcr(value: bytes) -> bytes:
    """``{"ExtendPCR": {"data": value}}``; the PCR sizes have their prefix ready."""
    prefix = _R_EXTEND_PCR_HEADS.get(len(value))
    return _R_EXTEND_PCR + cbor.bstr(value) if prefix is None else prefix + value


def encode_describe_pcr(lock: bool, data: bytes) -> bytes:
    return _R_DESCRIBE_PCR + (cbor.TRUE if lock else cbor.FALSE) + _K_DATA + cbor.bstr(data)


def encode_error(code: ErrorCode) -> bytes:
    return _R_ERRORS[code]


def encode_response(response: Response) -> bytes:
    """The CBOR bytes the real device sends for ``response``."""
    match response:
        case DescribePCRResponse(lock, data):
            return encode_describe_pcr(lock, data)
        case ExtendPCRResponse(data):
            return encode_extend_pcr(data)
        case LockPCRResponse():
            return _R_LOCK_PCR
        case LockPCRsResponse():
            return _R_LOCK_PCRS
        case DescribeNSMResponse():
            k = _R_DESCRIBE_NSM_KEYS
            r = response
            return (b"\xa1" + cbor.tstr("DescribeNSM") + b"\xa7"
                    + k[0] + cbor.uint(r.version_major)
                    + k[1] + cbor.uint(r.version_minor)
                    + k[2] + cbor.uint(r.version_patch)
                    + k[3] + cbor.tstr(r.module_id)
                    + k[4] + cbor.uint(r.max_pcrs)
                    + k[5] + cbor.array_head(len(r.locked_pcrs))
                    + b"".join(cbor.uint(i) for i in r.locked_pcrs)
                    + k[6] + cbor.tstr(r.digest))
        case AttestationResponse(document):
            return _R_ATTESTATION + cbor.bstr(document)
        case GetRandomResponse(random):
            return GET_RANDOM_PREFIX + cbor.bstr(random)
        case ErrorResponse(code):
            return _R_ERRORS[code]
    raise TypeError(f"not an NSM response: {response!r}")


# --------------------------------------------------------------------------
# Decoding responses (the driver side), with the AWS client's rules


def _bad(reason: str) -> NsmError:
    return NsmError(ErrorCode.InvalidResponse, reason)


def _field(fields: Mapping[Any, Any], name: str, kind: type, variant: str) -> Any:
    if name not in fields:
        raise _bad(f"{variant}: missing field {name!r}")
    value = fields[name]
    if type(value) is not kind:
        raise _bad(f"{variant}.{name}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _uint_field(fields: Mapping[Any, Any], name: str, variant: str, limit: int) -> int:
    value: int = _field(fields, name, int, variant)
    if not 0 <= value <= limit:
        raise _bad(f"{variant}.{name}: {value} is out of range")
    return value


def decode_response(data: bytes) -> Response:
    """Decode a device's answer; raise :class:`NsmError` (InvalidResponse) if malformed.

    An error answer decodes to :class:`ErrorResponse`; it is not raised here.
    """
    if len(data) > MAX_RESPONSE_SIZE:
        raise _bad(f"response is {len(data)} bytes, more than {MAX_RESPONSE_SIZE}")
    if not data:
        raise _bad("empty response")
    if 0xA0 <= data[0] <= 0xBF and data[0] != 0xA1:
        raise _bad("the outer map of a response must be a one-entry map (0xa1)")
    try:
        item = load_exact(data)
    except ValueError as exc:
        raise _bad(str(exc)) from None
    if type(item) is str:
        if item == "LockPCR":
            return LockPCRResponse()
        if item == "LockPCRs":
            return LockPCRsResponse()
        raise _bad(f"unknown response {shown(item)}")
    if not isinstance(item, dict):
        raise _bad(f"a response is a text or a one-entry map, got {type(item).__name__}")
    ((name, value),) = item.items()
    if name == "Error":
        if type(value) is not str or value not in ErrorCode.__members__ or value == "Success":
            raise _bad(f"unknown error code {shown(value)}")
        return ErrorResponse(ErrorCode[value])
    if not isinstance(value, dict):
        raise _bad(f"{name}: expected a map of fields")
    if name == "DescribePCR":
        return DescribePCRResponse(_field(value, "lock", bool, name),
                                   _field(value, "data", bytes, name))
    if name == "ExtendPCR":
        return ExtendPCRResponse(_field(value, "data", bytes, name))
    if name == "DescribeNSM":
        locked = _field(value, "locked_pcrs", list, name)
        if not all(type(i) is int and 0 <= i <= _U16_MAX for i in locked):
            raise _bad("DescribeNSM.locked_pcrs: expected a list of u16")
        digest = _field(value, "digest", str, name)
        if digest not in DIGEST_NAMES:
            raise _bad(f"DescribeNSM.digest: unknown digest {shown(digest)}")
        return DescribeNSMResponse(
            version_major=_uint_field(value, "version_major", name, _U16_MAX),
            version_minor=_uint_field(value, "version_minor", name, _U16_MAX),
            version_patch=_uint_field(value, "version_patch", name, _U16_MAX),
            module_id=_field(value, "module_id", str, name),
            max_pcrs=_uint_field(value, "max_pcrs", name, _U16_MAX),
            locked_pcrs=tuple(locked),
            digest=digest,
        )
    if name == "Attestation":
        return AttestationResponse(_field(value, "document", bytes, name))
    if name == "GetRandom":
        return GetRandomResponse(_field(value, "random", bytes, name))
    raise _bad(f"unknown response {shown(name)}")
