"""Durable device state: a state directory that survives crashes.

Layout of a state directory::

    state.bin   the device state (identity, PCRs, locks) and the record of the
                last state-changing request; replaced atomically on every change
    ca/         the attestation root (root-key.pem 0600, root.pem)
    lock        held (flock) by the one backend using the directory

``state.bin`` is ``MAGIC | format (u16) | length (u32) | body (CBOR) |
SHA-256 of everything before``. It is written to a temporary file, fsync'ed,
renamed over the old one and the directory fsync'ed, so after a crash it holds
either the old or the new state, never a mix. Anything unexpected -- a bad
checksum, a truncated file, another format version, a missing file in an
initialised directory -- is refused with :class:`StateError`; nothing here ever
falls back to a fresh state, because a fresh state would unlock PCRs.

The record of the last change (its transport token, the SHA-256 of its request
and its response) is written in the same replace as the state it produced: a
request that a transport submits again after a crash is recognised and
answered from the record instead of being applied twice.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import stat
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

from . import _strict_cbor
from .cose import der_to_raw, raw_to_der
from .errors import ConfigurationError
from .nsm.device import Commit, DeviceState
from .nsm.pcr import MAX_PCRS, Digest, PcrBank
from .nsm.pki import CertificateAuthority
from .nsm.protocol import MAX_RESPONSE_SIZE

MAGIC: Final = b"NSMSTATE"
FORMAT_VERSION: Final = 1
STATE_FILE: Final = "state.bin"
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
_MAX_TOKEN_PARTS: Final = 4
_MAX_U64: Final = 2**64 - 1


class StateError(Exception):
    """A state directory or state file cannot be used as it is."""


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "virtio-nsm"


Token = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Record:
    """The last state change: which request (token + hash) and what it answered."""

    token: Token
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
            "token": list(last.token), "request_sha256": last.request_sha256,
            "response": last.response,
        },
        **extra,
    }


def encode_snapshot(snapshot: Snapshot) -> bytes:
    """The bytes of ``state.bin`` for ``snapshot`` (checksummed, not signed)."""
    body = cbor2.dumps(_body(snapshot))
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, len(body)) + body
    return head + hashlib.sha256(head).digest()


def decode_snapshot(data: bytes, source: str = "state") -> Snapshot:
    """Parse and check a state file; raise :class:`StateError` saying what is wrong."""
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
    if version != FORMAT_VERSION:
        raise bad(f"format version {version}, this virtio-nsm reads version {FORMAT_VERSION}")
    if len(data) != _HEADER.size + length + _DIGEST_SIZE:
        raise bad(f"length mismatch ({len(data)} bytes, header says {_HEADER.size + length + _DIGEST_SIZE})")
    if hashlib.sha256(data[:-_DIGEST_SIZE]).digest() != data[-_DIGEST_SIZE:]:
        raise bad("checksum mismatch (corrupt)")
    snapshot, _ = _parse_body(data[_HEADER.size:-_DIGEST_SIZE], bad, signed=False)
    return snapshot


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
    snapshot, saved_at = _parse_body(head[_HEADER.size:], bad, signed=True)
    assert saved_at is not None
    return SignedSnapshot(snapshot, saved_at / 1000)


_BODY_KEYS: Final = frozenset({"module_id", "version", "digest", "pcrs", "locked", "seq", "last"})
_RECORD_KEYS: Final = frozenset({"token", "request_sha256", "response"})


def _parse_body(raw: bytes, bad: Any, *, signed: bool) -> tuple[Snapshot, int | None]:
    """The snapshot in a body (and its ``saved_at``), strictly checked; raises ``bad(...)``."""
    try:
        body: Any = _strict_cbor.loads(raw, max_depth=3)
        keys = _BODY_KEYS | {"saved_at"} if signed else _BODY_KEYS
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
        saved_at = _u(body["saved_at"], MAX_SEQ, "saved_at") if signed else None
        last_raw = body["last"]
        last = None
        if last_raw is not None:
            if type(last_raw) is not dict or set(last_raw) != _RECORD_KEYS:
                raise StateError("malformed record of the last change")
            token = _typed(last_raw["token"], list)
            if not 1 <= len(token) <= _MAX_TOKEN_PARTS:
                raise StateError("malformed token in the record of the last change")
            digest = _typed(last_raw["request_sha256"], bytes)
            response = _typed(last_raw["response"], bytes)
            if len(digest) != 32 or len(response) > MAX_RESPONSE_SIZE:
                raise StateError("malformed record of the last change")
            last = Record(tuple(_u(t, _MAX_U64, "token") for t in token), digest, response)
    except StateError as exc:
        raise bad(str(exc)) from None
    except _strict_cbor.StrictCborError as exc:
        raise bad(f"invalid CBOR ({exc})") from None
    except (TypeError, ValueError, ConfigurationError) as exc:
        raise bad(f"invalid contents ({exc})") from None
    return Snapshot(state, seq, last), saved_at


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


class StateStore:
    """One backend's hold on a state directory (see the module docstring).

    Use :meth:`open`; pass :meth:`commit` to :class:`~virtio_nsm.NsmDevice` as
    its ``commit`` hook. ``durable=False`` skips fsync (benchmarks only).
    """

    def __init__(self, directory: Path, lock_fd: int, snapshot: Snapshot, ca: CertificateAuthority,
                 durable: bool) -> None:
        self.directory = directory
        self._lock_fd = lock_fd
        self.snapshot = snapshot
        self.ca = ca
        self.durable = durable

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        create: bool = True,
        initial: DeviceState | None = None,
        ca: CertificateAuthority | None = None,
        durable: bool = True,
    ) -> StateStore:
        """Lock and load ``directory``; initialise it first if it is new and ``create``.

        ``initial`` and ``ca`` are used only to initialise a new directory (by
        default: a fresh boot state and a fresh CA); an existing directory's
        own state and CA always win.
        """
        d = Path(directory)
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create state directory {d}: {exc.strerror}") from None
        lock_fd = cls._lock(d)
        try:
            state_path, ca_path = d / STATE_FILE, d / CA_DIR
            if state_path.exists():
                snapshot = decode_snapshot(_read(state_path), str(state_path))
                try:
                    authority = load_ca(ca_path)
                except ConfigurationError as exc:
                    raise StateError(f"{d}: the CA is unusable ({exc}); refusing to start") from None
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
                snapshot = Snapshot(initial or DeviceState.at_boot(), 0)
                write_atomic(state_path, encode_snapshot(snapshot), durable=durable)
            return cls(d, lock_fd, snapshot, authority, durable)
        except BaseException:
            os.close(lock_fd)
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
            owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StateError(f"{d} is in use by another backend (pid {owner})") from None
            raise StateError(f"cannot lock {d}: {exc.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    @property
    def state(self) -> DeviceState:
        return self.snapshot.state

    def commit(self, change: Commit) -> None:
        """Make ``change`` durable; raises OSError (and changes nothing) if it cannot."""
        token = change.token
        last = None
        if isinstance(token, tuple) and all(type(t) is int for t in token):
            last = Record(token, hashlib.sha256(change.request).digest(), change.response)
        snapshot = Snapshot(change.state, _next_seq(self.snapshot.seq), last)
        write_atomic(self.directory / STATE_FILE, encode_snapshot(snapshot), durable=self.durable)
        self.snapshot = snapshot

    def install(self, snapshot: Snapshot, source: str = "migrated device state") -> None:
        """Make ``snapshot`` the directory's state (a migrated-in state); durable on return.

        Refused (:class:`StateError`, nothing changed) unless the current state
        could reach it (:func:`check_successor`). Its sequence number moves past
        both the current and the incoming one.
        """
        check_successor(self.snapshot, snapshot, source)
        new = Snapshot(snapshot.state, _next_seq(max(self.snapshot.seq, snapshot.seq)), snapshot.last)
        write_atomic(self.directory / STATE_FILE, encode_snapshot(new), durable=self.durable)
        self.snapshot = new

    def replay(self, request: bytes, token: Token) -> bytes | None:
        """The recorded answer if (token, request) is the last applied change, else None."""
        last = self.snapshot.last
        if last is None or last.token != token:
            return None
        if last.request_sha256 != hashlib.sha256(request).digest():
            return None
        return last.response

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_regular(path: Path, limit: int) -> bytes:
    """Up to ``limit`` + 1 bytes of a regular file (never blocks on a FIFO); raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
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
    path = d / STATE_FILE
    snapshot = decode_snapshot(_read(path), str(path))
    return sign_snapshot(snapshot, _load_ca(d / CA_DIR), time.time() if now is None else now)


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
            current = decode_snapshot(_read(state_path), str(state_path))
            check_successor(current, incoming, "imported state")
            incoming = Snapshot(incoming.state, _next_seq(max(current.seq, incoming.seq)), incoming.last)
        if own is None:
            try:
                save_ca(authority, ca_path)
            except ConfigurationError as exc:
                raise StateError(f"{d}: {exc}") from None
        write_atomic(state_path, encode_snapshot(incoming))
    finally:
        os.close(lock_fd)
    return incoming
