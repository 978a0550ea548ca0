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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import cbor2

from .errors import ConfigurationError
from .nsm.device import Commit, DeviceState
from .nsm.pcr import Digest, PcrBank
from .nsm.pki import CertificateAuthority

MAGIC: Final = b"NSMSTATE"
FORMAT_VERSION: Final = 1
STATE_FILE: Final = "state.bin"
CA_DIR: Final = "ca"
LOCK_FILE: Final = "lock"
_HEADER: Final = struct.Struct(">8sHI")
_DIGEST_SIZE: Final = 32
#: A state file is small (32 PCRs and a short record); anything larger is not ours.
MAX_STATE_FILE: Final = 64 * 1024


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

def encode_snapshot(snapshot: Snapshot) -> bytes:
    state, bank = snapshot.state, snapshot.state.pcrs
    last = snapshot.last
    body = cbor2.dumps({
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
    })
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, len(body)) + body
    return head + hashlib.sha256(head).digest()


def decode_snapshot(data: bytes, source: str = "state") -> Snapshot:
    """Parse and check a state file; raise :class:`StateError` saying what is wrong."""
    def bad(what: str) -> StateError:
        return StateError(f"{source}: {what}; refusing to use it")

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
    try:
        body: Any = cbor2.loads(data[_HEADER.size:-_DIGEST_SIZE])
        state = DeviceState(
            module_id=_typed(body["module_id"], str),
            pcrs=PcrBank(Digest(_typed(body["digest"], str)),
                         tuple(_typed(v, bytes) for v in _typed(body["pcrs"], list)),
                         _typed(body["locked"], int)),
            version=tuple(_typed(v, int) for v in _typed(body["version"], list)),
        )
        seq = _typed(body["seq"], int)
        last_raw = body["last"]
        last = None
        if last_raw is not None:
            last = Record(tuple(_typed(t, int) for t in _typed(last_raw["token"], list)),
                          _typed(last_raw["request_sha256"], bytes),
                          _typed(last_raw["response"], bytes))
    except StateError as exc:
        raise bad(str(exc)) from None
    except (KeyError, TypeError, ValueError, ConfigurationError, cbor2.CBORDecodeError) as exc:
        raise bad(f"invalid contents ({type(exc).__name__}: {exc})") from None
    return Snapshot(state, seq, last)


def _typed(value: Any, kind: type) -> Any:
    if type(value) is not kind:
        raise StateError(f"expected {kind.__name__}, found {type(value).__name__}")
    return value


# -- the store -------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` (mode 0600): old or new content after any crash."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    if durable:
        _fsync_dir(path.parent)


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
                    authority = CertificateAuthority.load(ca_path)
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
                authority.save(ca_path)
                snapshot = Snapshot(initial or DeviceState.at_boot(), 0)
                write_atomic(state_path, encode_snapshot(snapshot), durable=durable)
            return cls(d, lock_fd, snapshot, authority, durable)
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
        """Make ``change`` durable; raises OSError (and changes nothing) if it cannot."""
        token = change.token
        last = None
        if isinstance(token, tuple) and all(type(t) is int for t in token):
            last = Record(token, hashlib.sha256(change.request).digest(), change.response)
        snapshot = Snapshot(change.state, self.snapshot.seq + 1, last)
        write_atomic(self.directory / STATE_FILE, encode_snapshot(snapshot), durable=self.durable)
        self.snapshot = snapshot

    def install(self, snapshot: Snapshot) -> None:
        """Make ``snapshot`` the directory's state (a migrated-in state); durable on return.

        Its sequence number moves past both the current and the incoming one.
        """
        new = Snapshot(snapshot.state, max(self.snapshot.seq, snapshot.seq) + 1, snapshot.last)
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
            self._unlock(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read(path: Path) -> bytes:
    # O_NONBLOCK: opening a FIFO must not wait for a writer; only a regular file is read.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}; refusing to start") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StateError(f"cannot read {path}: not a regular file; refusing to start")
        with open(fd, "rb", closefd=False) as fh:
            data = fh.read(MAX_STATE_FILE + 1)
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}; refusing to start") from None
    finally:
        os.close(fd)
    if len(data) > MAX_STATE_FILE:
        raise StateError(f"{path}: larger than any state file; refusing to use it")
    return data


def export_state(directory: str | os.PathLike[str]) -> bytes:
    """The state file of ``directory``, checked (the backend may be running)."""
    path = Path(directory) / STATE_FILE
    data = _read(path)
    decode_snapshot(data, str(path))
    return data


def import_state(directory: str | os.PathLike[str], data: bytes, *, replace: bool = False) -> Snapshot:
    """Install an exported state into ``directory`` (locked while doing so).

    The directory's CA is kept (or created if absent). An existing state is
    replaced only with ``replace=True``.
    """
    snapshot = decode_snapshot(data, "imported state")
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock_fd = StateStore._lock(d)
    try:
        if (d / STATE_FILE).exists() and not replace:
            raise StateError(f"{d} already holds a device state (use --replace to overwrite it)")
        if not (d / CA_DIR).exists():
            CertificateAuthority.generate().save(d / CA_DIR)
        write_atomic(d / STATE_FILE, encode_snapshot(snapshot))
    finally:
        StateStore._unlock(lock_fd)
    return snapshot
