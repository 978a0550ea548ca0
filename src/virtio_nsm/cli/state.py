"""`nsm state`: export and import a state directory's device state (for migration)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import click

from .. import persist
from ..errors import ConfigurationError
from . import main
from .device import fail, write_output
from .inputs import InputError, read_input

P = ParamSpec("P")
T = TypeVar("T")


def _state_dir_option(f: Callable[P, T]) -> Callable[P, T]:
    return click.option(
        "--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
        help=f"State directory (default {persist.default_state_dir()}).",
    )(f)


@main.group()
def state() -> None:
    """Export or import the durable device state (PCRs, locks, identity)."""


@state.command("export")
@_state_dir_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True), default="-",
              show_default=True, help="Where to write the snapshot.")
def state_export(state_dir: Path | None, output: str) -> None:
    """Write a snapshot of the device state, signed with the directory's CA root key."""
    directory = state_dir or persist.default_state_dir()
    try:
        if not directory.is_dir():
            fail(f"no state directory at {directory}: nothing to export "
                 f"(`nsm serve --state-dir {directory}` creates one)")
        if not (directory / persist.STATE_FILE).exists():
            fail(f"{directory} holds no device state ({persist.STATE_FILE} is missing): nothing to export")
    except OSError as exc:  # e.g. a name longer than the system takes
        fail(f"--state-dir: cannot use {directory}: {exc.strerror or exc}")
    try:
        data = persist.export_state(directory)
    except persist.StateError as exc:
        fail(str(exc))
    write_output(output, data, private=True)


@state.command("import")
@_state_dir_option
@click.argument("snapshot", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--replace", is_flag=True,
              help="Overwrite an existing state (only with one it could reach: same device, newer).")
@click.option("--ca-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The source's CA directory (DIR/ca): checks the signature, copied into a "
                   "state directory that has no CA yet.")
def state_import(state_dir: Path | None, snapshot: str, replace: bool, ca_dir: Path | None) -> None:
    """Install SNAPSHOT (from `nsm state export`) into a state directory.

    The snapshot must be signed by the state directory's CA: copy the source's
    DIR/ca/ there first, or give it with --ca-dir.
    """
    directory = state_dir or persist.default_state_dir()
    if ca_dir is not None:
        try:  # before the state directory is created or locked: a refusal leaves nothing
            persist.load_ca(ca_dir)
        except (ConfigurationError, ValueError) as exc:
            fail(f"--ca-dir: {exc}")
    try:
        data = read_input(snapshot, limit=persist.MAX_STATE_FILE,
                          what="standard input" if snapshot == "-" else snapshot)
    except InputError as exc:
        fail(str(exc))
    try:
        snap = persist.import_state(directory, data, replace=replace, ca_dir=ca_dir)
    except persist.StateError as exc:
        fail(str(exc))
    except OSError as exc:  # e.g. a state directory under a file, or in /proc
        fail(f"cannot use state directory {directory}: {exc.strerror or exc}")
    click.echo(f"imported state of {snap.state.module_id} into {directory}")
