"""``nsm vsock serve``: a virtio-vsock device (ID 19) as a vhost-user backend, host side on Unix sockets."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType

import click

from ..errors import ConfigurationError
from ..serving import ServeConfig, serving
from ..vhost_user import qemu
from ..vsock.constants import NITRO_PARENT_CID, NUM_QUEUES, VIRTIO_ID_VSOCK, VMADDR_CID_ANY
from ..vsock.device import VsockDevice
from . import main

#: ``sockaddr_un`` holds 107 bytes and a NUL; ``PATH_<port>`` adds up to 11.
_MAX_UDS_PATH = 107 - len("_4294967295")


def qemu_options(path: Path, memory: str = "512M", *, microvm: bool = False) -> str:
    """QEMU options attaching this backend: ``vhost-user-vsock-pci`` (q35) or ``-device`` (microvm)."""
    device = qemu.for_device(VIRTIO_ID_VSOCK, NUM_QUEUES)
    args = qemu.memory_args(memory) + qemu.device_args(
        device, path, chardev="vsock0", transport="mmio" if microvm else "pci"
    )
    return qemu.options_text(["-M", "microvm", *args] if microvm else args)


@main.group()
def vsock() -> None:
    """virtio-vsock: guest AF_VSOCK sockets bridged to host Unix sockets."""


@vsock.command()
@click.option(
    "--vhost-user",
    "--socket-path",
    "socket_path",
    metavar="SOCK",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Unix socket QEMU connects to (vhost-user; created mode 0600).",
)
@click.option(
    "--guest-cid",
    required=True,
    type=click.IntRange(NITRO_PARENT_CID, VMADDR_CID_ANY - 1),
    metavar="N",
    help="The guest's context ID (3 or more; enclaves use 4 and up, their parent is CID 3).",
)
@click.option(
    "--uds-path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="PATH",
    help="Host side: programs connect here and write 'CONNECT <port>\\n' to reach the guest's "
    "port (answer: 'OK <local port>\\n'); a guest connecting to port P of CID 2 or 3 reaches "
    "the Unix socket PATH_P. Created mode 0600.",
)
@click.option(
    "--poll-us",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="N",
    help="After serving the rings, keep polling them for N microseconds (the guest is told "
    "not to kick meanwhile; adaptive: kept only while it pays). 0: wait for kicks.",
)
@click.option(
    "--allow-file-memory",
    is_flag=True,
    help="Also map guest memory that is not a memfd sealed against shrinking "
    "(memory-backend-file); a frontend that shrinks the file kills this backend.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log every vhost-user message and connection.")
@click.option("-q", "--quiet", is_flag=True, help="Log only warnings and errors.")
def serve(
    socket_path: Path,
    guest_cid: int,
    uds_path: Path,
    poll_us: int,
    allow_file_memory: bool,
    verbose: bool,
    quiet: bool,
) -> None:
    """Serve a virtio-vsock device over vhost-user until SIGTERM or SIGINT.

    The guest uses Linux's own driver (vmw_vsock_virtio_transport); QEMU reads the
    guest CID from this backend.  Both Unix sockets are removed on exit.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
        format="nsm vsock serve: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = ServeConfig.validate(
            socket_path=socket_path, ephemeral=True, poll_us=poll_us, allow_file_memory=allow_file_memory
        )
        uds_path = Path(os.path.abspath(uds_path))
        if config.socket_path == uds_path:
            raise ConfigurationError("--vhost-user and --uds-path must differ")
        if len(os.fsencode(uds_path)) > _MAX_UDS_PATH:
            raise ConfigurationError(
                f"--uds-path {uds_path} is longer than {_MAX_UDS_PATH} bytes (PATH_<port> must fit AF_UNIX)"
            )
        if not uds_path.parent.is_dir():
            raise ConfigurationError(f"--uds-path: {uds_path.parent} is not a directory")
    except ConfigurationError as exc:
        click.echo(f"nsm: {exc}", err=True)
        sys.exit(2)
    try:
        with serving(config, VsockDevice(guest_cid, uds_path)) as served:
            daemon = served.daemon

            def stop(signum: int, frame: FrameType | None) -> None:
                daemon.stop()

            signal.signal(signal.SIGTERM, stop)
            signal.signal(signal.SIGINT, stop)
            path = served.socket_path
            click.echo(f"vhost-user vsock backend listening on {path} (guest CID {guest_cid})")
            click.echo(f"QEMU options, q35 (size must match -m): {qemu_options(path)}")
            click.echo(f"QEMU options, microvm: {qemu_options(path, microvm=True)}")
            click.echo(
                f"Host side: connect to {uds_path} and send 'CONNECT <port>\\n'; "
                f"guest connections to CID 2 or 3 port P go to {uds_path}_P"
            )
            sys.stdout.flush()
            daemon.serve_forever()
    except (ConfigurationError, OSError) as exc:
        click.echo(f"nsm: cannot serve: {exc}", err=True)
        sys.exit(2)
