"""The sample enclave image: Debian's kernel, a bootstrap ramdisk with our init, an app ramdisk.

An enclave image (EIF) holds a kernel, a command line and ramdisks that the
loader concatenates into one initrd. AWS's images have a *bootstrap* ramdisk
(``/init``, ``/nsm.ko``) and a *customer* ramdisk (``/rootfs/...``, ``/cmd``,
``/env``). This module builds the same two layers from what ``nsm vm setup``
caches (Debian's kernel and modules, busybox):

* the bootstrap ramdisk: busybox, the virtio-mmio and vsock modules (Debian
  builds them as modules; AWS's kernel has them built in), ``/nsm.ko``,
  :data:`nsm-enclave-tool <TOOL_SOURCE>` and :data:`BOOTSTRAP_INIT`, an init
  that does what AWS's does: load the drivers, send the readiness heartbeat
  (AF_VSOCK to CID 3 port 9000, byte ``0xB7``, echoed), then chroot into
  ``/rootfs`` and run ``/cmd`` with ``/env``, and reboot when it exits;
* an app ramdisk: ``/rootfs`` (busybox with its applet links, the tool, the
  app's files), ``/cmd`` (one argument per line) and ``/env`` (``NAME=value``
  per line), the layout AWS's init reads.

Busybox has no AF_VSOCK client and cannot issue the NSM ioctl, so both layers
carry ``nsm-enclave-tool``, a small C program of ours (``guest/nsm-enclave-tool.c``)
compiled statically the first time it is needed (or by ``nsm vm setup``) and
cached under a name derived from its source.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from virtio_nsm.vm.initramfs import build_cpio
from virtio_nsm.vm.setup import (
    ENCLAVE_MODULES,
    Kernel,
    Progress,
    SetupError,
    Toolchain,
    kernel_has_modules,
    stderr_progress,
)

TOOL_NAME = "nsm-enclave-tool"
#: Vsock port of the parent (CID 3) that the init's readiness heartbeat connects to.
HEARTBEAT_PORT = 9000
HEARTBEAT_BYTE = 0xB7
PARENT_CID = 3
#: Port the sample app serves attestation requests on.
SAMPLE_PORT = 5000
#: Nonce length of the sample app's protocol (the parent sends exactly this many bytes).
SAMPLE_NONCE_LEN = 32

#: Command line of the sample image (AWS's x86 defaults without its virtio_mmio.device=
#: entries: Debian's kernel finds the microvm's mmio devices through ACPI).
SAMPLE_CMDLINE = ("console=ttyS0 reboot=k panic=-1 pci=off i8042.noaux i8042.nomux "
                  "i8042.nopnp i8042.dumbkbd random.trust_cpu=on")

#: The bootstrap ramdisk's ``/init``: AWS's enclave init, for Debian's modular kernel.
BOOTSTRAP_INIT = r"""#!/bin/busybox sh
# virtio-nsm enclave init (virtio_nsm.enclave.image): what AWS's enclave init does
B=/bin/busybox
$B mount -t devtmpfs dev /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
say() { echo "nsm-enclave-init: $*"; }
# like AWS's init, a failure ends init: the kernel panics and the enclave stops
die() { say "$*"; $B sync; exit 1; }

for m in virtio_mmio vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport; do
    [ -d /sys/module/$m ] && continue   # built into this kernel
    $B insmod /lib/modules/$m.ko || die "cannot load $m"
done
if [ -f /nsm.ko ]; then
    $B insmod /nsm.ko || die "cannot load nsm.ko"
    $B rm -f /nsm.ko
fi

/bin/nsm-enclave-tool heartbeat 3 9000 20000 || die "no readiness heartbeat answer from the parent"
say "ready"

NL='
'
set -f
IFS=$NL
CMD=$($B cat /cmd 2>/dev/null)
ENVS=$($B cat /env 2>/dev/null)
$B rm -f /cmd /env
[ -n "$CMD" ] || CMD=sh

cd /rootfs || die "no /rootfs"
for d in dev proc sys run tmp; do $B mkdir -p /rootfs/$d; done
$B mount -t devtmpfs dev /rootfs/dev || die "cannot mount /rootfs/dev"
$B mount -t proc proc /rootfs/proc
$B mount -t sysfs sysfs /rootfs/sys
$B mount -t tmpfs -o mode=0755 tmpfs /rootfs/run
$B mount -t tmpfs -o mode=1777 tmpfs /rootfs/tmp
$B mkdir -p /rootfs/dev/shm /rootfs/dev/pts
$B mount -t tmpfs -o mode=1777 shm /rootfs/dev/shm
$B mount -t devpts devpts /rootfs/dev/pts

# the command: its own session, /env as its whole environment, PATH searched as AWS's does
$B setsid $B env -i PATH=/sbin:/usr/sbin:/bin:/usr/bin $ENVS $B chroot /rootfs $CMD &
wait $!
rc=$?
say "command exited with status $rc"
$B sync
$B reboot -f
"""

#: The sample app: serves attestation documents on vsock port SAMPLE_PORT.
SAMPLE_MAIN = f"""#!/bin/sh
# virtio-nsm sample enclave app: for each connection on vsock port {SAMPLE_PORT}, read a
# {SAMPLE_NONCE_LEN}-byte nonce, ask /dev/nsm for an attestation document with it and send
# back the NSM's CBOR response ({{"Attestation": {{"document": ...}}}}).
echo "sample app: /dev/nsm is $(ls -l /dev/nsm 2>&1)"
exec nsm-enclave-tool serve {SAMPLE_PORT} /app/attest.sh
"""
#: One connection: CBOR {"Attestation": {"nonce": <32 bytes>}} built with printf, the nonce
#: read from the socket.
SAMPLE_ATTEST = f"""#!/bin/sh
{{ printf '\\241\\153Attestation\\241\\145nonce\\130\\{SAMPLE_NONCE_LEN:03o}'
   head -c {SAMPLE_NONCE_LEN}; }} | nsm-enclave-tool nsm-raw
"""

DIR, EXE, REG, LINK = 0o040755, 0o100755, 0o100644, 0o120777

Entry = tuple[str, int, bytes]


def tool_source() -> bytes:
    return (resources.files("virtio_nsm.enclave") / "guest" / f"{TOOL_NAME}.c").read_bytes()


def _compile(source: Path, out: Path, root: Path | None) -> str | None:
    """Compile ``source`` statically into ``out``; None on success, else the error text."""
    cc = shutil.which("cc") or shutil.which("gcc")
    flags = ["-static", "-Os", "-s", "-Wall", "-Wextra", "-o"]
    if cc:
        res = subprocess.run([cc, *flags, str(out), str(source)], capture_output=True,
                             text=True)
        if res.returncode == 0:
            return None
        host_error = res.stderr.strip()
    else:
        host_error = "no C compiler (cc/gcc) on the host"
    if root is None or not (root / "usr" / "bin").is_dir():
        return host_error
    # the cache's Debian root (set up by `nsm vm setup` on non-trixie hosts): its gcc
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C.UTF-8",
               PATH="/usr/sbin:/usr/bin:/sbin:/bin")
    if not (root / "usr" / "bin" / "gcc").exists():
        res = subprocess.run(["chroot", str(root), "apt-get", "-q", "install", "-y",
                              "--no-install-recommends", "gcc", "libc6-dev"],
                             capture_output=True, text=True, env=env)
        if res.returncode != 0:
            return f"{host_error}; installing gcc in {root} failed: {res.stderr.strip()[-500:]}"
    with tempfile.TemporaryDirectory(dir=root / "tmp") as tmp:
        inside = Path(tmp)
        shutil.copy(source, inside / source.name)
        rel = "/" + str(inside.relative_to(root))
        res = subprocess.run(["chroot", str(root), "gcc", *flags, f"{rel}/tool",
                              f"{rel}/{source.name}"], capture_output=True, text=True, env=env)
        if res.returncode != 0:
            return f"{host_error}; gcc in {root}: {res.stderr.strip()}"
        shutil.copy(inside / "tool", out)
    return None


def tool_binary(tc: Toolchain, progress: Progress = stderr_progress) -> Path:
    """The static ``nsm-enclave-tool`` for this source, compiled on first use."""
    src = tool_source()
    digest = hashlib.sha256(src).hexdigest()[:16]
    dest = Path(tc.cache_dir) / "enclave" / f"{TOOL_NAME}-{digest}"
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    progress(f"compiling {TOOL_NAME} (static) for enclave images")
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        source = Path(tmp) / f"{TOOL_NAME}.c"
        source.write_bytes(src)
        out = Path(tmp) / TOOL_NAME
        root = Path(tc.cache_dir) / "root"
        error = _compile(source, out, root if root.is_dir() else None)
        if error is not None:
            raise SetupError(f"cannot compile {TOOL_NAME} for enclave images: {error} "
                             "(install gcc and the static C library, e.g. "
                             "apt-get install gcc libc6-dev)")
        out.chmod(0o755)
        os.replace(out, dest)
    return dest


def _busybox_links(busybox: Path, prefix: str) -> list[Entry]:
    """Symlinks ``prefix/bin/<applet> -> busybox`` for every applet this busybox has."""
    res = subprocess.run([str(busybox), "--list"], capture_output=True, text=True)
    if res.returncode != 0:
        raise SetupError(f"{busybox} --list failed: {res.stderr.strip()}")
    return [(f"{prefix}bin/{a}", LINK, b"busybox")
            for a in sorted(set(res.stdout.split())) if a and "/" not in a and a != "busybox"]


def enclave_kernel(tc: Toolchain, kernel: str | None = None) -> Kernel:
    k = tc.kernel(kernel)
    if not kernel_has_modules(k, ENCLAVE_MODULES):
        raise SetupError(f"the cached kernel {k.version} lacks the virtio-mmio and vsock "
                         "modules enclave images need; run `nsm vm setup` again")
    return k


def bootstrap_entries(busybox: Path, module_dir: Path, tool: Path) -> list[Entry]:
    """Ramdisk 1: ``/init``, busybox, the mmio/vsock modules, ``/nsm.ko``, the tool."""
    entries: list[Entry] = [(d, DIR, b"") for d in ("bin", "dev", "proc", "sys", "lib",
                                                    "lib/modules", "rootfs")]
    entries.append(("bin/busybox", EXE, busybox.read_bytes()))
    entries.append(("bin/sh", LINK, b"busybox"))
    entries.append((f"bin/{TOOL_NAME}", EXE, tool.read_bytes()))
    for mod in ENCLAVE_MODULES:
        entries.append((f"lib/modules/{mod}.ko", REG, (module_dir / f"{mod}.ko").read_bytes()))
    entries.append(("nsm.ko", REG, (module_dir / "nsm.ko").read_bytes()))
    entries.append(("init", EXE, BOOTSTRAP_INIT.encode()))
    return entries


def app_entries(busybox: Path, tool: Path, command: Sequence[str],
                env: Mapping[str, str] | None = None,
                files: Mapping[str, tuple[int, bytes]] | None = None) -> list[Entry]:
    """Ramdisk 2: ``/rootfs`` (busybox, the tool, ``files``), ``/cmd`` and ``/env``.

    ``files`` maps paths inside the rootfs (``app/main.sh``) to ``(mode, data)``.
    """
    if not command:
        raise ValueError("the image needs a command")
    for arg in command:
        if "\n" in arg or not arg:
            raise ValueError(f"command arguments must be non-empty single lines: {arg!r}")
    env = dict(env or {})
    for key, value in env.items():
        if not key or "=" in key or "\n" in key or "\n" in value:
            raise ValueError(f"bad environment entry {key!r}={value!r}")
    entries: list[Entry] = [("rootfs", DIR, b"")]
    dirs = {"bin", "dev", "proc", "sys", "run", "tmp", "etc", "root"}
    for path in files or {}:
        parts = path.strip("/").split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    entries += [(f"rootfs/{d}", DIR, b"") for d in sorted(dirs)]
    entries.append(("rootfs/bin/busybox", EXE, busybox.read_bytes()))
    entries += _busybox_links(busybox, "rootfs/")
    entries.append((f"rootfs/bin/{TOOL_NAME}", EXE, tool.read_bytes()))
    for path, (mode, data) in sorted((files or {}).items()):
        entries.append((f"rootfs/{path.strip('/')}", 0o100000 | (mode & 0o7777), data))
    entries.append(("cmd", REG, "".join(f"{a}\n" for a in command).encode()))
    entries.append(("env", REG, "".join(f"{k}={v}\n" for k, v in env.items()).encode()))
    return entries


@dataclass
class ImageParts:
    """What an EIF is built from: kernel, command line and ramdisks (bootstrap first)."""

    kernel: Path
    cmdline: str
    ramdisks: list[Path]


def sample_app_files() -> dict[str, tuple[int, bytes]]:
    return {"app/main.sh": (0o755, SAMPLE_MAIN.encode()),
            "app/attest.sh": (0o755, SAMPLE_ATTEST.encode())}


def build_parts(tc: Toolchain, out_dir: Path, *, command: Sequence[str] = ("/app/main.sh",),
                env: Mapping[str, str] | None = None,
                files: Mapping[str, tuple[int, bytes]] | None = None,
                kernel: str | None = None, cmdline: str = SAMPLE_CMDLINE,
                progress: Progress = stderr_progress) -> ImageParts:
    """Write ``bootstrap.cpio`` and ``app.cpio`` into ``out_dir``; the sample app by default."""
    k = enclave_kernel(tc, kernel)
    tool = tool_binary(tc, progress)
    busybox = Path(tc.busybox)
    out_dir.mkdir(parents=True, exist_ok=True)
    boot = out_dir / "bootstrap.cpio"
    app = out_dir / "app.cpio"
    boot.write_bytes(build_cpio(bootstrap_entries(busybox, Path(k.module_dir), tool)))
    app.write_bytes(build_cpio(app_entries(
        busybox, tool, command, {"HOME": "/root", **(env or {})},
        sample_app_files() if files is None else files)))
    return ImageParts(kernel=Path(k.vmlinuz), cmdline=cmdline, ramdisks=[boot, app])


#: The sample image's defaults in its EIF header (a TCG guest needs little).
SAMPLE_MEMORY_MIB = 256
SAMPLE_CPUS = 1
SAMPLE_NAME = "nsm-sample-enclave"


def build_sample_eif(tc: Toolchain, output: Path, *, name: str = SAMPLE_NAME,
                     progress: Progress = stderr_progress) -> dict[str, Any]:
    """Build the sample enclave image (EIF) at ``output``; nitro-cli's build JSON."""
    from virtio_nsm.eif import Identity, build_eif

    with tempfile.TemporaryDirectory(prefix="nsm-sample-") as tmp:
        parts = build_parts(tc, Path(tmp), progress=progress)
        k = enclave_kernel(tc)
        result = build_eif(
            output, kernel=parts.kernel, cmdline=parts.cmdline, ramdisks=parts.ramdisks,
            metadata=Identity(image_name=name, image_version="1.0",
                              operating_system="Debian (busybox)", kernel_version=k.version),
            default_mem=SAMPLE_MEMORY_MIB << 20, default_cpus=SAMPLE_CPUS)
    return {"Measurements": result.measurements.to_json()}
