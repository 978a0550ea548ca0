"""One serve configuration, validated before anything is created, and the one place that builds a backend.

:class:`ServeConfig` holds everything ``nsm serve`` accepts (socket, state
directory or ``--ephemeral``, CA, polling, CPU latency QoS, file memory).
:meth:`ServeConfig.validate` checks all of it without creating anything: a bad
option, a socket whose directory cannot be made, a state directory that is a
file, an unreadable CA, a QoS device we cannot open -- each is a
:class:`~virtio_nsm.errors.ConfigurationError` with a one-line reason, before any
directory, key or state file exists.

:func:`serving` then builds the backend in a :class:`contextlib.ExitStack`: the
socket's missing parent directories (mode 0700), the CPU latency request, the
device (for the NSM: its durable state and CA, unless a device is given) and the
daemon bound to its socket.  Leaving the ``with`` block -- normally or by an
exception at any step -- releases whatever was made, in reverse order (the
daemon closes and removes its socket, the state directory is unlocked, a
temporary socket directory is removed, directories made for a socket that
never came to be are removed again).

``nsm serve`` and ``nsm demo`` use it, the tests' in-thread daemon too (with any
device), and ``nsm vm run`` starts ``nsm serve`` itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import persist
from .durable import DurableNsm
from .eif.boot import BootConfig, PreparedBoot
from .eif.format import EifError
from .errors import ConfigurationError
from .nsm.virtio import NsmVirtioDevice
from .vhost_user import cpu_qos, qemu
from .vhost_user.daemon import VhostUserDaemon
from .vhost_user.device import VhostUserDevice

__all__ = ["SOCKET_NAME", "ServeConfig", "Served", "serving"]

SOCKET_NAME = "nsm.sock"
#: sockaddr_un holds 108 bytes, the last one a NUL.
_MAX_SOCKET_PATH = 107


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """A validated serve configuration (build it with :meth:`validate`).

    ``socket_path`` None means a socket in a new private temporary directory,
    removed on exit.  ``state_dir`` is None exactly when ``ephemeral``.
    """

    socket_path: Path | None
    state_dir: Path | None = None
    ephemeral: bool = False
    ca_dir: Path | None = None
    poll_us: int = 0
    adaptive_polling: bool = True
    cpu_qos_device: str | None = None
    cpu_qos_linger_ms: int = cpu_qos.DEFAULT_LINGER_MS
    allow_file_memory: bool = False
    message_timeout: float = 5.0
    #: A production enclave's boot configuration (``--eif`` ...), its image already read and checked.
    boot: PreparedBoot | None = None

    @classmethod
    def validate(
        cls,
        *,
        socket_path: Path | None = None,
        state_dir: Path | None = None,
        ephemeral: bool = False,
        ca_dir: Path | None = None,
        poll_us: int = 0,
        adaptive_polling: bool = True,
        cpu_qos_device: str | None = None,
        cpu_qos_linger_ms: int = cpu_qos.DEFAULT_LINGER_MS,
        allow_file_memory: bool = False,
        message_timeout: float = 5.0,
        boot: BootConfig | None = None,
    ) -> ServeConfig:
        """Check every option; raise :class:`ConfigurationError` before anything is created.

        Without ``socket_path`` the socket is ``$XDG_RUNTIME_DIR/virtio-nsm/nsm.sock``
        if ``$XDG_RUNTIME_DIR`` is a directory, else one in a new temporary directory.
        Without ``state_dir`` (and not ``ephemeral``) the state is in
        :func:`virtio_nsm.persist.default_state_dir`.
        """
        if ephemeral and state_dir is not None:
            raise ConfigurationError("--ephemeral and --state-dir exclude each other")
        if poll_us < 0:
            raise ConfigurationError(f"the polling window must be >= 0 us, not {poll_us}")
        if cpu_qos_linger_ms < 0:
            raise ConfigurationError(f"the CPU latency linger must be >= 0 ms, not {cpu_qos_linger_ms}")
        if not message_timeout > 0:
            raise ConfigurationError(f"the message timeout must be > 0 s, not {message_timeout}")
        if socket_path is None:
            runtime = os.environ.get("XDG_RUNTIME_DIR")
            if runtime and Path(runtime).is_dir():
                socket_path = Path(runtime) / "virtio-nsm" / SOCKET_NAME
        if socket_path is not None:
            socket_path = Path(os.path.abspath(socket_path))
            _check_socket_path(socket_path)
        if not ephemeral:
            state_dir = Path(state_dir) if state_dir is not None else persist.default_state_dir()
            _check_creatable_dir(state_dir, "state directory")
        if ca_dir is not None:
            try:
                persist.load_ca(ca_dir)  # reads only
            except ConfigurationError as exc:
                raise ConfigurationError(str(exc)) from None
        if cpu_qos_device is not None and not os.access(cpu_qos_device, os.W_OK):
            try:
                os.stat(cpu_qos_device)
            except OSError as exc:
                reason = exc.strerror
            else:
                reason = "Permission denied (it needs root or write access)"
            raise ConfigurationError(f"--cpu-latency-qos: cannot open {cpu_qos_device}: {reason}")
        prepared = None
        if boot is not None and not boot.is_default():
            try:
                prepared = boot.prepare()  # reads and checks the image (nothing is created)
            except EifError as exc:
                raise ConfigurationError(f"{boot.eif}: {exc}") from None
            except ValueError as exc:
                raise ConfigurationError(str(exc)) from None
            except OSError as exc:
                raise ConfigurationError(f"cannot read {boot.eif}: {exc.strerror or exc}") from None
        return cls(socket_path, state_dir, ephemeral, ca_dir, poll_us, adaptive_polling,
                   cpu_qos_device, cpu_qos_linger_ms, allow_file_memory, message_timeout, prepared)


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _check_creatable_dir(path: Path, what: str) -> None:
    """``path`` is a directory we can use, or one we can create (nothing is created)."""
    if os.path.lexists(path):
        if not path.is_dir():
            raise ConfigurationError(f"{what} {path} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigurationError(f"{what} {path} is not writable")
        return
    ancestor = _nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise ConfigurationError(f"{what} {path} cannot be created: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigurationError(f"{what} {path} cannot be created: {ancestor} is not writable")


def _check_socket_path(path: Path) -> None:
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise ConfigurationError(
            f"socket path {path} is longer than {_MAX_SOCKET_PATH} bytes (the AF_UNIX limit)"
        )
    _check_creatable_dir(path.parent, "socket directory")
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise ConfigurationError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return  # a stale socket: bind() replaces it
    finally:
        probe.close()
    raise ConfigurationError(f"{path} is in use by another process")


@dataclass(frozen=True, slots=True)
class Served:
    """What :func:`serving` built: the bound daemon and, for the NSM, its durable device."""

    config: ServeConfig
    socket_path: Path
    daemon: VhostUserDaemon
    nsm: DurableNsm | None


def _make_dirs(path: Path, stack: contextlib.ExitStack) -> None:
    """Create ``path`` and its missing parents, mode 0700; removed again on failure."""
    missing: list[Path] = []
    while not os.path.lexists(path):
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(mode=0o700)

    def undo(exc_type: type[BaseException] | None, *rest: object) -> bool:
        if exc_type is not None:
            for directory in missing:
                with contextlib.suppress(OSError):
                    directory.rmdir()
        return False

    stack.push(undo)


@contextlib.contextmanager
def serving(config: ServeConfig, device: VhostUserDevice | None = None) -> Iterator[Served]:
    """Build the backend ``config`` describes (see the module docstring); release it on exit.

    ``device``: serve this device instead of the NSM (then the state and CA options
    are not used).  Raises :class:`~virtio_nsm.persist.StateError` (state directory
    refused), :class:`~virtio_nsm.vhost_user.cpu_qos.QosUnavailable` or
    :class:`OSError` (socket), with nothing left behind.
    """
    with contextlib.ExitStack() as stack:
        if config.socket_path is None:
            tmp = Path(tempfile.mkdtemp(prefix="virtio-nsm-"))
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
            socket_path = tmp / SOCKET_NAME
        else:
            socket_path = config.socket_path
            _make_dirs(socket_path.parent, stack)
        qos = None
        if config.cpu_qos_device is not None:
            qos = cpu_qos.CpuLatencyQos.open(config.cpu_qos_device, linger_ms=config.cpu_qos_linger_ms)
            stack.callback(qos.close)
        nsm = None
        if device is None:
            ca = persist.load_ca(config.ca_dir) if config.ca_dir is not None else None
            initial = config.boot.initial_state() if config.boot is not None else None
            if config.ephemeral:
                nsm = DurableNsm.ephemeral(ca, initial)
            else:
                assert config.state_dir is not None
                nsm = DurableNsm.open(config.state_dir, ca=ca, initial=initial)
            stack.callback(nsm.close)
            if config.boot is not None and config.state_dir is not None:
                try:  # an existing state booted otherwise is never re-measured
                    config.boot.check(nsm.device.state, str(config.state_dir))
                except ConfigurationError as exc:
                    raise persist.StateError(str(exc)) from None
            device = NsmVirtioDevice(nsm.handle, device_state=nsm)
        daemon = VhostUserDaemon(
            socket_path,
            device,
            message_timeout=config.message_timeout,
            poll_us=config.poll_us,
            adaptive_polling=config.adaptive_polling,
            cpu_qos=qos,
            allow_file_memory=config.allow_file_memory,
        )
        stack.callback(daemon.close)
        daemon.bind()
        yield Served(config, socket_path, daemon, nsm)


def qemu_options(served: Served, memory: str = "512M") -> str:
    """The QEMU (>= 10.2) options that attach the served device on PCI."""
    device = served.daemon.device
    qdev = qemu.for_device(device.device_id, device.num_queues)
    return qemu.options_text(qemu.memory_args(memory) + qemu.device_args(qdev, served.socket_path))
