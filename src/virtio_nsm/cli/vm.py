"""``nsm vm``: the real-kernel tier (Linux guests under QEMU TCG with the NSM device)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import click

from . import main
from .eif import boot_argv, boot_config, boot_options, prepare_boot


def _cache_option(f: click.decorators.FC) -> click.decorators.FC:
    return click.option(
        "--cache-dir", type=click.Path(file_okay=False, path_type=Path), envvar="NSM_VM_CACHE",
        default=None, help="Toolchain cache (default ~/.cache/virtio-nsm/vm; env NSM_VM_CACHE).",
    )(f)


@main.group()
def vm() -> None:
    """Boot Linux guests (QEMU TCG) with the NSM device; the real-kernel tier.

    \b
    Quick start (as root; the first set-up builds a ~430 MB cache from Debian's archive):
      nsm vm setup                     # cached in ~/.cache/virtio-nsm/vm
      nsm vm run -- nsm describe       # Linux's nsm.ko talks to `nsm serve`
      nsm vm run -- sh -c 'cat /sys/class/misc/hw_random/rng_current'

    The guest runs COMMAND chrooted into this machine's root (read-only over 9p),
    so the same programs, venv and PYTHONPATH work inside it. Its writes to /tmp
    stay in the guest; `--share DIR` shares a host directory read-write.
    """


@vm.command("setup")
@_cache_option
@click.option("--kernel", "kernel_package", default="linux-image-amd64", show_default=True,
              metavar="PKG[/RELEASE]", help="Debian kernel package (generic flavour).")
@click.option("--root-qemu", is_flag=True,
              help="Use the debootstrapped trixie root's QEMU even if the host has one.")
@click.option("--with-builtin-nsm", is_flag=True,
              help="Also build QEMU from Debian's source with libcbor for QEMU's own C "
                   "virtio-nsm-pci (benchmark reference; a long build, about 20 min on 2 cores).")
def setup_cmd(cache_dir: Path | None, kernel_package: str, root_qemu: bool,
              with_builtin_nsm: bool) -> None:
    """Fetch and cache QEMU, the kernel (nsm.ko, 9p) and the initramfs. Idempotent."""
    from ..vm.setup import SetupError, setup

    def terminated(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # unwinds: the running step is stopped, not orphaned

    signal.signal(signal.SIGTERM, terminated)
    try:
        tc = setup(cache_dir, kernel_package=kernel_package, force_root_qemu=root_qemu,
                   with_builtin_nsm=with_builtin_nsm)
    except SetupError as exc:
        click.echo(f"nsm vm setup: {exc}", err=True)
        sys.exit(2)
    builtin = tc.builtin_nsm_device or "no built-in virtio-nsm device"
    click.echo(f"ready: {tc.qemu_version}; {builtin}; kernel {tc.kernel().version}; "
               f"cache {tc.cache_dir}")


@vm.command("run", context_settings={"ignore_unknown_options": True,
                                     "allow_interspersed_args": False})
@_cache_option
@click.option("--kernel", default=None, metavar="K",
              help="Kernel: a package set up with `nsm vm setup --kernel` (default: trixie's).")
@click.option("--timeout", type=float, default=600.0, show_default=True, metavar="S",
              help="Kill the guest after S seconds (exit 124).")
@click.option("--device", default="ours", show_default=True, metavar="DEV",
              help="ours (start `nsm serve --vhost-user`), vhost-user:SOCK (a running "
                   "backend), qemu (QEMU's built-in C device, if built) or none.")
@click.option("--share", "shares", multiple=True,
              type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Host directory shared read-write at the same path in the guest.")
@click.option("--env", "env", multiple=True, metavar="K=V", help="Extra guest variable.")
@click.option("--memory", "memory_mb", type=int, default=512, show_default=True,
              help="Guest RAM in MiB.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="State directory for the started `nsm serve` (PCRs, locks, CA; its "
                   "documents chain to DIR/ca/root.pem). Default: a fresh one per run.")
@click.option("--backend-arg", "backend_args", multiple=True,
              help="Extra argument for the started `nsm serve` (repeatable), e.g. "
                   "--ephemeral for a state kept in memory only.")
@click.option("--append", "kernel_args", default="", help="Extra kernel command line.")
@click.option("--keep", is_flag=True, help="Keep the run directory (logs) on success too.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
@boot_options
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run_cmd(cache_dir: Path | None, kernel: str | None, timeout: float, device: str,
            shares: tuple[Path, ...], env: tuple[str, ...], memory_mb: int,
            state_dir: Path | None, backend_args: tuple[str, ...], kernel_args: str, keep: bool, quiet: bool,
            command: tuple[str, ...], **boot: Any) -> None:
    """Run COMMAND in a throwaway guest chrooted into the host root; exit with its status.

    Example: nsm vm run -- nsm describe

    The boot options (--eif ...) go to the `nsm serve` this starts (--device ours).
    """
    from ..vm.run import RunOptions, VmError, run
    from ..vm.setup import SetupError, load_or_setup, stderr_progress

    extra_env: dict[str, str] = {}
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not K=V", param_hint="--env")
        extra_env[key] = value
    config = boot_config(**boot)
    if not config.is_default():
        if device != "ours":
            raise click.BadParameter("the boot options configure the backend that `nsm vm run` "
                                     "starts: use them with --device ours", param_hint="--eif")
        prepare_boot(config)  # a bad image is a one-line error before anything boots
        backend_args = (*backend_args, *boot_argv(config))
    try:
        tc = load_or_setup(cache_dir, kernel,
                           progress=(lambda _m: None) if quiet else stderr_progress)
    except SetupError as exc:
        click.echo(f"nsm vm run: {exc}", err=True)
        sys.exit(125)
    opts = RunOptions(command=list(command), kernel=kernel, timeout=timeout, device=device,
                      shares=list(shares), env=extra_env, memory_mb=memory_mb, keep=keep,
                      backend_args=list(backend_args), kernel_args=kernel_args, quiet=quiet,
                      state_dir=state_dir.resolve() if state_dir else None)
    try:
        result = run(tc, opts)
    except VmError as exc:
        click.echo(f"nsm vm run: {exc}", err=True)
        sys.exit(125)
    if keep and not quiet:
        click.echo(f"[nsm vm] run directory: {result.run_dir}", err=True)
    sys.exit(result.status)
