"""``nsm enclave``: run enclave images locally, with nitro-cli's options and JSON.

``run`` (run-enclave), ``describe`` (describe-enclaves), ``console``, ``terminate``
(terminate-enclave) keep nitro-cli's option and field names; ``build-sample``
builds the project's sample image. Progress goes to stderr, JSON to stdout.
Exit status: 0 done, 1 the enclave failed, 2 bad input.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from ..enclave import image as enclave_image
from ..enclave import launcher
from ..enclave.registry import RegistryError
from ..vm.setup import SetupError, load_or_setup
from . import main
from .inputs import InputError, read_input


def _fail(msg: str, code: int = 1) -> NoReturn:
    click.echo(f"nsm enclave: {msg}", err=True)
    sys.exit(code)


def _progress(msg: str) -> None:
    click.echo(f"[nsm enclave] {msg}", err=True)


def _print(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


@main.group("enclave")
def enclave() -> None:
    """Run enclave images (EIF) locally: QEMU TCG microvm, our NSM and vsock devices.

    Enclaves outlive the command that started them; `nsm enclave terminate`
    stops them. The parent side of an enclave's vsock is a Unix socket
    (Firecracker's hybrid convention, `VsockSocket` in the JSON): write
    `CONNECT <port>\\n` to reach the enclave's port; the enclave's connections
    to CID 3 port P reach a Unix socket listening at `<VsockSocket>_P`.
    """


@enclave.command("build-sample")
@click.option("--output-file", "-o", "output", type=click.Path(dir_okay=False, path_type=Path),
              required=True, help="Where to write the image (EIF).")
@click.option("--name", default=enclave_image.SAMPLE_NAME, show_default=True,
              help="ImageName in the image's metadata.")
def build_sample(output: Path, name: str) -> None:
    """Build the sample enclave image from Debian's kernel (the `nsm vm setup` cache).

    Its init does what AWS's does (drivers, heartbeat to CID 3 port 9000, then
    the app); the app serves attestation documents on vsock port 5000: send 32
    bytes of nonce, receive the NSM's CBOR response. Prints nitro-cli's
    build-enclave JSON (Measurements).
    """
    try:
        tc = load_or_setup(progress=_progress)
        _progress(f"building {output} from kernel {enclave_image.enclave_kernel(tc).version}")
        result = enclave_image.build_sample_eif(tc, output, name=name, progress=_progress)
    except (SetupError, OSError, ValueError) as exc:
        _fail(str(exc))
    _print(result)


#: Far above any real config (a handful of keys).
_CONFIG_LIMIT = 1 << 16

#: nitro-cli's run-enclave config keys (its ``run_args``), plus ours; null means "not given".
_CONFIG_KEYS: dict[str, type] = {
    "eif_path": str, "cpu_count": int, "cpu_ids": list, "memory_mib": int, "enclave_cid": int,
    "enclave_name": str, "debug_mode": bool, "attach_console": bool, "parent_instance_id": str,
    "parent_role_arn": str, "vsock_socket": str}


def _load_config(path: Path) -> dict[str, Any]:
    try:
        # bounded, and only a regular file: a FIFO or /dev/zero would never end
        raw = read_input(str(path), limit=_CONFIG_LIMIT, what=f"--config {path}", allow_stdin=False)
    except InputError as exc:
        _fail(str(exc), 2)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        _fail(f"--config {path}: {exc}", 2)
    if not isinstance(data, dict):
        _fail(f"--config {path}: not a JSON object", 2)
    for key, value in list(data.items()):
        kind = _CONFIG_KEYS.get(key)
        if kind is None:
            _fail(f"--config {path}: unknown key {key!r} (known: {', '.join(_CONFIG_KEYS)})", 2)
        if value is None:
            del data[key]
            continue
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            _fail(f"--config {path}: {key} must be a {kind.__name__}", 2)
    ids = data.pop("cpu_ids", None)
    if ids is not None:
        # CPUs are vCPU threads here: the ids only give their number
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                              for i in ids) or len(set(ids)) != len(ids):
            _fail(f"--config {path}: cpu_ids must be a list of distinct CPU numbers", 2)
        if "cpu_count" in data:
            _fail(f"--config {path}: give cpu_count or cpu_ids, not both", 2)
        data["cpu_count"] = len(ids)
    if "eif_path" not in data:
        _fail(f"--config {path}: eif_path is missing", 2)
    return data


@enclave.command("run")
@click.option("--eif-path", type=click.Path(dir_okay=False, path_type=Path),
              help="The enclave image.")
@click.option("--cpu-count", type=int, help="vCPUs (default: the image header's).")
@click.option("--memory", "memory", type=int, help="Memory in MiB (default: the image header's).")
@click.option("--enclave-cid", type=int, help="The enclave's CID (default: the first free >= 4).")
@click.option("--enclave-name", help="A name (default: the image's name).")
@click.option("--debug-mode", is_flag=True,
              help="Debug mode: a console, and every boot PCR zero (as on Nitro).")
@click.option("--attach-console", is_flag=True,
              help="Follow the console once the enclave runs (needs --debug-mode).")
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path),
              help="A JSON file with the options, nitro-cli's keys (eif_path, cpu_count or "
              "cpu_ids, memory_mib, enclave_cid, enclave_name, debug_mode, attach_console; null: "
              "not given) and ours (parent_instance_id, parent_role_arn, vsock_socket); excludes "
              "the other options.")
@click.option("--parent-instance-id", help="The parent's instance id (PCR4; part of EnclaveID).")
@click.option("--parent-role-arn", help="The parent's IAM role ARN (PCR3).")
@click.option("--vsock-socket", type=click.Path(path_type=Path),
              help="The parent side's Unix socket (default: in the enclave's run directory).")
@click.option("--ready-timeout", type=float, default=launcher.DEFAULT_READY_TIMEOUT,
              show_default=True, help="Seconds to wait for the readiness heartbeat.")
def run(eif_path: Path | None, cpu_count: int | None, memory: int | None,
        enclave_cid: int | None, enclave_name: str | None, debug_mode: bool,
        attach_console: bool, config: Path | None, parent_instance_id: str | None,
        parent_role_arn: str | None, vsock_socket: Path | None, ready_timeout: float) -> None:
    """Start an enclave from an EIF; print nitro-cli's run-enclave JSON once it is ready."""
    if config is not None:
        if any(v not in (None, False) for v in (eif_path, cpu_count, memory, enclave_cid,
                                               enclave_name, debug_mode, attach_console,
                                               parent_instance_id, parent_role_arn,
                                               vsock_socket)):
            _fail("--config excludes the other run options", 2)
        cfg = _load_config(config)
        eif_path = Path(cfg["eif_path"])
        cpu_count, memory = cfg.get("cpu_count"), cfg.get("memory_mib")
        enclave_cid, enclave_name = cfg.get("enclave_cid"), cfg.get("enclave_name")
        debug_mode = bool(cfg.get("debug_mode", False))
        attach_console = bool(cfg.get("attach_console", False))
        parent_instance_id = cfg.get("parent_instance_id")
        parent_role_arn = cfg.get("parent_role_arn")
        vsock_socket = Path(cfg["vsock_socket"]) if "vsock_socket" in cfg else None
    if eif_path is None:
        _fail("--eif-path (or --config) is required", 2)
    if attach_console and not debug_mode:
        _fail("--attach-console needs --debug-mode (only debug-mode enclaves have a console)", 2)
    opts = launcher.EnclaveOptions(
        cpu_count=cpu_count, memory_mib=memory, enclave_cid=enclave_cid,
        enclave_name=enclave_name, debug_mode=debug_mode, parent_instance_id=parent_instance_id,
        parent_role_arn=parent_role_arn, vsock_socket=vsock_socket, ready_timeout=ready_timeout)
    try:
        img = launcher.image_from_eif(eif_path)
        tc = load_or_setup(progress=_progress)
        started = launcher.start(img, opts, tc, progress=_progress)
    except (launcher.EnclaveError, RegistryError, SetupError) as exc:
        _fail(str(exc))
    _progress(f"enclave {started.enclave_id} is running (ready after "
              f"{started.record.get('_ready_seconds', '?')} s)")
    _print(started.run_info())
    if attach_console:
        _follow(started, None)


def _select(enclave_id: str | None, enclave_name: str | None) -> launcher.Enclave:
    if (enclave_id is None) == (enclave_name is None):
        _fail("give one of --enclave-id or --enclave-name", 2)
    try:
        return launcher.find(enclave_id, enclave_name)
    except (launcher.EnclaveError, RegistryError) as exc:
        _fail(str(exc))


def _follow(e: launcher.Enclave, disconnect_timeout: float | None) -> None:
    stop = {"flag": False}

    def interrupted(signum: int, frame: object) -> None:
        stop["flag"] = True

    old = signal.signal(signal.SIGINT, interrupted)
    try:
        launcher.follow_console(e, sys.stdout.buffer, disconnect_timeout, lambda: stop["flag"])
    except launcher.EnclaveError as exc:
        _fail(str(exc))
    finally:
        signal.signal(signal.SIGINT, old)


@enclave.command("describe")
def describe() -> None:
    """nitro-cli's describe-enclaves JSON: every running enclave."""
    try:
        _print([e.describe() for e in launcher.list_enclaves()])
    except RegistryError as exc:
        _fail(str(exc))


@enclave.command("console")
@click.option("--enclave-id")
@click.option("--enclave-name")
@click.option("--disconnect-timeout", type=float, help="Stop following after this many seconds.")
def console(enclave_id: str | None, enclave_name: str | None,
            disconnect_timeout: float | None) -> None:
    """Show a debug-mode enclave's console (from its boot) and follow it until it ends."""
    _follow(_select(enclave_id, enclave_name), disconnect_timeout)


@enclave.command("terminate")
@click.option("--enclave-id")
@click.option("--enclave-name")
@click.option("--all", "all_", is_flag=True, help="Terminate every running enclave.")
def terminate(enclave_id: str | None, enclave_name: str | None, all_: bool) -> None:
    """Stop an enclave (no process, socket or file of it is left); nitro-cli's JSON."""
    if all_:
        if enclave_id is not None or enclave_name is not None:
            _fail("--all excludes --enclave-id and --enclave-name", 2)
        try:
            targets = launcher.list_enclaves()
        except RegistryError as exc:
            _fail(str(exc))
    else:
        targets = [_select(enclave_id, enclave_name)]
    for e in targets:
        done = e.terminate()
        _print({"EnclaveName": e.name, "EnclaveID": e.enclave_id, "Terminated": done})
