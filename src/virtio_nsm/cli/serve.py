"""``nsm serve``: run an NSM device as a vhost-user backend (virtio device 33)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

import click

from .. import persist
from ..durable import DurableNsm
from ..errors import ConfigurationError
from ..vhost_user import cpu_qos
from ..vhost_user.daemon import DEFAULT_POLL_US, VhostUserDaemon
from . import main

SOCKET_NAME = "nsm.sock"


def default_socket_path() -> tuple[Path, Path | None]:
    """``$XDG_RUNTIME_DIR/virtio-nsm/nsm.sock``, else a fresh private temp dir.

    Returns the path and the directory to remove afterwards (if we created it).
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        directory = Path(runtime) / "virtio-nsm"
        directory.mkdir(mode=0o700, exist_ok=True)
        return directory / SOCKET_NAME, None
    directory = Path(tempfile.mkdtemp(prefix="virtio-nsm-"))
    return directory / SOCKET_NAME, directory


def qemu_options(path: Path, memory: str = "512M") -> str:
    """The QEMU (>= 10.2) options that attach this backend as a PCI device."""
    chardev_path = str(path).replace(",", ",,")  # QEMU's option escaping
    return (
        f"-object memory-backend-memfd,id=mem,size={memory},share=on "
        "-machine memory-backend=mem "
        f"-chardev socket,id=nsm0,path={chardev_path} "
        "-device vhost-user-test-device-pci,chardev=nsm0,virtio-id=33,num_vqs=1"
    )


@main.command()
@click.option(
    "--vhost-user",
    "--socket-path",  # the name the vhost-user spec's backend conventions use
    "socket_path",
    metavar="SOCK",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Unix socket to listen on (created mode 0600). "
    "Default: $XDG_RUNTIME_DIR/virtio-nsm/nsm.sock, else a new temp dir.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=f"Directory holding the device state and CA (default {persist.default_state_dir()}); "
    "created if new, refused if corrupt or in use by another backend.",
)
@click.option(
    "--ephemeral",
    is_flag=True,
    help="Keep the device state in memory only (fresh PCRs and CA every start; "
    "a crash loses it).",
)
@click.option(
    "--ca-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Sign with this CA (root.pem + root-key.pem, e.g. from `nsm ca init`, or your own "
    "P-384 root). A new state directory keeps a copy; an existing one must hold the same root.",
)
@click.option(
    "--poll-us",
    type=click.IntRange(min=0),
    default=DEFAULT_POLL_US,
    show_default=True,
    metavar="N",
    help="After answering a request, keep polling the virtqueue for N microseconds "
    "(the driver is told not to kick meanwhile): back-to-back requests skip the "
    "kick; no CPU when idle. 0 disables polling.",
)
@click.option(
    "--poll-adaptive/--poll-always",
    default=True,
    show_default=True,
    help="Poll only while short trials show it pays (a polling thread takes a CPU the "
    "guest may need), or after every answer.",
)
@click.option(
    "--cpu-latency-qos",
    is_flag=True,
    help="While requests flow (until 100 ms after the last answer), ask Linux to keep idle "
    f"CPUs responsive (a 0 us request on {cpu_qos.DEVICE}): wake-ups of QEMU and of this "
    "backend then skip deep idle states, which inside a VM host cost tens of microseconds "
    "each. Idle CPUs spin meanwhile. Needs root or write access to the device.",
)
@click.option(
    "--allow-file-memory",
    is_flag=True,
    help="Also map guest memory that is not a memfd sealed against shrinking (QEMU's "
    "memory-backend-file, e.g. on /dev/shm or hugetlbfs). A frontend that then shrinks "
    "the file kills this backend (SIGBUS); memory-backend-memfd needs no such trust.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log every vhost-user message.")
@click.option("-q", "--quiet", is_flag=True, help="Log only warnings and errors.")
def serve(
    socket_path: Path | None,
    state_dir: Path | None,
    ephemeral: bool,
    ca_dir: Path | None,
    poll_us: int,
    poll_adaptive: bool,
    cpu_latency_qos: bool,
    allow_file_memory: bool,
    verbose: bool,
    quiet: bool,
) -> None:
    """Serve an NSM device over vhost-user until SIGTERM or SIGINT.

    The device state (identity, PCRs, locks) and the attestation CA live in a
    state directory: every state change is on disk before it is answered, and a
    backend restarted on the same directory carries on where the last one
    stopped, even after SIGKILL.  A frontend that keeps the vhost-user inflight
    region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) gets a request that was in
    flight during a crash answered exactly once.  Frontends may also disconnect,
    reset and reconnect without touching the state.

    SIGUSR1 logs what happened since the previous SIGUSR1: wake-ups, interrupts and
    the turnaround (from an interrupt sent to the guest's next request noticed).
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
        format="nsm serve: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    cleanup: Path | None = None
    if socket_path is None:
        try:
            socket_path, cleanup = default_socket_path()
        except OSError as exc:
            click.echo(f"nsm: no place for a default socket ({exc}); use --vhost-user SOCK", err=True)
            sys.exit(2)
    if ephemeral and state_dir is not None:
        click.echo("nsm: --ephemeral and --state-dir exclude each other", err=True)
        sys.exit(2)
    qos = None
    if cpu_latency_qos:
        try:
            qos = cpu_qos.CpuLatencyQos.open()
        except cpu_qos.QosUnavailable as exc:
            click.echo(f"nsm: --cpu-latency-qos: {exc.strerror or exc}", err=True)
            sys.exit(2)
    ca = None
    if ca_dir is not None:
        try:
            ca = persist.load_ca(ca_dir)
        except ConfigurationError as exc:
            if qos is not None:
                qos.close()
            click.echo(f"nsm: {exc}", err=True)
            sys.exit(2)
    if ephemeral:
        nsm = DurableNsm.ephemeral(ca)
    else:
        directory = state_dir if state_dir is not None else persist.default_state_dir()
        try:
            nsm = DurableNsm.open(directory, ca=ca)
        except persist.StateError as exc:
            if qos is not None:
                qos.close()
            click.echo(f"nsm: {exc}", err=True)
            sys.exit(1)
    daemon = VhostUserDaemon(
        socket_path,
        nsm.handle,
        device_state=nsm,
        poll_us=poll_us,
        adaptive_polling=poll_adaptive,
        cpu_qos=qos,
        allow_file_memory=allow_file_memory,
    )
    try:
        daemon.bind()
    except OSError as exc:
        daemon.close()
        nsm.close()
        click.echo(f"nsm: cannot listen on {socket_path}: {exc}", err=True)
        sys.exit(2)

    def stop(signum: int, frame: FrameType | None) -> None:
        daemon.stop()

    def stats(signum: int, frame: FrameType | None) -> None:
        daemon.request_stats()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGUSR1, stats)
    click.echo(f"vhost-user NSM backend listening on {socket_path}")
    click.echo(f"QEMU options (size must match -m): {qemu_options(socket_path)}")
    click.echo(f"Client without a VM: nsm describe --device vhost-user:{socket_path}")
    if nsm.store is not None:
        root = nsm.store.directory / persist.CA_DIR / persist.ROOT_CERT_FILE
        click.echo(f"Device state in {nsm.store.directory}; documents chain to {root} "
                   f"(nsm verify --root {root})")
    else:
        click.echo("Device state in memory only (--ephemeral): lost when this process ends")
        if ca_dir is not None:
            root = ca_dir / persist.ROOT_CERT_FILE
            click.echo(f"Documents chain to {root} (nsm verify --root {root})")
    if qos is not None:
        click.echo(f"CPU latency QoS: idle CPUs kept responsive ({qos.path} at 0 us) while "
                   f"requests flow, released {qos.linger_ns // 1_000_000} ms after the last answer")
    sys.stdout.flush()
    try:
        daemon.serve_forever()
    finally:
        daemon.close()
        nsm.close()
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
