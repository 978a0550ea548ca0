"""Start, find, talk to and terminate local enclaves (the library behind ``nsm enclave``).

:func:`start` boots an image (an EIF, or a kernel + ramdisks + cmdline) under QEMU
TCG as a microvm with a fresh NSM device and a vsock device, and returns once
the enclave's init has sent the readiness heartbeat. Each enclave is run by its
own supervisor process (:mod:`virtio_nsm.enclave.supervisor`) in a session of its
own, so it outlives the launching terminal until :meth:`Enclave.terminate`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import virtio_nsm
from virtio_nsm._process import stop_process
from virtio_nsm.enclave import registry
from virtio_nsm.enclave.image import HEARTBEAT_PORT
from virtio_nsm.vm.setup import Toolchain, load_or_setup

#: AF_UNIX paths are limited to 108 bytes (with the NUL); the vsock backend appends ``_PORT``.
MAX_SOCKET_PATH = 100
DEFAULT_MEMORY_MIB = 512
DEFAULT_CPUS = 2
MIN_MEMORY_MIB = 64
DEFAULT_READY_TIMEOUT = 240.0


class EnclaveError(RuntimeError):
    """An enclave could not be started or found; the message says why (and where the logs are)."""


@dataclass
class Section:
    """A byte range of a file: a kernel or ramdisk inside an EIF, or a whole file."""

    path: str
    offset: int
    size: int


@dataclass
class BootImage:
    kernel: Section
    ramdisks: list[Section]
    cmdline: str
    name: str
    eif_path: str | None = None
    default_memory_mib: int | None = None
    default_cpus: int | None = None
    #: nitro-cli's ``Measurements`` object (``HashAlgorithm``, ``PCR0``, ...), if known
    measurements: dict[str, str] | None = None


def image_from_parts(kernel: Path, ramdisks: list[Path], cmdline: str,
                     name: str = "enclave") -> BootImage:
    """An image given as files (what an EIF holds), for tests and experiments."""
    if not ramdisks:
        raise EnclaveError("an enclave image needs at least one ramdisk")
    for p in (kernel, *ramdisks):
        if not p.is_file():
            raise EnclaveError(f"{p}: no such file")
    return BootImage(
        kernel=Section(str(kernel.resolve()), 0, kernel.stat().st_size),
        ramdisks=[Section(str(p.resolve()), 0, p.stat().st_size) for p in ramdisks],
        cmdline=cmdline, name=name)


def image_from_eif(path: Path) -> BootImage:
    """An EIF file: checked (layout, CRC, signature) and measured, as nitro-cli does."""
    from virtio_nsm.eif import Arch, EifError, SectionType, read_eif
    from virtio_nsm.eif.boot import check_image_bootable
    from virtio_nsm.eif.format import SECTION_HEADER_SIZE
    from virtio_nsm.eif.metadata import describe_metadata

    try:
        eif = read_eif(path)
        check_image_bootable(eif)
    except EifError as exc:
        raise EnclaveError(f"{path}: {exc}") from None
    except OSError as exc:
        raise EnclaveError(f"{path}: {exc.strerror or exc}") from None
    if eif.arch is not Arch.X86_64:
        raise EnclaveError(f"{path} is an {eif.arch.value} image; only x86_64 images run here")
    real = str(path.resolve())

    def section(s: Any) -> Section:
        return Section(real, s.offset + SECTION_HEADER_SIZE, s.size)

    kernel = next(s for s in eif.sections if s.type is SectionType.KERNEL)
    cmd = next(s for s in eif.sections if s.type is SectionType.CMDLINE)
    with open(path, "rb") as fh:
        fh.seek(cmd.offset + SECTION_HEADER_SIZE)
        raw = fh.read(cmd.size)
    try:
        cmdline = raw.rstrip(b"\0").decode()
    except UnicodeDecodeError:
        raise EnclaveError(f"{path}: the kernel command line is not UTF-8 text") from None
    if "\0" in cmdline or "\n" in cmdline:
        raise EnclaveError(f"{path}: the kernel command line has NUL or newline characters")
    name = None
    if eif.metadata is not None:
        name, _version, _meta = describe_metadata(eif.metadata)
    return BootImage(
        kernel=section(kernel),
        ramdisks=[section(s) for s in eif.sections if s.type is SectionType.RAMDISK],
        cmdline=cmdline, name=_safe_name(name or path.stem), eif_path=real,
        default_memory_mib=max(1, eif.header.default_mem // 2**20),
        default_cpus=eif.header.default_cpus or None,
        measurements=eif.measurements.to_json())


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", name).strip("-.")[:64]
    return cleaned or "enclave"


@dataclass
class EnclaveOptions:
    """nitro-cli's run-enclave options, plus the parent's identity and our vsock socket."""

    cpu_count: int | None = None
    memory_mib: int | None = None
    enclave_cid: int | None = None
    enclave_name: str | None = None
    debug_mode: bool = False
    parent_instance_id: str | None = None
    parent_role_arn: str | None = None
    vsock_socket: Path | None = None
    ready_timeout: float = DEFAULT_READY_TIMEOUT
    extra_nsm_args: list[str] = field(default_factory=list)


def _package_parent() -> str:
    return str(Path(virtio_nsm.__file__).resolve().parent.parent)


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(":") if p]
    if _package_parent() not in paths:
        env["PYTHONPATH"] = ":".join([_package_parent(), *paths])
    return env


def vsock_backend_command() -> list[str]:
    """The vsock device's backend (``nsm vsock serve``; the supervisor adds its sockets)."""
    return [sys.executable, "-m", "virtio_nsm", "vsock", "serve", "-q"]


def nsm_backend_command(image: BootImage, opts: EnclaveOptions, instance_id: str,
                        enclave_id: str) -> list[str]:
    """``nsm serve`` with the enclave's boot measurements (PCR0-2 from the image, PCR3 from
    the role, PCR4 from the instance id; all zero in debug mode) and the EnclaveID as the
    module id (as on Nitro: documents name their enclave)."""
    argv = [sys.executable, "-m", "virtio_nsm", "serve", "-q"]
    if image.eif_path is not None:
        argv += ["--eif", image.eif_path]
    argv += ["--parent-instance-id", instance_id, "--module-id", enclave_id]
    if opts.parent_role_arn:
        argv += ["--parent-role-arn", opts.parent_role_arn]
    if opts.debug_mode:
        argv += ["--debug-mode"]
    return [*argv, *opts.extra_nsm_args]


class Enclave:
    """A running enclave, as its record in the registry describes it."""

    def __init__(self, run_dir: Path, record: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.record = record

    @property
    def enclave_id(self) -> str:
        return str(self.record["EnclaveID"])

    @property
    def name(self) -> str:
        return str(self.record["EnclaveName"])

    @property
    def cid(self) -> int:
        return int(self.record["EnclaveCID"])

    @property
    def pid(self) -> int:
        return int(self.record["ProcessID"])

    @property
    def vsock_socket(self) -> Path:
        return Path(str(self.record["VsockSocket"]))

    @property
    def debug_mode(self) -> bool:
        return self.record.get("Flags") == "DEBUG_MODE"

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def nsm_root_certificate(self) -> Path:
        """The root certificate the enclave's attestation documents chain to."""
        return self.run_dir / "state" / "ca" / "root.pem"

    def alive(self) -> bool:
        return self.run_dir.is_dir() and registry.pid_alive(self.pid)

    def run_info(self) -> dict[str, Any]:
        """nitro-cli's run-enclave JSON (plus ``VsockSocket``)."""
        keys = ("EnclaveName", "EnclaveID", "ProcessID", "EnclaveCID", "NumberOfCPUs",
                "CPUIDs", "MemoryMiB", "VsockSocket")
        return {k: self.record[k] for k in keys if k in self.record}

    def describe(self) -> dict[str, Any]:
        """nitro-cli's describe-enclaves entry (plus ``VsockSocket``)."""
        keys = ("EnclaveName", "EnclaveID", "ProcessID", "EnclaveCID", "NumberOfCPUs",
                "CPUIDs", "MemoryMiB", "State", "Flags", "Measurements", "VsockSocket")
        return {k: self.record[k] for k in keys if k in self.record}

    def connect(self, port: int, timeout: float = 30.0) -> socket.socket:
        """A stream to the enclave's vsock ``port`` (hybrid vsock: ``CONNECT port``).

        The enclave is ready once its init sent the heartbeat, a moment before its app
        listens: a refused connection is retried until ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                return connect_vsock(self.vsock_socket, port, max(1.0, deadline - time.monotonic()))
            except ConnectionRefusedError:
                if time.monotonic() >= deadline or not self.alive():
                    raise
                time.sleep(0.2)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the enclave has ended; True if it did within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.alive() or self.run_dir.is_dir():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def terminate(self, timeout: float = 20.0) -> bool:
        """Stop the enclave; afterwards no process, socket or file of it remains."""
        if registry.pid_alive(self.pid) and _is_supervisor(self.pid, self.run_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            if self.wait(timeout):
                return True
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        registry.kill_recorded({**self.record, "_dir": str(self.run_dir)})
        registry.remove_enclave_files(self.run_dir, self.record)
        return True


def _is_supervisor(pid: int, run_dir: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"virtio_nsm.enclave.supervisor" in cmdline and str(run_dir).encode() in cmdline


def connect_vsock(path: Path, port: int, timeout: float = 30.0) -> socket.socket:
    """Open a stream to guest port ``port`` through a hybrid vsock socket at ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        sock.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n"):
            chunk = sock.recv(1)
            if not chunk:
                raise ConnectionRefusedError(
                    f"the enclave refused vsock port {port} (nothing listens there?)")
            line += chunk
            if len(line) > 64:
                raise ConnectionError(f"unexpected answer to CONNECT: {line!r}")
        if not line.startswith(b"OK "):
            raise ConnectionError(f"unexpected answer to CONNECT {port}: {line!r}")
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return sock


# ---------------------------------------------------------------------------- lookup


def list_enclaves() -> list[Enclave]:
    base = registry.base_dir()
    registry.reap_stale(base)
    return [Enclave(d, rec) for d, rec in registry.records(base)
            if rec.get("State") == "RUNNING" and registry.pid_alive(int(rec.get("ProcessID", 0)))]


def find(enclave_id: str | None = None, name: str | None = None) -> Enclave:
    for e in list_enclaves():
        if (enclave_id is not None and e.enclave_id == enclave_id) or (
                name is not None and e.name == name):
            return e
    what = f"id {enclave_id}" if enclave_id is not None else f"name {name}"
    raise EnclaveError(f"no running enclave with {what} (see `nsm enclave describe`)")


# ---------------------------------------------------------------------------- start

_INSTANCE_RE = re.compile(r"i-[0-9a-f]{8,17}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _check_options(image: BootImage, opts: EnclaveOptions, base: Path) -> tuple[int, int, str]:
    cpus = opts.cpu_count if opts.cpu_count is not None else (
        image.default_cpus or DEFAULT_CPUS)
    if not 1 <= cpus <= 64:
        raise EnclaveError(f"--cpu-count must be 1..64, not {cpus}")
    memory = opts.memory_mib if opts.memory_mib is not None else (
        image.default_memory_mib or DEFAULT_MEMORY_MIB)
    if memory < MIN_MEMORY_MIB:
        raise EnclaveError(f"--memory must be at least {MIN_MEMORY_MIB} MiB, not {memory}")
    initrd_mib = sum(r.size for r in image.ramdisks) / 2**20
    if memory < 2 * initrd_mib + MIN_MEMORY_MIB:
        raise EnclaveError(f"--memory {memory} MiB is too small for {initrd_mib:.0f} MiB of "
                           f"ramdisks (give at least {int(2 * initrd_mib) + MIN_MEMORY_MIB})")
    instance = opts.parent_instance_id or registry.DEFAULT_INSTANCE_ID
    if not _INSTANCE_RE.fullmatch(instance):
        raise EnclaveError(f"--parent-instance-id {instance!r} is not an EC2 instance id "
                           "(i- and 8 to 17 hex digits)")
    name = opts.enclave_name or image.name
    if not _NAME_RE.fullmatch(name):
        raise EnclaveError(f"enclave name {name!r}: use letters, digits, '.', '_', '-' "
                           "(at most 64)")
    return cpus, memory, name


def _socket_path_ok(path: Path) -> None:
    if len(str(path)) + len(f"_{HEARTBEAT_PORT}") > MAX_SOCKET_PATH:
        raise EnclaveError(f"socket path {path} is too long for a Unix socket; use a shorter "
                           f"--vsock-socket or ${registry.RUN_DIR_ENV}")


def start(image: BootImage, opts: EnclaveOptions | None = None, tc: Toolchain | None = None,
          progress: Callable[[str], None] | None = None) -> Enclave:
    """Boot ``image``; return once the enclave sent its readiness heartbeat."""
    opts = opts or EnclaveOptions()
    tc = tc or load_or_setup()
    base = registry.base_dir()
    registry.reap_stale(base)
    cpus, memory, name = _check_options(image, opts, base)
    vsock_cmd = vsock_backend_command()
    instance = opts.parent_instance_id or registry.DEFAULT_INSTANCE_ID
    with registry.locked(base):
        if name in registry.used_names(base):
            raise EnclaveError(f"an enclave named {name!r} is already running "
                               "(give another --enclave-name)")
        used = registry.used_cids(base)
        if opts.enclave_cid is not None:
            cid = opts.enclave_cid
            if not registry.FIRST_CID <= cid <= registry.MAX_CID:
                raise EnclaveError(f"--enclave-cid must be {registry.FIRST_CID}.."
                                   f"{registry.MAX_CID} (0-3 are reserved), not {cid}")
            if cid in used:
                raise EnclaveError(f"CID {cid} is in use by another enclave")
        else:
            cid = registry.free_cid(base)
        enclave_id = registry.new_enclave_id(instance)
        nsm_cmd = nsm_backend_command(image, opts, instance, enclave_id)
        run_dir = base / enclave_id
        run_dir.mkdir(mode=0o700)
        vsock = (opts.vsock_socket.resolve() if opts.vsock_socket is not None
                 else run_dir / "vsock.sock")
        try:
            _socket_path_ok(run_dir / "vsock-vhost.sock")
            _socket_path_ok(vsock)
            if opts.vsock_socket is not None and (vsock.exists() or vsock.is_symlink()):
                raise EnclaveError(f"--vsock-socket {vsock} exists already")
        except EnclaveError:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        record: dict[str, Any] = {
            "EnclaveName": name, "EnclaveID": enclave_id, "ProcessID": 0,
            "EnclaveCID": cid, "NumberOfCPUs": cpus, "CPUIDs": list(range(cpus)),
            "MemoryMiB": memory, "State": "STARTING",
            "Flags": "DEBUG_MODE" if opts.debug_mode else "NONE",
            "VsockSocket": str(vsock),
            "_dir": str(run_dir), "_started": time.time(), "_eif": image.eif_path,
            "_launcher": os.getpid(),
        }
        if image.measurements is not None:
            record["Measurements"] = image.measurements
        tc_fields = {k: v for k, v in asdict(tc).items() if k != "kernels"}
        spec = {
            "toolchain": tc_fields, "kernel": asdict(image.kernel),
            "ramdisks": [asdict(r) for r in image.ramdisks], "cmdline": image.cmdline,
            "debug_mode": opts.debug_mode, "ready_timeout": opts.ready_timeout,
            "nsm_backend": nsm_cmd, "vsock_backend": vsock_cmd,
        }
        registry.write_json(run_dir / registry.RECORD, record)
        registry.write_json(run_dir / registry.SPEC, spec)
        rfd, wfd = os.pipe()
        try:
            out_fd = os.open(run_dir / "supervisor.out",
                             os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(out_fd, "wb") as out:
                sup = subprocess.Popen(
                    [sys.executable, "-m", "virtio_nsm.enclave.supervisor", str(run_dir),
                     str(wfd)],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    pass_fds=(wfd,), start_new_session=True, env=_python_env())
        finally:
            os.close(wfd)
    if progress is not None:
        progress(f"booting enclave {enclave_id} (CID {cid}, {cpus} vCPU, {memory} MiB) "
                 "under QEMU TCG; waiting for its readiness heartbeat")
    try:
        answer = _read_answer(rfd, opts.ready_timeout + 60, sup)
    except BaseException:  # Ctrl-C while booting: no half-started enclave stays behind
        _cleanup_failed_start(sup, run_dir, record)
        raise
    if answer.get("ok"):
        rec = registry.read_json(run_dir / registry.RECORD) or record
        return Enclave(run_dir, rec)
    _cleanup_failed_start(sup, run_dir, record)
    error = str(answer.get("error") or "the enclave did not start")
    console = answer.get("console_log")
    hint = f"; console log: {console}" if console else ""
    logs = answer.get("log_dir")
    more = f" (all logs in {logs})" if logs else ""
    raise EnclaveError(f"enclave {enclave_id} did not start: {error}{hint}{more}")


def _read_answer(rfd: int, timeout: float, sup: subprocess.Popen[bytes]) -> dict[str, Any]:
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return {"error": f"the supervisor gave no answer within {timeout:.0f} s"}
            r, _, _ = select.select([rfd], [], [], left)
            if not r:
                continue
            chunk = os.read(rfd, 4096)
            if not chunk:
                return {"error": f"the supervisor ended (exit {sup.poll()}) without an answer"}
            buf += chunk
    finally:
        os.close(rfd)
    try:
        data = json.loads(buf.split(b"\n", 1)[0])
    except ValueError:
        return {"error": f"garbled answer from the supervisor: {buf[:200]!r}"}
    return data if isinstance(data, dict) else {"error": "garbled answer from the supervisor"}


def _cleanup_failed_start(sup: subprocess.Popen[bytes], run_dir: Path,
                          record: dict[str, Any]) -> None:
    """Make sure nothing of a failed start keeps running."""
    stop_process(sup, timeout=15)
    if run_dir.exists():
        rec = registry.read_json(run_dir / registry.RECORD) or record
        registry.kill_recorded({**rec, "_dir": str(run_dir)})
        registry.remove_enclave_files(run_dir, rec)


# ---------------------------------------------------------------------------- console


def follow_console(enclave: Enclave, out: IO[bytes], disconnect_timeout: float | None = None,
                   stop: Callable[[], bool] | None = None) -> None:
    """Copy the enclave's console to ``out`` (from its start) until it ends."""
    if not enclave.debug_mode:
        raise EnclaveError(f"enclave {enclave.enclave_id} was not started in debug mode: "
                           "it has no console (as on Nitro; use --debug-mode)")
    deadline = None if disconnect_timeout is None else time.monotonic() + disconnect_timeout
    try:
        fh = open(enclave.console_log, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return
    with fh:
        while True:
            chunk = fh.read(65536)
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            if not enclave.alive() or (stop is not None and stop()):
                return
            if deadline is not None and time.monotonic() >= deadline:
                return
            time.sleep(0.1)
