"""``nsm cuse``: a real ``/dev/<name>`` on this Linux host, answered by our NSM device (CUSE)."""

from __future__ import annotations

import grp
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType

import click

from .. import persist
from ..cuse.server import CuseServer, CuseUnavailable
from ..durable import DurableNsm
from ..errors import ConfigurationError
from ..persist import ROOT_CERT_FILE, load_ca
from . import main


def _mode(value: str) -> int:
    try:
        mode = int(value, 8)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an octal mode such as 0600") from None
    if not 0 <= mode <= 0o777:
        raise click.BadParameter(f"{value!r}: permission bits only (0000 to 0777)")
    return mode


def _gid(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise click.BadParameter(f"no group named {group!r}") from None


def open_device(state_dir: Path | None, ephemeral: bool, ca_dir: Path | None) -> DurableNsm:
    """The device ``nsm cuse`` serves: the same state-directory machinery as ``nsm serve``.

    (Boot measurement options, once ``nsm serve`` has them, apply here too: they
    shape the device before its first request, whatever the transport.)
    """
    ca = load_ca(ca_dir) if ca_dir is not None else None
    if ephemeral:
        return DurableNsm.ephemeral(ca)
    directory = state_dir if state_dir is not None else persist.default_state_dir()
    return DurableNsm.open(directory, ca=ca)


@main.command()
@click.option("--name", default="nsm", show_default=True, metavar="NAME",
              help="Device name: the node is /dev/NAME.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"Directory holding the device state and CA (default "
              f"{persist.default_state_dir()}); created if new, refused if corrupt or in use.")
@click.option("--ephemeral", is_flag=True,
              help="Keep the device state in memory only (fresh PCRs and CA every start).")
@click.option("--ca-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Sign with this CA (root.pem + root-key.pem), as for nsm serve.")
@click.option("--mode", "mode_text", default="0600", show_default=True, metavar="OCTAL",
              help="Permissions of /dev/NAME (nsm.ko's /dev/nsm is 0666).")
@click.option("--group", default=None, metavar="GROUP",
              help="Group owning /dev/NAME (name or number); default root's.")
@click.option("-v", "--verbose", is_flag=True, help="Log debugging detail.")
@click.option("-q", "--quiet", is_flag=True, help="Log only warnings and errors.")
def cuse(name: str, state_dir: Path | None, ephemeral: bool, ca_dir: Path | None,
         mode_text: str, group: str | None, verbose: bool, quiet: bool) -> None:
    """Serve the NSM device as the character device /dev/NAME through CUSE.

    Programs written for Nitro Enclaves open /dev/NAME and issue the Linux NSM
    ioctl (NSM_IOCTL_RAW) unchanged; the answers come from this process, with
    the behaviour of Linux's nsm.ko (response length written back and truncated
    to the caller's buffer, EMSGSIZE over 0x1000 request bytes, EFAULT for bad
    pointers, EINVAL for other ioctls, read and write refused). Openers are
    served one request at a time. State as in nsm serve: every change is on disk
    before it is answered. Needs /dev/cuse (modprobe cuse) and root. SIGTERM or
    SIGINT removes the device.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
        format="nsm cuse: %(levelname)s: %(message)s", stream=sys.stderr)
    if ephemeral and state_dir is not None:
        click.echo("nsm: --ephemeral and --state-dir exclude each other", err=True)
        sys.exit(2)
    try:
        mode = _mode(mode_text)
        gid = _gid(group) if group is not None else None
    except click.BadParameter as exc:
        click.echo(f"nsm: {exc.message}", err=True)
        sys.exit(2)
    try:
        nsm = open_device(state_dir, ephemeral, ca_dir)
    except ConfigurationError as exc:
        click.echo(f"nsm: {exc}", err=True)
        sys.exit(2)
    except persist.StateError as exc:
        click.echo(f"nsm: {exc}", err=True)
        sys.exit(1)
    server: CuseServer | None = None
    try:
        server = CuseServer(name, nsm.handle, mode=mode, gid=gid)

        def stop(signum: int, frame: FrameType | None) -> None:
            assert server is not None
            server.stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        server.start()
    except CuseUnavailable as exc:
        nsm.close()
        click.echo(f"nsm: {exc}", err=True)
        sys.exit(2)
    try:
        assert server.devt is not None
        click.echo(f"NSM device {server.node} (CUSE, char {os.major(server.devt)}:"
                   f"{os.minor(server.devt)}, mode {mode:04o}"
                   + (f", group {group}" if group is not None else "") + ")")
        if nsm.store is not None:
            root = nsm.store.directory / persist.CA_DIR / ROOT_CERT_FILE
            click.echo(f"Device state in {nsm.store.directory}; documents chain to {root}")
        else:
            click.echo("Device state in memory only (--ephemeral): lost when this process ends")
        click.echo(f"Try: nsm describe --device {server.node}")
        sys.stdout.flush()
        server.serve_forever()
    finally:
        server.close()
        nsm.close()
