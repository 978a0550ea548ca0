"""``nsm serve``: run an NSM device as a vhost-user backend (virtio device 33)."""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import click

from .. import persist
from ..errors import ConfigurationError
from ..nsm.pki import CertificateAuthority
from ..persist import ROOT_CERT_FILE, default_ca_dir
from ..serving import ServeConfig, Served, qemu_options, serving
from ..vhost_user import cpu_qos
from ..vhost_user.daemon import DEFAULT_POLL_US
from . import main
from .eif import boot_config, boot_options


@main.command()
@click.option(
    "--vhost-user",
    "--socket-path",  # the name the vhost-user spec's backend conventions use
    "socket_path",
    metavar="SOCK",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Unix socket to listen on (created mode 0600; missing parent directories are "
    "created mode 0700). "
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
    help="Keep the device state in memory only (fresh PCRs every start; a crash loses "
    "it). Writes nothing: signs with the default CA if it exists, else with a throwaway "
    "root that it prints.",
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
@boot_options
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
    **boot: Any,
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

    --eif F [--parent-instance-id ID] [--parent-role-arn ARN] [--debug-mode] makes
    the device report a production enclave's boot PCRs (and --pcr N=HEX sets any
    of PCR0-15); an existing state directory booted otherwise is refused.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
        format="nsm serve: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = ServeConfig.validate(
            socket_path=socket_path,
            state_dir=state_dir,
            ephemeral=ephemeral,
            ca_dir=ca_dir,
            poll_us=poll_us,
            adaptive_polling=poll_adaptive,
            cpu_qos_device=cpu_qos.DEVICE if cpu_latency_qos else None,
            allow_file_memory=allow_file_memory,
            boot=boot_config(**boot),
        )
    except ConfigurationError as exc:
        click.echo(f"nsm: {exc}", err=True)
        sys.exit(2)
    default_root: bytes | None = None  # the default CA's certificate, when it signs
    if ca_dir is None and (ephemeral or (config.state_dir is not None
                                         and _new_state_dir(config.state_dir))):
        # One CA signs everything by default (see `nsm ca --help`): a new state
        # directory starts with a copy of it (created if need be); --ephemeral,
        # which writes nothing, uses it only if it exists. An existing state
        # directory keeps the root it has.
        try:
            authority, default_root = _default_ca(create=not ephemeral)
        except ConfigurationError as exc:
            click.echo(f"nsm: {exc}", err=True)
            sys.exit(2)
        if authority is not None:
            config = dataclasses.replace(config, ca_dir=default_ca_dir())
    try:
        with serving(config) as served:
            daemon = served.daemon

            def stop(signum: int, frame: FrameType | None) -> None:
                daemon.stop()

            def stats(signum: int, frame: FrameType | None) -> None:
                daemon.request_stats()

            signal.signal(signal.SIGTERM, stop)
            signal.signal(signal.SIGINT, stop)
            signal.signal(signal.SIGUSR1, stats)
            _announce(served)  # once signals stop us cleanly: a reader may SIGTERM at once
            if ca_dir is None:
                _announce_default_root(served, default_root)
            daemon.serve_forever()
    except persist.StateError as exc:
        click.echo(f"nsm: {exc}", err=True)
        sys.exit(1)
    except cpu_qos.QosUnavailable as exc:
        click.echo(f"nsm: --cpu-latency-qos: {exc.strerror or exc}", err=True)
        sys.exit(2)
    except (ConfigurationError, OSError) as exc:
        where = config.socket_path or "a temporary socket"
        click.echo(f"nsm: cannot serve on {where}: {exc}", err=True)
        sys.exit(2)


def _new_state_dir(directory: Path) -> bool:
    """Whether ``nsm serve`` would initialise ``directory`` (it holds no state and no CA)."""
    return not (directory / persist.STATE_FILE).exists() and not (directory / persist.CA_DIR).exists()


def _default_ca(*, create: bool) -> tuple[CertificateAuthority | None, bytes | None]:
    """The default CA and its certificate (PEM); announces it when this call created it."""
    from .device import default_ca

    authority, created = default_ca(create=create)
    if created:
        click.echo(f"nsm: created the default CA in {default_ca_dir()} (`nsm ca root` prints "
                   "its root)", err=True)
    return authority, None if authority is None else authority.certificate_pem


def _announce_default_root(served: Served, default_root: bytes | None) -> None:
    """Which root documents chain to, when no --ca-dir said so (see `nsm ca --help`)."""
    nsm = served.nsm
    if nsm is None:
        return
    signing_root = nsm.device.ca.certificate_pem
    if nsm.store is not None:
        if _is_default_root(signing_root):
            click.echo("That is the default CA's root: `nsm ca root` prints it")
        else:
            click.echo(f"That is not the default CA's root (this state directory was made "
                       f"with another one): `nsm ca root --state-dir {nsm.store.directory}` "
                       "prints it")
    elif default_root is not None:
        click.echo("That is the default CA's root: `nsm ca root` prints it")
    else:
        click.echo("Documents chain to this throwaway root (no default CA exists; "
                   "`nsm ca init` makes one); save it to verify them with "
                   "nsm verify DOC --root FILE:")
        click.echo(signing_root.decode("ascii"), nl=False)
    sys.stdout.flush()


def _is_default_root(certificate_pem: bytes) -> bool:
    try:
        return (default_ca_dir() / ROOT_CERT_FILE).read_bytes() == certificate_pem
    except OSError:
        return False


def _announce(served: Served) -> None:
    socket_path, nsm, config = served.socket_path, served.nsm, served.config
    click.echo(f"vhost-user NSM backend listening on {socket_path}")
    click.echo(f"QEMU options (size must match -m): {qemu_options(served)}")
    click.echo(f"Client without a VM: nsm describe --device vhost-user:{socket_path}")
    if nsm is not None and nsm.store is not None:
        root = nsm.store.directory / persist.CA_DIR / persist.ROOT_CERT_FILE
        click.echo(f"Device state in {nsm.store.directory}; documents chain to {root} "
                   f"(nsm verify --root {root})")
    else:
        click.echo("Device state in memory only (--ephemeral): lost when this process ends")
        if config.ca_dir is not None:
            root = config.ca_dir / persist.ROOT_CERT_FILE
            click.echo(f"Documents chain to {root} (nsm verify --root {root})")
    if config.boot is not None and nsm is not None:
        source = f"from {config.boot.config.eif}" if config.boot.config.eif else "as configured"
        click.echo(f"Module id {nsm.device.state.module_id}; boot PCRs {source}: "
                   + ", ".join(f"PCR{i} {v.hex()[:16]}..." for i, v in sorted(config.boot.pcrs.items())
                               if any(v)) or "all zero")
    qos = served.daemon.cpu_qos
    if qos is not None:
        click.echo(f"CPU latency QoS: idle CPUs kept responsive ({qos.path} at 0 us) while "
                   f"requests flow, released {qos.linger_ns // 1_000_000} ms after the last answer")
    sys.stdout.flush()
