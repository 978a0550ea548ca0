"""Where running enclaves are recorded: one private directory per enclave.

The base directory is ``$NSM_ENCLAVE_RUN_DIR``, else ``$XDG_RUNTIME_DIR/virtio-nsm-enclaves``,
else ``<tmp>/virtio-nsm-enclaves-<uid>``; it and every enclave directory are 0700 and
must belong to us. An enclave directory (named by its EnclaveID) holds
``enclave.json`` (the record ``describe`` prints), ``spec.json`` (what the
supervisor boots), the sockets, the NSM state and the logs. Starts that fail
leave their logs in ``failed-<EnclaveID>`` (the last few are kept).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RUN_DIR_ENV = "NSM_ENCLAVE_RUN_DIR"
RECORD = "enclave.json"
SPEC = "spec.json"
FAILED_PREFIX = "failed-"
KEEP_FAILED = 5
#: Enclave CIDs start here (0-2 are reserved, 3 is the parent), as on Nitro.
FIRST_CID = 4
MAX_CID = 0xFFFF_FFFE
#: Instance id used when the user gives none (also what PCR4 is measured from).
DEFAULT_INSTANCE_ID = "i-0000000000000000"


class RegistryError(RuntimeError):
    """The run directory is unusable (permissions, ownership); the message says why."""


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise RegistryError(f"{path} is not a directory owned by uid {os.geteuid()}")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def base_dir() -> Path:
    env = os.environ.get(RUN_DIR_ENV)
    if env:
        return _private_dir(Path(env).expanduser().resolve())
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return _private_dir(Path(runtime) / "virtio-nsm-enclaves")
    return _private_dir(Path(tempfile.gettempdir()) / f"virtio-nsm-enclaves-{os.geteuid()}")


@contextlib.contextmanager
def locked(base: Path) -> Iterator[None]:
    """Serialise CID and name allocation between concurrent ``run`` commands."""
    fd = os.open(base / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def new_enclave_id(instance_id: str) -> str:
    """Nitro's shape: ``<instance id>-enc<16 hex digits>``."""
    return f"{instance_id}-enc{secrets.token_hex(8)}"


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if fields and fields[0] == "Z":
            return False
    return True


def record_alive(rec: dict[str, Any]) -> bool:
    """The enclave's supervisor runs (or, before it recorded itself, its launcher does)."""
    pid = rec.get("ProcessID")
    if isinstance(pid, int) and pid > 0:
        return pid_alive(pid)
    launcher = rec.get("_launcher")
    return isinstance(launcher, int) and pid_alive(launcher)


def enclave_dirs(base: Path) -> list[Path]:
    return sorted(p for p in base.iterdir()
                  if p.is_dir() and not p.name.startswith((FAILED_PREFIX, ".")))


def records(base: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every enclave directory with a readable record, oldest first."""
    out: list[tuple[Path, dict[str, Any]]] = []
    for d in enclave_dirs(base):
        rec = read_json(d / RECORD)
        if rec is not None:
            out.append((d, rec))
    out.sort(key=lambda item: float(item[1].get("_started", 0.0)))
    return out


def used_cids(base: Path) -> set[int]:
    used: set[int] = set()
    for _d, rec in records(base):
        cid = rec.get("EnclaveCID")
        if isinstance(cid, int) and record_alive(rec):
            used.add(cid)
    return used


def used_names(base: Path) -> set[str]:
    return {str(rec.get("EnclaveName")) for _d, rec in records(base) if record_alive(rec)}


def free_cid(base: Path) -> int:
    used = used_cids(base)
    cid = FIRST_CID
    while cid in used:
        cid += 1
    return cid


def reap_stale(base: Path) -> list[str]:
    """Remove directories of enclaves whose supervisor is gone (killed); their ids."""
    gone: list[str] = []
    for d in enclave_dirs(base):
        rec = read_json(d / RECORD)
        if rec is None:
            # a start in progress writes its record first; anything else is debris
            spec_age = _age(d)
            if spec_age is not None and spec_age > 60:
                shutil.rmtree(d, ignore_errors=True)
            continue
        if not record_alive(rec):
            kill_recorded(rec)
            remove_enclave_files(d, rec)
            gone.append(str(rec.get("EnclaveID", d.name)))
    return gone


def _age(path: Path) -> float | None:
    import time

    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return None


def kill_recorded(rec: dict[str, Any]) -> None:
    """SIGKILL the processes a record names (QEMU, backends) that are still ours."""
    import signal

    for key in ("QemuPID", "NsmBackendPID", "VsockBackendPID"):
        pid = rec.get(key)
        if isinstance(pid, int) and pid_alive(pid) and _is_ours(pid, rec):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _is_ours(pid: int, rec: dict[str, Any]) -> bool:
    """Guard against a recycled pid: its command line names this enclave's directory."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(rec.get("_dir", "\0")).encode() in cmdline


def remove_enclave_files(d: Path, rec: dict[str, Any]) -> None:
    """The enclave's directory and its sockets outside it (a user-chosen vsock path)."""
    vsock = rec.get("VsockSocket")
    if isinstance(vsock, str) and not vsock.startswith(str(d) + "/"):
        for p in (Path(vsock), Path(f"{vsock}_9000")):
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(p).st_mode):
                    p.unlink()
    shutil.rmtree(d, ignore_errors=True)


def keep_failed(base: Path, d: Path) -> Path:
    """Move a failed start's directory aside (logs only) and prune old ones."""
    for p in list(d.iterdir()):
        if p.is_socket() or p.name in ("state", "kernel", "initrd"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
    dest = base / f"{FAILED_PREFIX}{d.name}"
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(d, dest)
    failed = sorted((p for p in base.iterdir() if p.name.startswith(FAILED_PREFIX)),
                    key=lambda p: p.stat().st_mtime)
    for old in failed[:-KEEP_FAILED]:
        shutil.rmtree(old, ignore_errors=True)
    return dest
