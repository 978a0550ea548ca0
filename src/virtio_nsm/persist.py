"""Durable device state: a state directory that survives crashes; all file I/O of the device.

Layout of a state directory::

    state.bin   the device state (identity, PCRs, locks) and the record of the
                last state-changing request, as of the last compaction
    journal     every change since: one checksummed record per change
                (:mod:`virtio_nsm.journal`)
    ca/         the attestation root (root-key.pem 0600, root.pem)
    lock        held (flock) by the one backend using the directory

``state.bin`` is ``MAGIC | format (u16) | length (u32) | body (CBOR) |
SHA-256 of everything before``; format 2 names the journal *generation* whose
records follow it. A change is one journal record (the new state, with the
record of its request) and one ``fdatasync``. A compaction -- when the journal
is full, when a state is installed, and at start if records were replayed --
writes the current state to a temporary file, fsyncs it, renames it over
``state.bin``, fsyncs the directory and so starts a new generation: after a
crash ``state.bin`` is the old or the new one, never a mix, and the journal
holds the records of its generation up to at most one torn record.

Anything unexpected -- a bad checksum, a truncated file, another format
version, a damaged journal, a missing file in an initialised directory, a state
no device could reach -- is refused with :class:`StateError`; nothing here
ever falls back to a fresh or older state, because that would unlock PCRs.

The record of the last change (its transport token, the SHA-256 of its request
and its response) is written with the state it produced: a request that a
transport submits again after a crash is recognised and answered from the
record instead of being applied twice.

Snapshots that leave the directory (``nsm state export``, device-state
migration) are signed with the CA root key (:func:`sign_snapshot`,
:func:`verify_snapshot`); loading one is subject to :func:`check_successor`.
The CA directory's files are read and written here too (:func:`load_ca`,
:func:`save_ca`), with the one atomic writer, :func:`write_atomic`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from . import _strict_cbor, cbor, journal
from ._files import open_regular, read_capped
from .cose import der_to_raw, raw_to_der
from .errors import ConfigurationError
from .nsm.device import Commit, DeviceState
from .nsm.pcr import MAX_PCRS, Digest, PcrBank
from .nsm.pki import CertificateAuthority
from .nsm.protocol import MAX_RESPONSE_SIZE
from .request import RequestToken

MAGIC: Final = b"NSMSTATE"
#: state.bin format written: 2 names the journal generation that follows it. Format 1
#: (no journal) is still read, and converted on open.
FORMAT_VERSION: Final = 2
_FORMATS_READ: Final = (1, 2)
STATE_FILE: Final = "state.bin"
JOURNAL_FILE: Final = "journal"
CA_DIR: Final = "ca"
LOCK_FILE: Final = "lock"
_HEADER: Final = struct.Struct(">8sHI")
_DIGEST_SIZE: Final = 32
#: A state file is small (32 PCRs and a short record); anything larger is not ours.
MAX_STATE_FILE: Final = 64 * 1024
#: A PEM key or certificate of a CA directory.
MAX_PEM_FILE: Final = 64 * 1024
#: A signed snapshot (``nsm state export``, VHOST_USER_PROTOCOL_F_DEVICE_STATE).
SNAPSHOT_MAGIC: Final = b"NSMSNAPS"
SNAPSHOT_VERSION: Final = 1
#: Signed before the snapshot bytes: no certificate (DER, starting 0x30) can be confused with it.
_SIGNATURE_CONTEXT: Final = b"virtio-nsm signed device state snapshot\x00"
_SIGNATURE_SIZE: Final = 96  # ES384: r || s, 48 bytes each
#: Sequence numbers and timestamps are non-negative and fit in 63 bits.
MAX_SEQ: Final = 2**63 - 1
#: A transport token is a few unsigned 64-bit numbers (e.g. descriptor head, inflight counter).
_MAX_U64: Final = 2**64 - 1


class StateError(Exception):
    """A state directory or state file cannot be used as it is."""


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "virtio-nsm"


@dataclass(frozen=True, slots=True)
class Record:
    """The last state change: which request (token + hash) and what it answered."""

    token: RequestToken
    request_sha256: bytes
    response: bytes


@dataclass(frozen=True, slots=True)
class Snapshot:
    state: DeviceState
    seq: int
    last: Record | None = None


# -- encoding -------------------------------------------------------------------

def _body(snapshot: Snapshot, **extra: Any) -> dict[str, Any]:
    state, bank = snapshot.state, snapshot.state.pcrs
    last = snapshot.last
    return {
        "module_id": state.module_id,
        "version": list(state.version),
        "digest": bank.digest.value,
        "pcrs": list(bank.values),
        "locked": bank.locked,
        "seq": snapshot.seq,
        "last": None if last is None else {
            "token": [last.token.head, last.token.counter], "request_sha256": last.request_sha256,
            "response": last.response,
        },
        **extra,
    }


class _BodyEncoder:
    """``cbor2.dumps(_body(snapshot))``, byte for byte, for the hot path (one per change).

    The identity part (module id, version, digest) is encoded once per identity;
    the rest by hand from CBOR heads.
    """

    __slots__ = ("_key", "_prefix", "_value_head")

    def __init__(self) -> None:
        self._key: tuple[str, tuple[int, ...], str] | None = None
        self._prefix = b""
        self._value_head = b""

    def encode(self, snapshot: Snapshot) -> bytes:
        state, bank, last = snapshot.state, snapshot.state.pcrs, snapshot.last
        key = (state.module_id, state.version, bank.digest.value)
        if key != self._key:
            self._key = key
            self._prefix = (cbor.map_head(7) + cbor.tstr("module_id") + cbor.tstr(state.module_id)
                            + cbor.tstr("version") + cbor.array_head(3)
                            + b"".join(cbor.uint(v) for v in state.version)
                            + cbor.tstr("digest") + cbor.tstr(bank.digest.value) + cbor.tstr("pcrs"))
            self._value_head = cbor.head(cbor.MAJOR_BYTES, bank.digest.size)
        values = bank.values
        parts = [self._prefix, cbor.array_head(len(values)), self._value_head,
                 self._value_head.join(values), _LOCKED, cbor.uint(bank.locked), _SEQ,
                 cbor.uint(snapshot.seq), _LAST]
        if last is None:
            parts.append(cbor.NULL)
        else:
            token = last.token
            parts += (_RECORD_HEAD, cbor.array_head(2), cbor.uint(token.head), cbor.uint(token.counter),
                      _REQUEST_SHA256, cbor.bstr(last.request_sha256), _RESPONSE, cbor.bstr(last.response))
        return b"".join(parts)


_LOCKED: Final = cbor.tstr("locked")
_SEQ: Final = cbor.tstr("seq")
_LAST: Final = cbor.tstr("last")
_RECORD_HEAD: Final = cbor.map_head(3) + cbor.tstr("token")
_REQUEST_SHA256: Final = cbor.tstr("request_sha256")
_RESPONSE: Final = cbor.tstr("response")


def encode_snapshot(snapshot: Snapshot, journal: int | None = None) -> bytes:
    """The bytes of ``state.bin`` for ``snapshot`` (checksummed, not signed).

    ``journal``: the generation of the journal records that follow it (format 2);
    None writes format 1 (no journal).
    """
    if journal is None:
        body, version = cbor2.dumps(_body(snapshot)), 1
    else:
        body, version = cbor2.dumps(_body(snapshot, journal=journal)), FORMAT_VERSION
    head = _HEADER.pack(MAGIC, version, len(body)) + body
    return head + hashlib.sha256(head).digest()


def decode_snapshot(data: bytes, source: str = "state") -> Snapshot:
    """Parse and check a state file; raise :class:`StateError` saying what is wrong."""
    return _decode_state_file(data, source)[0]


def _decode_state_file(data: bytes, source: str) -> tuple[Snapshot, int | None]:
    """A state file's snapshot and journal generation (None: format 1, no journal)."""
    def bad(what: str) -> StateError:
        return StateError(f"{source}: {what}; refusing to use it")

    if len(data) > MAX_STATE_FILE:
        raise bad("larger than any state file")
    if data[:len(SNAPSHOT_MAGIC)] == SNAPSHOT_MAGIC:
        raise bad("a signed snapshot, not a state file (install it with `nsm state import`)")
    if len(data) < _HEADER.size + _DIGEST_SIZE:
        raise bad(f"truncated ({len(data)} bytes)")
    magic, version, length = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise bad("not a virtio-nsm state file")
    if version not in _FORMATS_READ:
        raise bad(f"format version {version}, this virtio-nsm reads versions "
                  f"{', '.join(map(str, _FORMATS_READ))}")
    if len(data) != _HEADER.size + length + _DIGEST_SIZE:
        raise bad(f"length mismatch ({len(data)} bytes, header says {_HEADER.size + length + _DIGEST_SIZE})")
    if hashlib.sha256(data[:-_DIGEST_SIZE]).digest() != data[-_DIGEST_SIZE:]:
        raise bad("checksum mismatch (corrupt)")
    return _parse_body(data[_HEADER.size:-_DIGEST_SIZE], bad, "journal" if version == 2 else None)


@dataclass(frozen=True, slots=True)
class SignedSnapshot:
    """A snapshot whose signature checked out, and when its signer made it."""

    snapshot: Snapshot
    #: Seconds since the epoch, by the signer's clock.
    saved_at: float


def sign_snapshot(snapshot: Snapshot, ca: CertificateAuthority, now: float) -> bytes:
    """A snapshot for another backend: signed (ES384) with the CA's root key.

    Only a backend holding the same CA (``DIR/ca/``) accepts it.
    """
    body = cbor2.dumps(_body(snapshot, saved_at=int(now * 1000)))
    head = _HEADER.pack(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, len(body)) + body
    der = ca.key.sign(_SIGNATURE_CONTEXT + head, ec.ECDSA(hashes.SHA384()))
    return head + der_to_raw(der)


def verify_snapshot(data: bytes, root: x509.Certificate, source: str = "snapshot") -> SignedSnapshot:
    """Check a signed snapshot against ``root`` and parse it; raise :class:`StateError`.

    Checked: size, magic, version, length, the signature (before the body is
    decoded), then the body with a strict decoder (no tags, bounded sizes) and
    the state's reachability (boot PCRs locked, sizes within the device's).
    """
    def bad(what: str) -> StateError:
        return StateError(f"{source}: {what}; refusing to use it")

    if len(data) > MAX_STATE_FILE:
        raise bad("larger than any snapshot")
    if data[:len(MAGIC)] == MAGIC:
        raise bad("an unsigned state file, not a signed snapshot "
                  "(make one with `nsm state export` on the source)")
    if len(data) < _HEADER.size + _SIGNATURE_SIZE:
        raise bad(f"truncated ({len(data)} bytes)")
    magic, version, length = _HEADER.unpack_from(data)
    if magic != SNAPSHOT_MAGIC:
        raise bad("not a virtio-nsm snapshot")
    if version != SNAPSHOT_VERSION:
        raise bad(f"snapshot format {version}, this virtio-nsm reads format {SNAPSHOT_VERSION}")
    if len(data) != _HEADER.size + length + _SIGNATURE_SIZE:
        raise bad(f"length mismatch ({len(data)} bytes, header says "
                  f"{_HEADER.size + length + _SIGNATURE_SIZE})")
    head, signature = data[:-_SIGNATURE_SIZE], data[-_SIGNATURE_SIZE:]
    public = root.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise bad("the root to check it against is not an ECDSA key")
    try:
        public.verify(raw_to_der(signature), _SIGNATURE_CONTEXT + head, ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        raise bad("signature does not verify against this device's CA (tampered, or made by "
                  "a backend with another CA: copy the source's ca/ directory)") from None
    snapshot, saved_at = _parse_body(head[_HEADER.size:], bad, "saved_at")
    assert saved_at is not None
    return SignedSnapshot(snapshot, saved_at / 1000)


_BODY_KEYS: Final = frozenset({"module_id", "version", "digest", "pcrs", "locked", "seq", "last"})
_RECORD_KEYS: Final = frozenset({"token", "request_sha256", "response"})


def _parse_body(raw: bytes, bad: Any, extra: str | None = None) -> tuple[Snapshot, int | None]:
    """The snapshot in a body and its ``extra`` number field, strictly checked; raises ``bad(...)``."""
    try:
        body: Any = _strict_cbor.loads(raw, max_depth=3)
        keys = _BODY_KEYS if extra is None else _BODY_KEYS | {extra}
        if type(body) is not dict or set(body) != keys:
            raise StateError("unexpected fields" if type(body) is dict else "not a map")
        pcrs = _typed(body["pcrs"], list)
        if not 1 <= len(pcrs) <= MAX_PCRS:
            raise StateError(f"{len(pcrs)} PCRs")
        version = _typed(body["version"], list)
        if len(version) != 3:
            raise StateError("version is not three numbers")
        state = DeviceState(
            module_id=_typed(body["module_id"], str),
            pcrs=PcrBank(Digest(_typed(body["digest"], str)),
                         tuple(_typed(v, bytes) for v in pcrs),
                         _typed(body["locked"], int)),
            version=(_u(version[0], 0xFFFF), _u(version[1], 0xFFFF), _u(version[2], 0xFFFF)),
        )
        state.check_reachable()
        seq = _u(body["seq"], MAX_SEQ, "sequence number")
        extra_value = None if extra is None else _u(body[extra], _MAX_U64 if extra == "journal" else MAX_SEQ,
                                                     extra)
        last_raw = body["last"]
        last = None
        if last_raw is not None:
            if type(last_raw) is not dict or set(last_raw) != _RECORD_KEYS:
                raise StateError("malformed record of the last change")
            token = _typed(last_raw["token"], list)
            if len(token) != 2:
                raise StateError("malformed token in the record of the last change")
            digest = _typed(last_raw["request_sha256"], bytes)
            response = _typed(last_raw["response"], bytes)
            if len(digest) != 32 or len(response) > MAX_RESPONSE_SIZE:
                raise StateError("malformed record of the last change")
            head, counter = (_u(t, _MAX_U64, "token") for t in token)
            last = Record(RequestToken(head, counter), digest, response)
    except StateError as exc:
        raise bad(str(exc)) from None
    except _strict_cbor.StrictCborError as exc:
        raise bad(f"invalid CBOR ({exc})") from None
    except (TypeError, ValueError, ConfigurationError) as exc:
        raise bad(f"invalid contents ({exc})") from None
    return Snapshot(state, seq, last), extra_value


def _typed(value: Any, kind: type) -> Any:
    if type(value) is not kind:
        raise StateError(f"expected {kind.__name__}, found {type(value).__name__}")
    return value


def _u(value: Any, limit: int, what: str = "number") -> int:
    if type(value) is not int or not 0 <= value <= limit:
        shown = value if type(value) is int and abs(value) < 2**64 else type(value).__name__
        raise StateError(f"{what} {shown} is not an integer from 0 to {limit}")
    return value


def check_successor(current: Snapshot, new: Snapshot, source: str = "state") -> None:
    """Raise :class:`StateError` unless a device in ``current`` could itself reach ``new``.

    Within one identity (module id) the sequence number never goes back, a
    different state never reuses a sequence number, and locked PCRs keep their
    locks and values. Another identity is adopted only by a device that never
    changed (sequence 0): the destination of a migration.
    """
    def bad(what: str) -> StateError:
        return StateError(f"{source}: {what}; refusing to load it")

    if new.state.module_id == current.state.module_id:
        if new.seq < current.seq:
            raise bad(f"older than the current state (sequence {new.seq} < {current.seq}): a rollback")
        if new.seq == current.seq and new.state != current.state:
            raise bad(f"another state with the current sequence number {new.seq}: a fork")
    try:
        current.state.check_successor(new.state, adopt=current.seq == 0)
    except ConfigurationError as exc:
        raise bad(str(exc)) from None


# -- the store -------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, durable: bool = True, mode: int = 0o600,
                 replace: bool = True) -> None:
    """Write ``path`` so that after any crash it holds the old content or all of ``data``.

    The data goes to ``path.tmp`` (``mode``, regardless of the umask), is fsync'ed,
    then renamed over ``path`` (``replace=True``) or linked to it (``replace=False``:
    :class:`FileExistsError` if ``path`` exists, which is then left alone), and the
    directory is fsync'ed. ``durable=False`` skips both fsyncs (benchmarks only).
    """
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(path.parent)


# -- the CA directory ----------------------------------------------------------------

ROOT_KEY_FILE: Final = "root-key.pem"
ROOT_CERT_FILE: Final = "root.pem"


def default_ca_dir() -> Path:
    """Where ``nsm ca init`` and ``nsm serve --ca-dir`` keep a CA by default."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "virtio-nsm" / "ca"


def load_ca(directory: str | os.PathLike[str]) -> CertificateAuthority:
    """The CA in ``directory`` (``root.pem`` + ``root-key.pem``); raises ConfigurationError."""
    d = Path(directory)
    pems = []
    for name in (ROOT_CERT_FILE, ROOT_KEY_FILE):
        try:
            pems.append(_read_regular(d / name, MAX_PEM_FILE))
        except OSError as exc:
            raise ConfigurationError(f"cannot read CA directory {d}: {exc.strerror}: "
                                     f"{exc.filename}") from None
    return CertificateAuthority.from_pem(pems[0], pems[1])


def save_ca(ca: CertificateAuthority, directory: str | os.PathLike[str]) -> None:
    """Write the root key (mode 0600) and certificate (0644) into ``directory`` (0700).

    Never overwrites a CA: raises ConfigurationError if either file exists.
    """
    d = Path(directory)
    key_path, cert_path = d / ROOT_KEY_FILE, d / ROOT_CERT_FILE
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path in (key_path, cert_path):
            if path.exists():
                raise FileExistsError(errno.EEXIST, "exists", str(path))
        write_atomic(key_path, ca.key_pem, mode=0o600, replace=False)
        write_atomic(cert_path, ca.certificate_pem, mode=0o644, replace=False)
    except FileExistsError as exc:
        raise ConfigurationError(f"{exc.filename} already exists; refusing to overwrite a CA") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot write the CA into {d}: {exc.strerror}") from None


@dataclass(frozen=True, slots=True)
class _Loaded:
    """A state directory as found: ``state.bin``, and the journal records replayed on top."""

    base: Snapshot
    generation: int | None  # None: format 1, no journal
    current: Snapshot
    replayed: int
    state_bytes: bytes


def _load(d: Path, data: bytes | None = None) -> _Loaded:
    """Read ``state.bin`` (or take its ``data``) and replay its journal (read-only).

    Raises :class:`StateError`.
    """
    state_path = d / STATE_FILE
    if data is None:
        data = _read(state_path)
    base, generation = _decode_state_file(data, str(state_path))
    if generation is None:
        return _Loaded(base, None, base, 0, data)
    path = d / JOURNAL_FILE
    if not path.exists():
        raise StateError(f"{path} is missing: changes made since the last compaction would be lost; "
                         "refusing to use the directory")
    try:
        log = journal.Journal(path)
        try:
            payloads = log.records(generation)
        finally:
            log.close()
    except (journal.JournalError, OSError) as exc:
        raise StateError(f"{exc}; refusing to use the directory") from None
    current = base
    for index, payload in enumerate(payloads):
        source = f"{path} record {index}"

        def bad(what: str, source: str = source) -> StateError:
            return StateError(f"{source}: {what}; refusing to use the directory")

        record, _ = _parse_body(payload, bad)
        if record.seq != current.seq + 1:
            raise bad(f"sequence number {record.seq} follows {current.seq}")
        if record.state.module_id != current.state.module_id:
            raise bad("another module id")
        try:
            current.state.check_successor(record.state)
        except ConfigurationError as exc:
            raise bad(str(exc)) from None
        current = record
    return _Loaded(base, generation, current, len(payloads), data)


def _new_generation() -> int:
    return int.from_bytes(os.urandom(8), "big")


class StateStore:
    """One backend's hold on a state directory (see the module docstring).

    Use :meth:`open`; pass :meth:`commit` to :class:`~virtio_nsm.NsmDevice` as
    its ``commit`` hook. ``durable=False`` skips fsync (benchmarks only).
    """

    def __init__(self, directory: Path, lock_fd: int, snapshot: Snapshot, ca: CertificateAuthority,
                 durable: bool, log: journal.Journal, generation: int) -> None:
        self.directory = directory
        self._lock_fd = lock_fd
        self.snapshot = snapshot
        self.ca = ca
        self.durable = durable
        self._journal = log
        self._generation = generation
        self._next = 0
        self._broken: str | None = None
        self._encoder = _BodyEncoder()
        #: Journal records recovered (replayed and compacted) when the directory was opened.
        self.recovered = 0

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        create: bool = True,
        initial: DeviceState | None = None,
        ca: CertificateAuthority | None = None,
        durable: bool = True,
        journal_slots: int = journal.DEFAULT_SLOTS,
    ) -> StateStore:
        """Lock and load ``directory``; initialise it first if it is new and ``create``.

        ``initial``, ``ca`` and ``journal_slots`` are used only to initialise a new
        directory (by default: a fresh boot state, a fresh CA, 256 records between
        compactions); an existing directory's own state, CA and journal always win.
        Journal records found are replayed and compacted into ``state.bin``.
        """
        d = Path(directory)
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create state directory {d}: {exc.strerror}") from None
        lock_fd = cls._lock(d)
        try:
            state_path, ca_path, journal_path = d / STATE_FILE, d / CA_DIR, d / JOURNAL_FILE
            if state_path.exists():
                loaded = _load(d)
                try:
                    authority = load_ca(ca_path)
                except ConfigurationError as exc:
                    raise StateError(f"{d}: the CA is unusable ({exc}); refusing to start") from None
                snapshot, generation = loaded.current, loaded.generation
                try:
                    if generation is None:  # format 1: give it a journal
                        journal.create(journal_path, journal_slots, durable=durable)
                    if generation is None or loaded.replayed:
                        generation = _new_generation()
                        write_atomic(state_path, encode_snapshot(snapshot, generation), durable=durable)
                except OSError as exc:
                    raise StateError(f"{d}: cannot compact the journal into {STATE_FILE}: "
                                     f"{exc.strerror}; refusing to start") from None
                replayed = loaded.replayed
            elif ca_path.exists():
                raise StateError(
                    f"{d} has a CA but no {STATE_FILE}: the state was lost or the directory was "
                    "never fully initialised; refusing to start with fresh PCRs "
                    "(restore a state with `nsm state import`, or use a new directory)"
                )
            elif not create:
                raise StateError(f"{d} holds no device state")
            else:
                authority = ca or CertificateAuthority.generate()
                try:
                    save_ca(authority, ca_path)
                except ConfigurationError as exc:
                    raise StateError(f"{d}: {exc}") from None
                snapshot, generation, replayed = Snapshot(initial or DeviceState.at_boot(), 0), \
                    _new_generation(), 0
                try:
                    journal.create(journal_path, journal_slots, durable=durable)
                    write_atomic(state_path, encode_snapshot(snapshot, generation), durable=durable)
                except OSError as exc:
                    raise StateError(f"cannot initialise {d}: {exc.strerror}") from None
            try:
                log = journal.Journal(journal_path, writable=True)
            except journal.JournalError as exc:
                raise StateError(f"{exc}; refusing to start") from None
            store = cls(d, lock_fd, snapshot, authority, durable, log, generation)
            store.recovered = replayed
            return store
        except BaseException:
            cls._unlock(lock_fd)
            raise

    @staticmethod
    def _lock(d: Path) -> int:
        try:
            fd = os.open(d / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateError(f"cannot open {d / LOCK_FILE}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                # The flock is the truth; the pid is what its holder wrote (it may be
                # a moment late, or name a process that passed the lock on).
                who = f"pid {owner}" if owner.isdigit() else "pid not recorded yet"
                if owner.isdigit() and not Path(f"/proc/{owner}").exists():
                    who = f"pid {owner} recorded, no longer running: another process holds the lock"
                raise StateError(f"{d} is in use by another backend ({who})") from None
            raise StateError(f"cannot lock {d}: {exc.strerror}") from None
        # The lock is the flock, never this file's contents: they say who holds it
        # (while it is held) and are emptied when it is released.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    @staticmethod
    def _unlock(fd: int) -> None:
        """Release the lock, leaving an empty lock file (no pid of a process that is gone)."""
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)

    @property
    def state(self) -> DeviceState:
        return self.snapshot.state

    def commit(self, change: Commit) -> None:
        """Make ``change`` durable; raises OSError (and changes nothing) if it cannot.

        One journal record and one ``fdatasync``; when the journal is full, a
        compaction (an atomic replace of ``state.bin``) instead.
        """
        if self._broken is not None:
            raise OSError(errno.EIO, self._broken)
        token = change.token
        last = None
        if token is not None:
            last = Record(token, hashlib.sha256(change.request).digest(), change.response)
        snapshot = Snapshot(change.state, _next_seq(self.snapshot.seq), last)
        payload = self._encoder.encode(snapshot)
        index = self._next
        if index < self._journal.slots and len(payload) <= journal.MAX_PAYLOAD:
            try:
                self._journal.write(index, journal.Journal.encode(self._generation, index, payload),
                                    durable=self.durable)
            except OSError:
                self._undo(index)
                raise
            self._next = index + 1
        else:
            self._compact(snapshot)
        self.snapshot = snapshot

    def _undo(self, index: int) -> None:
        """After a failed append, make sure the record does not count: clear its slot, or
        else start a new generation (which disowns it); if neither works, refuse all
        further changes (a restart then finds whatever reached the disk)."""
        try:
            self._journal.write(index, bytes(journal.SLOT), durable=self.durable)
            return
        except OSError:
            pass
        try:
            self._compact(self.snapshot)
        except OSError as exc:
            self._broken = (f"a journal write failed and could not be undone ({exc.strerror}); "
                            "changes refused until the backend restarts")

    def _compact(self, snapshot: Snapshot) -> None:
        """Make ``snapshot`` the content of ``state.bin``; the journal starts a new generation."""
        generation = _new_generation()
        write_atomic(self.directory / STATE_FILE, encode_snapshot(snapshot, generation), durable=self.durable)
        self._generation, self._next = generation, 0

    def install(self, snapshot: Snapshot, source: str = "migrated device state") -> None:
        """Make ``snapshot`` the directory's state (a migrated-in state); durable on return.

        Refused (:class:`StateError`, nothing changed) unless the current state
        could reach it (:func:`check_successor`). Its sequence number moves past
        both the current and the incoming one.
        """
        if self._broken is not None:
            raise StateError(self._broken)
        check_successor(self.snapshot, snapshot, source)
        new = Snapshot(snapshot.state, _next_seq(max(self.snapshot.seq, snapshot.seq)), snapshot.last)
        self._compact(new)
        self.snapshot = new

    def replay(self, request: bytes, token: RequestToken) -> bytes | None:
        """The recorded answer if (token, request) is the last applied change, else None."""
        last = self.snapshot.last
        if last is None or last.token != token:
            return None
        if last.request_sha256 != hashlib.sha256(request).digest():
            return None
        return last.response

    def close(self) -> None:
        self._journal.close()
        if self._lock_fd >= 0:
            self._unlock(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_regular(path: Path, limit: int) -> bytes:
    """Up to ``limit`` + 1 bytes of a regular file (never blocks on a FIFO); raises OSError."""
    fd = open_regular(path)
    try:
        return read_capped(fd, limit)
    finally:
        os.close(fd)


def _read(path: Path) -> bytes:
    """A state file's bytes, at most MAX_STATE_FILE; raises StateError."""
    try:
        data = _read_regular(path, MAX_STATE_FILE)
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}; refusing to use it") from None
    if len(data) > MAX_STATE_FILE:
        raise StateError(f"{path}: larger than any state file; refusing to use it")
    return data


def _next_seq(seq: int) -> int:
    if seq >= MAX_SEQ:
        raise StateError(f"sequence number {seq} cannot grow any further")
    return seq + 1


def _load_ca(path: Path) -> CertificateAuthority:
    try:
        return load_ca(path)
    except ConfigurationError as exc:
        raise StateError(f"the CA in {path} is unusable ({exc})") from None


def export_state(directory: str | os.PathLike[str], *, now: float | None = None) -> bytes:
    """The device state of ``directory`` as a signed snapshot (the backend may be running).

    Signed with the directory's CA root key: only a directory holding the same
    CA imports it (:func:`import_state`).
    """
    d = Path(directory)
    return sign_snapshot(current_state(d), _load_ca(d / CA_DIR), time.time() if now is None else now)


def current_state(directory: str | os.PathLike[str]) -> Snapshot:
    """The state of ``directory``: ``state.bin`` and its journal (the backend may be running).

    Read without the lock: if a running backend compacts meanwhile (``state.bin``
    replaced), the read is retried.
    """
    d = Path(directory)
    for _ in range(10):
        data = _read(d / STATE_FILE)
        try:
            loaded = _load(d, data)
        except StateError:
            if _read(d / STATE_FILE) == data:
                raise
            continue
        if _read(d / STATE_FILE) == data:
            return loaded.current
    raise StateError(f"{d}: the state kept changing while being read; try again")


def import_state(directory: str | os.PathLike[str], data: bytes, *, replace: bool = False,
                 ca_dir: str | os.PathLike[str] | None = None) -> Snapshot:
    """Install a signed snapshot (:func:`export_state`) into ``directory`` (locked while doing so).

    The snapshot must verify against the directory's CA. A directory without a
    CA takes a copy of ``ca_dir`` (the source's ``ca/``); without one the
    import is refused. An existing state is replaced only with ``replace=True``
    and only by a state it could reach itself (:func:`check_successor`).
    """
    d = Path(directory)
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"cannot create state directory {d}: {exc.strerror}") from None
    lock_fd = StateStore._lock(d)
    try:
        state_path, ca_path = d / STATE_FILE, d / CA_DIR
        given = None if ca_dir is None else _load_ca(Path(ca_dir))
        own = _load_ca(ca_path) if ca_path.exists() else None
        if own is None and given is None:
            raise StateError(
                f"{d} has no CA to check the snapshot's signature with: give the source's CA "
                f"(--ca-dir SOURCE/{CA_DIR}) or copy it to {ca_path} first")
        if own is not None and given is not None and own.certificate_der != given.certificate_der:
            raise StateError(f"{ca_path} holds a different CA than {ca_dir}; refusing to switch roots")
        authority = own or given
        assert authority is not None
        incoming = verify_snapshot(data, authority.certificate, "imported state").snapshot
        if state_path.exists():
            if not replace:
                raise StateError(f"{d} already holds a device state (use --replace to overwrite it)")
            current = _load(d).current
            check_successor(current, incoming, "imported state")
            incoming = Snapshot(incoming.state, _next_seq(max(current.seq, incoming.seq)), incoming.last)
        if own is None:
            try:
                save_ca(authority, ca_path)
            except ConfigurationError as exc:
                raise StateError(f"{d}: {exc}") from None
        journal_path = d / JOURNAL_FILE
        try:
            journal.Journal(journal_path).close()
        except journal.JournalError:  # none yet (or unusable: the state it followed is replaced)
            journal.create(journal_path)
        # A new generation: whatever the journal holds belongs to the replaced state.
        write_atomic(state_path, encode_snapshot(incoming, _new_generation()))
    finally:
        StateStore._unlock(lock_fd)
    return incoming
