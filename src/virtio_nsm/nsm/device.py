"""The NSM device: bytes in, bytes out.

:class:`NsmDevice` knows nothing about rings, sockets or files. ``handle``
takes one request as the driver wrote it and returns the exact response bytes
the device puts in the response buffer; it never raises.

Atomicity: the device state (:class:`DeviceState`: identity and PCR bank) is
one immutable value. A mutating request computes the next value, hands it to
the optional ``commit`` hook (persistence plugs in there) and only then makes
it current. If anything fails before that point -- a rejected request, a
failing hook, a bug -- the current value is untouched and the answer is an
error. PCRs and locks only ever move forward: nothing here unlocks or resets
a PCR, and a transport's reset does not reach this object.

Response buffer: the transport says how many bytes the driver's response
buffer holds (``max_response``). An answer that does not fit is replaced by
``{"Error": "BufferTooSmall"}`` if that fits, else by nothing (``b""``), and a
state change whose answer does not fit is *not applied*: the answer of a
mutating request is known before the change is committed, and the size check
comes first. A driver that retries with a larger buffer therefore never
extends twice.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from ..errors import ConfigurationError, ErrorCode
from ..request import RequestToken
from . import attestation, protocol
from .pcr import BOOT_LOCKED_PCRS, MAX_PCRS, Digest, PcrBank
from .pki import CertificateAuthority, SigningChain
from .protocol import (
    MAX_RESPONSE_SIZE,
    Attestation,
    DescribeNSM,
    DescribePCR,
    ExtendPCR,
    GetRandom,
    LockPCR,
    LockPCRs,
    Request,
    RequestRejected,
)

log = logging.getLogger(__name__)

#: Version reported by DescribeNSM.
VERSION: Final = (1, 0, 0)
#: Bytes of randomness in one GetRandom answer.
RANDOM_SIZE: Final = 256

_new = object.__new__
_set = object.__setattr__
_EXTEND_PCR_PREFIX: Final = protocol.EXTEND_PCR_PREFIX

Clock = Callable[[], float]
RandomSource = Callable[[int], bytes]
CommitHook = Callable[["Commit"], None]


def generate_module_id() -> str:
    """A module id shaped like a real one: ``i-<17 hex>-enc<16 hex>``."""
    return f"i-{secrets.token_hex(9)[:17]}-enc{secrets.token_hex(8)}"


def default_boot_measurements(module_id: str, digest: Digest) -> dict[int, bytes]:
    """Boot PCRs of a debug-mode enclave: PCR0-2 zero, PCR4 measures the parent instance."""
    instance_id = module_id.split("-enc", 1)[0]
    return {4: digest.extend(bytes(digest.size), instance_id.encode("utf-8"))}


@dataclass(frozen=True, slots=True)
class DeviceState:
    """Everything a guest can observe or change: identity, PCR values and locks."""

    module_id: str
    pcrs: PcrBank
    version: tuple[int, int, int] = VERSION

    def __post_init__(self) -> None:
        if not self.module_id or len(self.module_id.encode("utf-8")) > 256:
            raise ConfigurationError("module_id must be 1 to 256 bytes of text")
        if len(self.version) != 3 or not all(0 <= v <= 0xFFFF for v in self.version):
            raise ConfigurationError("version must be three u16 numbers")

    # -- validation of a state that comes from outside (state file, snapshot) --

    def check_reachable(self) -> None:
        """Raise :class:`ConfigurationError` unless some device could be in this state.

        Every device starts with PCR0-15 measured and locked and at least 16 PCRs;
        nothing a guest can do unlocks a PCR, so a state without those locks was
        made by hand (or by an attacker) and is never used.
        """
        bank = self.pcrs
        if bank.max_pcrs < BOOT_LOCKED_PCRS:
            raise ConfigurationError(
                f"{bank.max_pcrs} PCRs: a device has {BOOT_LOCKED_PCRS} to {MAX_PCRS}")
        boot = (1 << BOOT_LOCKED_PCRS) - 1
        if bank.locked & boot != boot:
            unlocked = [i for i in range(BOOT_LOCKED_PCRS) if not bank.is_locked(i)]
            raise ConfigurationError(
                f"boot PCR{unlocked[0]} is unlocked: PCR0-{BOOT_LOCKED_PCRS - 1} are locked from boot")

    def check_successor(self, new: DeviceState, *, adopt: bool = False) -> None:
        """Raise :class:`ConfigurationError` unless this device could continue as ``new``.

        ``new`` must be reachable (:meth:`check_reachable`), use this device's digest,
        PCR count and version, and keep every PCR that is locked now locked; with the
        same module id, a locked PCR also keeps its value. ``adopt=True`` (a device
        that never changed, taking over a migrated identity) allows another module id
        and other boot measurements, never fewer locks.
        """
        new.check_reachable()
        mine, theirs = self.pcrs, new.pcrs
        if theirs.digest is not mine.digest:
            raise ConfigurationError(
                f"{theirs.digest.value} PCRs, this device's are {mine.digest.value}")
        if theirs.max_pcrs != mine.max_pcrs:
            raise ConfigurationError(f"{theirs.max_pcrs} PCRs, this device has {mine.max_pcrs}")
        if new.version != self.version:
            raise ConfigurationError(
                f"version {'.'.join(map(str, new.version))}, this device is "
                f"{'.'.join(map(str, self.version))}")
        if new.module_id != self.module_id and not adopt:
            raise ConfigurationError(
                f"module id {new.module_id!r}, this device is {self.module_id!r} "
                "(only a device that never changed may take over another identity)")
        lost = mine.locked & ~theirs.locked
        if lost:
            index = (lost & -lost).bit_length() - 1
            raise ConfigurationError(f"PCR{index} is locked and would be unlocked")
        if new.module_id == self.module_id:
            for index in mine.locked_indices():
                if theirs.values[index] != mine.values[index]:
                    raise ConfigurationError(f"PCR{index} is locked and would change")

    def with_pcrs(self, pcrs: PcrBank) -> DeviceState:
        """This state with another bank (derived from this one's: nothing to re-check)."""
        state = _new(DeviceState)
        _set(state, "module_id", self.module_id)
        _set(state, "pcrs", pcrs)
        _set(state, "version", self.version)
        return state

    @classmethod
    def at_boot(
        cls,
        module_id: str | None = None,
        digest: Digest | str = Digest.SHA384,
        boot_measurements: Mapping[int, bytes] | None = None,
        max_pcrs: int = MAX_PCRS,
    ) -> DeviceState:
        digest = _digest(digest)
        module_id = module_id if module_id is not None else generate_module_id()
        if boot_measurements is None:
            boot_measurements = default_boot_measurements(module_id, digest)
        try:
            bank = PcrBank.at_boot(digest, boot_measurements, max_pcrs)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        return cls(module_id, bank)


@dataclass(frozen=True, slots=True)
class Commit:
    """A state change about to become current, with what caused it.

    ``request`` and ``response`` are the exact bytes in and out; ``token`` is
    what the transport passed to :meth:`NsmDevice.handle` to identify the
    request (its head descriptor and inflight counter), so a store can recognise a request that
    is submitted again after a crash and answer it from its record.
    """

    state: DeviceState
    request: bytes
    response: bytes
    token: RequestToken | None = None


def _digest(value: Digest | str) -> Digest:
    if isinstance(value, Digest):
        return value
    try:
        return Digest(value.upper())
    except ValueError:
        raise ConfigurationError(
            f"unknown digest {value!r} (choose SHA256, SHA384 or SHA512)"
        ) from None


# Room a document needs beyond the signing chain and the PCRs: the request's
# three fields (bounded by the request size), the payload keys, the COSE frame,
# the response frame, and slack for certificate re-issue (DER lengths vary).
_DOCUMENT_OVERHEAD: Final = protocol.MAX_REQUEST_SIZE + 512


class _NoRoom(Exception):
    """The answer of a state change does not fit the response buffer."""


_BUFFER_TOO_SMALL: Final = protocol.encode_error(ErrorCode.BufferTooSmall)


def _too_small(room: int) -> bytes:
    return _BUFFER_TOO_SMALL if len(_BUFFER_TOO_SMALL) <= room else b""


class NsmDevice:
    """A sans-IO NitroSecureModule.

    ``NsmDevice()`` is a working device: a generated module id, SHA-384 PCRs
    with debug-enclave boot measurements (PCR0-15 locked), and a fresh
    in-memory CA. Every part can be supplied instead: ``state`` (from
    :attr:`state` of another device, or persistence), ``ca`` (see
    :class:`CertificateAuthority`), ``clock`` (seconds since the epoch),
    ``random_bytes`` and a ``commit`` hook that must make a new state durable
    before it is answered (raise to refuse the change).
    """

    def __init__(
        self,
        *,
        module_id: str | None = None,
        digest: Digest | str = Digest.SHA384,
        boot_measurements: Mapping[int, bytes] | None = None,
        max_pcrs: int = MAX_PCRS,
        state: DeviceState | None = None,
        ca: CertificateAuthority | None = None,
        clock: Clock = time.time,
        random_bytes: RandomSource = os.urandom,
        commit: CommitHook | None = None,
    ) -> None:
        if state is None:
            state = DeviceState.at_boot(module_id, digest, boot_measurements, max_pcrs)
        elif module_id is not None or boot_measurements is not None:
            raise ConfigurationError("give either a state or module_id/boot_measurements")
        self._clock = clock
        self._random = random_bytes
        self._commit = commit
        self._lock = threading.Lock()
        self._request: bytes = b""
        self._token: RequestToken | None = None
        self._room = MAX_RESPONSE_SIZE
        self._state = state
        size = state.pcrs.digest.size
        self._extend_head = protocol.encode_extend_pcr(bytes(size))[:-size]
        # DescribeNSM's answer depends on the state only, which is an immutable value
        # replaced on every change: keep the last answer with the state it describes.
        self._describe_nsm: tuple[DeviceState | None, bytes] = (None, b"")
        now = self._now()
        self.ca = ca if ca is not None else CertificateAuthority.generate(now)
        self._chain = SigningChain(self.ca, state.module_id)
        self._documents = attestation.DocumentEncoder(state.module_id, state.pcrs.digest.value)
        signer = self._chain.signer(now)
        worst = (
            len(signer.certificate) + sum(len(c) for c in signer.cabundle) + 8 * 6
            + MAX_PCRS * (3 + state.pcrs.digest.size) + len(state.module_id.encode())
            + _DOCUMENT_OVERHEAD
        )
        if worst > MAX_RESPONSE_SIZE:
            raise ConfigurationError(
                f"the certificate chain is too large: a document could need {worst} bytes, "
                f"the response buffer holds {MAX_RESPONSE_SIZE}"
            )

    # -- state ---------------------------------------------------------

    @property
    def state(self) -> DeviceState:
        """The current state; a value, safe to keep as a snapshot."""
        return self._state

    @property
    def root_certificate_pem(self) -> bytes:
        """The PEM root that this device's attestation documents chain to."""
        return self.ca.certificate_pem

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._clock(), dt.UTC)

    def _apply(self, new: DeviceState, response: bytes) -> bytes:
        if len(response) > self._room:  # the driver could not read the answer: change nothing
            raise _NoRoom
        if self._commit is not None:
            try:
                self._commit(Commit(new, self._request, response, self._token))
            except Exception as exc:
                log.error("state change not committed, request refused: %s", exc)
                raise RequestRejected(ErrorCode.InternalError, f"commit failed: {exc}") from exc
        self._state = new
        return response

    # -- requests ------------------------------------------------------

    def handle(self, request: bytes, token: RequestToken | None = None, *,
               max_response: int | None = None) -> bytes:
        """Answer one request (CBOR bytes) with the response bytes. Never raises.

        ``token`` is passed through to the commit hook (see :class:`Commit`).
        ``max_response`` is the size of the driver's response buffer (default
        and upper bound: ``MAX_RESPONSE_SIZE``); see the module docstring for
        what happens to an answer that does not fit.
        """
        room = MAX_RESPONSE_SIZE if max_response is None else max(0, min(max_response, MAX_RESPONSE_SIZE))
        with self._lock:
            self._request, self._token, self._room = request, token, room
            try:
                # The hot request in its usual shape skips the decoder (same reading).
                extend = (protocol.canonical_extend_after_prefix(request)
                          if request.startswith(_EXTEND_PCR_PREFIX) else None)
                if extend is not None:
                    response = self._extend(*extend)
                else:
                    response = self._dispatch(protocol.decode_request(request))
            except RequestRejected as exc:
                response = protocol.encode_error(exc.code)
            except _NoRoom:
                log.warning("a state change was not applied: its answer does not fit the "
                            "%d-byte response buffer", room)
                return _too_small(room)
            except Exception:
                log.exception("internal error while handling a request")
                response = protocol.encode_error(ErrorCode.InternalError)
        if len(response) > room:
            if len(response) > MAX_RESPONSE_SIZE:  # excluded at construction; kept as a guard
                log.error("response of %d bytes does not fit the response buffer", len(response))
                response = protocol.encode_error(ErrorCode.InternalError)
                if len(response) <= room:
                    return response
            return _too_small(room)
        return response

    def _extend(self, index: int, data: bytes) -> bytes:
        state = self._state
        new_bank = state.pcrs.extend(index, data)
        # == protocol.encode_extend_pcr(value): the digest, hence the head, never changes
        return self._apply(state.with_pcrs(new_bank), self._extend_head + new_bank.values[index])

    def _dispatch(self, request: Request) -> bytes:
        state = self._state
        bank = state.pcrs
        match request:
            case ExtendPCR(index, data):
                return self._extend(index, data)
            case DescribePCR(index):
                lock, data = bank.describe(index)
                return protocol.encode_describe_pcr(lock, data)
            case LockPCR(index):
                return self._apply(state.with_pcrs(bank.lock(index)),
                                   protocol.encode_response(protocol.LockPCRResponse()))
            case LockPCRs(count):
                new_bank = bank.lock_range(count)
                response = protocol.encode_response(protocol.LockPCRsResponse())
                if new_bank.locked == bank.locked:
                    return response
                return self._apply(state.with_pcrs(new_bank), response)
            case DescribeNSM():
                described, response = self._describe_nsm
                if described is state:
                    return response
                major, minor, patch = state.version
                response = protocol.encode_response(protocol.DescribeNSMResponse(
                    version_major=major, version_minor=minor, version_patch=patch,
                    module_id=state.module_id, max_pcrs=bank.max_pcrs,
                    locked_pcrs=tuple(bank.locked_indices()), digest=bank.digest.value,
                ))
                self._describe_nsm = (state, response)
                return response
            case Attestation(user_data, nonce, public_key):
                seconds = self._clock()
                now = dt.datetime.fromtimestamp(seconds, dt.UTC)
                document = self._documents.sign(
                    self._chain.signer(now),
                    int(seconds * 1000),
                    bank.locked_values(),
                    pcrs_key=bank,  # immutable: same bank, same encoded map
                    public_key=public_key,
                    user_data=user_data,
                    nonce=nonce,
                )
                return protocol.encode_response(protocol.AttestationResponse(document))
            case GetRandom():
                random = self._random(RANDOM_SIZE)
                if len(random) != RANDOM_SIZE:
                    raise RuntimeError("the random source returned too few bytes")
                return protocol.encode_response(protocol.GetRandomResponse(random))
        raise TypeError(f"unhandled request {request!r}")
