"""``nsm vm setup``: build (once) and cache the guest toolchain.

Everything comes from Debian's archive:

* a QEMU with ``vhost-user-test-device-pci`` (QEMU >= 10.2). On a host whose
  own ``qemu-system-x86_64`` has it, that one is used. Otherwise (Debian 12)
  a ``debootstrap --variant=minbase trixie`` root gets trixie-backports'
  ``qemu-system-x86`` and QEMU runs through that root's dynamic loader;
* Debian's generic 6.12 kernel (``linux-image-amd64`` from trixie): vmlinuz
  plus ``nsm.ko`` and the 9p modules, decompressed;
* a busybox-static initramfs (see :mod:`virtio_nsm.vm.initramfs`).

Each stage leaves a stamp; a second run only checks the stamps and takes
seconds. The cache is ``~/.cache/virtio-nsm/vm`` unless ``--cache-dir`` or
``NSM_VM_CACHE`` says otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from virtio_nsm._process import stop_process
from virtio_nsm.vm.initramfs import GUEST_MODULES, write_initramfs

SUITE = "trixie"
BACKPORTS = "trixie-backports"
DEFAULT_KERNEL_PACKAGE = "linux-image-amd64"
#: Rough space a cold set-up needs in the cache directory (root ~500 MB,
#: kernel package ~110 MB, apt archives), with a margin.
NEEDED_FREE_BYTES = 2 * 1024**3
TOOLCHAIN_FILE = "toolchain.json"
TOOLCHAIN_FORMAT = 1

Progress = Callable[[str], None]


class SetupError(RuntimeError):
    """Set-up failed for a reason the user can act on; the message says which."""


def default_cache_dir() -> Path:
    env = os.environ.get("NSM_VM_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return (Path(base) / "virtio-nsm" / "vm").resolve()


def stderr_progress(msg: str) -> None:
    print(f"[nsm vm] {msg}", file=sys.stderr, flush=True)


@dataclass
class Kernel:
    """A kernel ready to boot: vmlinuz and the decompressed guest modules."""

    version: str
    vmlinuz: str
    module_dir: str


@dataclass
class Toolchain:
    """What ``nsm vm run`` needs; stored as JSON in the cache directory."""

    cache_dir: str
    qemu: list[str]
    """argv prefix that starts qemu-system-x86_64 (possibly through a loader)"""
    qemu_env: dict[str, str]
    qemu_version: str
    qemu_devices: list[str]
    """virtio-nsm related ``-device`` names this QEMU knows"""
    busybox: str
    kernels: dict[str, Kernel] = field(default_factory=dict)
    default_kernel: str = ""
    builtin_qemu: list[str] = field(default_factory=list)
    """argv prefix of a QEMU built from Debian's source with libcbor (QEMU's own C
    ``virtio-nsm-pci``); empty unless ``nsm vm setup --with-builtin-nsm`` built it"""
    format: int = TOOLCHAIN_FORMAT

    @property
    def has_vhost_user_test_device(self) -> bool:
        return "vhost-user-test-device-pci" in self.qemu_devices

    @property
    def builtin_nsm_device(self) -> str | None:
        """QEMU's own C device (``virtio-nsm-pci``), when a QEMU here has it."""
        if "virtio-nsm-pci" in self.qemu_devices or self.builtin_qemu:
            return "virtio-nsm-pci"
        return None

    def builtin_nsm_qemu(self) -> list[str]:
        """argv prefix of the QEMU that has the built-in device."""
        return self.qemu if "virtio-nsm-pci" in self.qemu_devices else self.builtin_qemu

    def kernel(self, name: str | None = None) -> Kernel:
        key = name or self.default_kernel
        if key in self.kernels:
            return self.kernels[key]
        for k in self.kernels.values():
            if key in (k.version, k.vmlinuz):
                return k
        known = ", ".join(sorted(self.kernels)) or "none"
        raise SetupError(f"kernel {key!r} is not in the cache (have: {known}); "
                         f"run `nsm vm setup --kernel {key}`")

    def initramfs(self, kernel: Kernel) -> Path:
        """The initramfs for ``kernel`` (built on first use; content-addressed)."""
        return write_initramfs(Path(self.busybox), Path(kernel.module_dir),
                               Path(self.cache_dir) / "initramfs")

    def save(self) -> None:
        path = Path(self.cache_dir) / TOOLCHAIN_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, cache_dir: Path) -> Toolchain | None:
        path = cache_dir / TOOLCHAIN_FILE
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if raw.get("format") != TOOLCHAIN_FORMAT:
            return None
        raw["kernels"] = {k: Kernel(**v) for k, v in raw.get("kernels", {}).items()}
        tc = cls(**raw)
        if not Path(tc.busybox).exists() or not all(
            Path(k.vmlinuz).exists()
            and all((Path(k.module_dir) / f"{m}.ko").exists() for m in GUEST_MODULES)
            for k in tc.kernels.values()
        ):
            return None
        if not all(Path(a).exists() for a in tc.qemu if a.startswith("/") and ":" not in a):
            return None  # the root (QEMU) went away: set up again
        if tc.builtin_qemu and not Path(tc.builtin_qemu[3]).exists():
            tc.builtin_qemu = []
        return tc


# --------------------------------------------------------------------------- helpers


def _check_root() -> None:
    if os.geteuid() != 0:
        raise SetupError(
            "nsm vm setup must run as root: debootstrap and chroot need it "
            "(try: sudo nsm vm setup)"
        )


def _check_space(path: Path, needed: int = NEEDED_FREE_BYTES) -> None:
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise SetupError(
            f"not enough disk space in {probe}: {free / 2**20:.0f} MiB free, "
            f"{needed / 2**20:.0f} MiB needed (free some space or use --cache-dir)"
        )


def _os_release() -> dict[str, str]:
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep:
                out[key] = value.strip().strip('"')
    return out


def apt_mirror(etc_apt: Path = Path("/etc/apt")) -> str:
    """The Debian mirror URL the host's apt uses (``NSM_VM_MIRROR`` overrides)."""
    env = os.environ.get("NSM_VM_MIRROR")
    if env:
        return env.rstrip("/")
    candidates: list[tuple[str, str]] = []  # (uri, suites)
    files = [etc_apt / "sources.list"]
    src_d = etc_apt / "sources.list.d"
    if src_d.is_dir():
        files += sorted(src_d.iterdir())
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    k, _, v = line.partition(":")
                    fields[k.strip().lower()] = v.strip()
                if "deb" in fields.get("types", "").split():
                    for uri in fields.get("uris", "").split():
                        candidates.append((uri, fields.get("suites", "")))
        else:
            for line in text.splitlines():
                m = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
                if m:
                    candidates.append((m.group(1), m.group(2)))
    debian = ("buster", "bullseye", "bookworm", "trixie", "forky", "sid", "stable", "testing")
    for uri, suites in candidates:
        if "security" in uri or "security" in suites:
            continue
        if any(s.split("-")[0] in debian for s in suites.split()) and "debian" in uri:
            return uri.rstrip("/")
    raise SetupError(
        "cannot find a Debian mirror in /etc/apt/sources.list*; set NSM_VM_MIRROR"
    )


def _check_network(mirror: str) -> None:
    url = f"{mirror}/dists/{SUITE}/InRelease"
    req = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(req, timeout=20):
            pass
    except (urllib.error.URLError, OSError) as exc:
        raise SetupError(
            f"cannot reach the Debian archive ({url}): {exc}. The first set-up downloads "
            "a few hundred MB from it; check the network (or set NSM_VM_MIRROR)"
        ) from exc


def _run(argv: Sequence[str], progress: Progress, what: str, *,
         env: dict[str, str] | None = None, show: Callable[[str], bool] | None = None,
         cwd: Path | None = None) -> str:
    """Run a command, streaming selected output lines as progress; raise on failure."""
    proc = subprocess.Popen(
        list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        errors="replace", env=env, cwd=cwd, stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            if show is None or show(line):
                progress(f"  {line}")
        rc = proc.wait()
    finally:
        stop_process(proc, timeout=10)  # interrupted: do not leave debootstrap/apt running
    out = "\n".join(lines)
    if rc != 0:
        tail = "\n".join(lines[-25:])
        if "No space left on device" in out:
            raise SetupError(f"{what}: the disk is full (No space left on device)\n{tail}")
        if re.search(r"Temporary failure resolving|Could not resolve|Failed to fetch|"
                     r"Couldn't download|Network is unreachable|Connection (refused|timed out)",
                     out):
            raise SetupError(f"{what}: download failed (no network?)\n{tail}")
        raise SetupError(f"{what} failed (exit {rc}):\n{tail}")
    return out


def _apt_progress(line: str) -> bool:
    if "Can not write log" in line:  # apt in a chroot without /dev/pts: harmless
        return False
    return line.startswith(("Get:", "Fetched", "E:", "Err:", "Need to get", "Setting up qemu"))


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class _Apt:
    """apt inside the trixie root (via chroot) or on a trixie host."""

    def __init__(self, root: Path | None) -> None:
        self.root = root

    def argv(self, *args: str) -> list[str]:
        base = ["apt-get", "-q", "-o", "Dpkg::Progress-Fancy=0", "-o", "APT::Color=0",
                "-o", "Acquire::Languages=none", *args]
        return ["chroot", str(self.root), *base] if self.root else base

    def env(self) -> dict[str, str]:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C.UTF-8")
        env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
        return env

    def depends(self, package: str) -> list[str]:
        cmd = ["apt-cache", "depends", "--important", package]
        if self.root:
            cmd = ["chroot", str(self.root), *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, env=self.env())
        if out.returncode != 0:
            raise SetupError(f"apt-cache cannot find {package}: {out.stderr.strip()}")
        return re.findall(r"^\s*\|?Depends:\s*(\S+)", out.stdout, re.M)

    def resolve_kernel(self, package: str) -> list[str]:
        """``linux-image-amd64[/release]`` -> the versioned image package (metapackages
        followed) plus any ``linux-modules-*`` package it depends on (newer kernels)."""
        name, _, release = package.partition("/")
        images = [d for d in self.depends(package) if d.startswith("linux-image-") and d != name]
        real = images[0] if images else name
        spec = f"{real}/{release}" if release else real
        # newer packagings split the image: vmlinuz in linux-binary-*, modules in linux-modules-*
        extra = [d for d in self.depends(spec) if d.startswith(("linux-modules-", "linux-binary-"))]
        return [spec] + [f"{e}/{release}" if release else e for e in extra]

    def download(self, package: str, dest: Path, progress: Progress) -> Path:
        """``apt-get download`` one package into ``dest``; return the .deb path."""
        name, _, release = package.partition("/")
        spec = f"{name}/{release}" if release else name
        workdir = (self.root / "tmp" / "nsm-dl") if self.root else dest
        workdir.mkdir(parents=True, exist_ok=True)
        for old in workdir.glob("*.deb"):
            old.unlink()
        if self.root:
            argv = ["chroot", str(self.root), "sh", "-c",
                    f"cd /tmp/nsm-dl && apt-get -q download {spec}"]
        else:
            argv = ["apt-get", "-q", "download", spec]
        _run(argv, progress, f"apt-get download {spec}", env=self.env(), show=_apt_progress,
             cwd=workdir)
        debs = sorted(workdir.glob(f"{name}_*.deb"))
        if not debs:
            raise SetupError(f"apt-get download {spec} left no .deb")
        dest.mkdir(parents=True, exist_ok=True)
        final = dest / debs[-1].name
        if debs[-1] != final:
            shutil.move(str(debs[-1]), final)
        return final


def _deb_members(deb: Path, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """Stream the data tarball of ``deb`` and yield ``(path, bytes)`` of wanted files."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name.lstrip("./")
                if member.isfile() and wanted(name):
                    fh = tar.extractfile(member)
                    assert fh is not None
                    yield name, fh.read()
    finally:
        proc.stdout.close()
        if proc.wait() != 0:
            raise SetupError(f"dpkg-deb --fsys-tarfile {deb} failed")


# --------------------------------------------------------------------------- stages


def _debootstrap_tool(cache_dir: Path, progress: Progress) -> tuple[list[str], dict[str, str]]:
    """A debootstrap to run: the host's, or Debian's package unpacked into the cache."""
    host = shutil.which("debootstrap") or (
        "/usr/sbin/debootstrap" if Path("/usr/sbin/debootstrap").exists() else None)
    if host:
        return [host], dict(os.environ)
    tool = cache_dir / "tools" / "debootstrap"
    script = tool / "usr" / "sbin" / "debootstrap"
    if not script.exists():
        if not shutil.which("apt-get"):
            raise SetupError("debootstrap is not installed and there is no apt-get to fetch it")
        progress("fetching debootstrap from the Debian archive (host apt)")
        dl = cache_dir / "tools" / "dl"
        try:
            deb = _Apt(None).download("debootstrap", dl, progress)
        except SetupError:
            _run(["apt-get", "-q", "update"], progress, "apt-get update", show=_apt_progress)
            deb = _Apt(None).download("debootstrap", dl, progress)
        tmp = tool.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _run(["dpkg-deb", "-x", str(deb), str(tmp)], progress, "unpacking debootstrap")
        shutil.rmtree(tool, ignore_errors=True)
        os.replace(tmp, tool)
        shutil.rmtree(dl, ignore_errors=True)
    env = dict(os.environ, DEBOOTSTRAP_DIR=str(tool / "usr" / "share" / "debootstrap"))
    return [str(script)], env


def _stage_root(cache_dir: Path, mirror: str, progress: Progress) -> Path:
    root = cache_dir / "root"
    stamp = root / ".nsm-debootstrap-done"
    if stamp.exists():
        return root
    if root.exists():
        progress(f"removing an incomplete root {root}")
        _umount_below(root)
        shutil.rmtree(root)
    argv, env = _debootstrap_tool(cache_dir, progress)
    progress(f"debootstrap --variant=minbase {SUITE} into {root} (~20 s, ~70 MB download)")
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin:" + env.get("PATH", "")
    _run([*argv, "--variant=minbase", "--include=busybox-static", SUITE, str(root), mirror],
         progress, "debootstrap", env=env,
         show=lambda s: s.startswith(("I: Retrieving Packages", "I: Unpacking the base",
                                      "I: Configuring the base", "I: Base system", "E:", "W:")))
    (root / "etc" / "apt" / "sources.list.d" / "nsm-backports.list").write_text(
        f"deb {mirror} {BACKPORTS} main\n")
    stamp.write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
    return root


def _umount_below(path: Path) -> None:
    with contextlib.suppress(OSError):
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for m in sorted(mounts, reverse=True):
            if m == str(path) or m.startswith(str(path) + "/"):
                subprocess.run(["umount", "-l", m], check=False)


def _stage_qemu(root: Path, progress: Progress) -> None:
    stamp = root / ".nsm-qemu-done"
    if stamp.exists():
        return
    apt = _Apt(root)
    progress(f"apt-get update in the {SUITE} root")
    _run(apt.argv("update"), progress, "apt-get update (trixie root)", env=apt.env(),
         show=_apt_progress)
    progress(f"installing qemu-system-x86 from {BACKPORTS} (~25 MB)")
    _run(apt.argv("install", "-y", "--no-install-recommends", "-t", BACKPORTS,
                  "qemu-system-x86"),
         progress, "apt-get install qemu-system-x86", env=apt.env(), show=_apt_progress)
    _run(apt.argv("clean"), progress, "apt-get clean", env=apt.env(), show=lambda s: False)
    stamp.write_text("ok\n")


def _root_qemu(root: Path) -> tuple[list[str], dict[str, str]]:
    libs = f"{root}/lib/x86_64-linux-gnu:{root}/usr/lib/x86_64-linux-gnu"
    argv = [
        f"{root}/lib64/ld-linux-x86-64.so.2", "--library-path", libs,
        f"{root}/usr/bin/qemu-system-x86_64",
        "-L", f"{root}/usr/share/qemu", "-L", f"{root}/usr/share/seabios",
    ]
    return argv, {"QEMU_MODULE_DIR": f"{root}/usr/lib/x86_64-linux-gnu/qemu"}


def probe_qemu(argv: Sequence[str], env: dict[str, str]) -> tuple[str, list[str]]:
    """QEMU's version and the NSM-relevant device names it knows."""
    full_env = dict(os.environ, **env)
    ver = subprocess.run([*argv, "--version"], capture_output=True, text=True, env=full_env)
    if ver.returncode != 0:
        raise SetupError(f"QEMU does not start: {ver.stderr.strip() or ver.stdout.strip()}")
    version = ver.stdout.splitlines()[0] if ver.stdout else "?"
    dev = subprocess.run([*argv, "-device", "help"], capture_output=True, text=True,
                         env=full_env)
    names = re.findall(r'name "([^"]+)"', dev.stdout + dev.stderr)
    keep = [n for n in names if n.startswith(("vhost-user-test-device", "virtio-nsm",
                                              "virtio-9p-pci"))]
    return version, keep


def _host_qemu() -> tuple[list[str], dict[str, str]] | None:
    """The host's QEMU if it has vhost-user-test-device-pci (e.g. Debian 13 + backports)."""
    exe = shutil.which("qemu-system-x86_64")
    if not exe:
        return None
    with contextlib.suppress(SetupError, OSError):
        _, devices = probe_qemu([exe], {})
        if "vhost-user-test-device-pci" in devices:
            return [exe], {}
    return None


def _stage_busybox(cache_dir: Path, apt: _Apt, root: Path | None, progress: Progress) -> Path:
    if root is not None and (root / "bin" / "busybox").exists():
        return root / "bin" / "busybox"
    dest = cache_dir / "busybox" / "busybox"
    if dest.exists():
        return dest
    progress("fetching busybox-static")
    deb = apt.download("busybox-static", cache_dir / "busybox" / "dl", progress)
    for _name, data in _deb_members(deb, lambda n: n in ("bin/busybox", "usr/bin/busybox")):
        dest.write_bytes(data)
        dest.chmod(0o755)
    shutil.rmtree(cache_dir / "busybox" / "dl", ignore_errors=True)
    if not dest.exists():
        raise SetupError("busybox-static package has no bin/busybox")
    return dest


_MODULE_PATHS = {
    "netfs": "kernel/fs/netfs/netfs.ko",
    "9pnet": "kernel/net/9p/9pnet.ko",
    "9pnet_virtio": "kernel/net/9p/9pnet_virtio.ko",
    "9p": "kernel/fs/9p/9p.ko",
    "overlay": "kernel/fs/overlayfs/overlay.ko",
    "cuse": "kernel/fs/fuse/cuse.ko",
    "nsm": "kernel/drivers/misc/nsm.ko",
    # enclave images (virtio_nsm.enclave): virtio-mmio transports and vsock
    "virtio_mmio": "kernel/drivers/virtio/virtio_mmio.ko",
    "vsock": "kernel/net/vmw_vsock/vsock.ko",
    "vmw_vsock_virtio_transport_common": "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
    "vmw_vsock_virtio_transport": "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
}

#: Modules an enclave image of Debian's kernel needs besides ``GUEST_MODULES`` (load order).
ENCLAVE_MODULES: tuple[str, ...] = (
    "virtio_mmio", "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport")
#: Every module the kernel stage extracts.
CACHED_MODULES: tuple[str, ...] = tuple(dict.fromkeys(GUEST_MODULES + ENCLAVE_MODULES))


def kernel_has_modules(kernel: Kernel, modules: Sequence[str] = CACHED_MODULES) -> bool:
    return all((Path(kernel.module_dir) / f"{m}.ko").exists() for m in modules)


def _stage_kernel(cache_dir: Path, apt: _Apt, package: str, progress: Progress) -> Kernel:
    packages = apt.resolve_kernel(package)
    real = packages[0]
    kdir = cache_dir / "kernels" / real.split("/")[0]
    stamp = kdir / ".done"
    if stamp.exists() and all((kdir / "modules" / f"{m}.ko").exists() for m in CACHED_MODULES):
        info = json.loads(stamp.read_text())
        return Kernel(**info)
    progress(f"downloading {' '.join(packages)} (~110 MB)")
    debs = [apt.download(p, cache_dir / "kernels" / "dl", progress) for p in packages]
    deb = debs[0]
    progress(f"extracting vmlinuz and {', '.join(CACHED_MODULES)} from {deb.name}")
    tmp = kdir.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "modules").mkdir(parents=True)
    version = ""
    found: set[str] = set()
    by_suffix = {v: k for k, v in _MODULE_PATHS.items()}

    vmlinuz_re = re.compile(r"boot/vmlinuz-(.+)|(?:usr/)?lib/modules/([^/]+)/vmlinuz")

    def wanted(name: str) -> bool:
        return bool(vmlinuz_re.fullmatch(name)) or (
            "/modules/" in name and re.sub(r"^(usr/)?lib/modules/[^/]+/", "",
                                           re.sub(r"\.(xz|zst|gz)$", "", name)) in by_suffix)

    members = (m for d in debs for m in _deb_members(d, wanted))
    for name, data in members:
        if m := vmlinuz_re.fullmatch(name):
            version = m.group(1) or m.group(2)
            (tmp / "vmlinuz").write_bytes(data)
            continue
        rel = re.sub(r"^(usr/)?lib/modules/[^/]+/", "", name)
        if rel.endswith(".xz"):
            data = lzma.decompress(data)
        elif rel.endswith(".zst"):
            data = subprocess.run(["zstd", "-dc"], input=data, capture_output=True,
                                  check=True).stdout
        elif rel.endswith(".gz"):
            data = gzip.decompress(data)
        mod = by_suffix[re.sub(r"\.(xz|zst|gz)$", "", rel)]
        (tmp / "modules" / f"{mod}.ko").write_bytes(data)
        found.add(mod)
    missing = set(CACHED_MODULES) - found
    if not version or missing:
        raise SetupError(f"{deb.name} lacks {'vmlinuz' if not version else ''} "
                         f"{' '.join(sorted(missing))} (a cloud kernel has no 9p; "
                         "use the generic flavour)")
    # keep modules an earlier set-up extracted (another tree may need more than this one)
    with contextlib.suppress(OSError):
        for old in (kdir / "modules").glob("*.ko"):
            if not (tmp / "modules" / old.name).exists():
                shutil.copy2(old, tmp / "modules" / old.name)
    shutil.rmtree(kdir, ignore_errors=True)
    os.replace(tmp, kdir)
    kernel = Kernel(version=version, vmlinuz=str(kdir / "vmlinuz"),
                    module_dir=str(kdir / "modules"))
    stamp.write_text(json.dumps(asdict(kernel)) + "\n")
    shutil.rmtree(cache_dir / "kernels" / "dl", ignore_errors=True)
    return kernel


#: What building QEMU's C virtio-nsm device from Debian's source needs in the root.
_BUILD_DEPS = ("gcc", "make", "ninja-build", "meson", "pkg-config", "python3", "python3-venv",
               "python3-pycotap", "libglib2.0-dev", "libcbor-dev", "libfdt-dev", "flex",
               "bison", "xz-utils", "dpkg-dev")


def _stage_builtin_qemu(cache_dir: Path, root: Path, progress: Progress) -> list[str]:
    """Build qemu-system-x86_64 from trixie's qemu source with libcbor.

    Debian's binary QEMU is built without libcbor, so it lacks QEMU's own C
    ``virtio-nsm-pci``; the benchmark compares our backend with it. Slow (~20 min
    on 2 cores), so only on request; not needed by the test tier.
    """
    dest = cache_dir / "qemu-nsm"
    exe = dest / "qemu-system-x86_64"
    apt = _Apt(root)
    if exe.exists():  # built before; make sure its libraries (libcbor) are in the root
        _run(apt.argv("install", "-y", "--no-install-recommends", *_BUILD_DEPS), progress,
             "apt-get install (build deps)", env=apt.env(), show=_apt_progress)
        return _builtin_argv(root, exe)
    (root / "etc" / "apt" / "sources.list.d" / "nsm-src.list").write_text(
        f"deb-src {apt_mirror()} {SUITE} main\n")
    progress("installing QEMU build dependencies in the trixie root")
    _run(apt.argv("update"), progress, "apt-get update", env=apt.env(), show=_apt_progress)
    _run(apt.argv("install", "-y", "--no-install-recommends", *_BUILD_DEPS), progress,
         "apt-get install (build deps)", env=apt.env(), show=_apt_progress)
    build = root / "build" / "qemu"
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    progress(f"fetching the qemu source package from {SUITE}")
    _run(["chroot", str(root), "sh", "-c",
          f"cd /build/qemu && apt-get -q source --download-only qemu/{SUITE}"],
         progress, "apt-get source qemu", env=apt.env(), show=_apt_progress)
    script = (
        "set -e; cd /build/qemu; mkdir src; "
        "tar -xf qemu_*.orig.tar.xz -C src --strip-components=1; cd src; "
        # the +ds tarball has no firmware blobs; do not try to unpack edk2's
        "sed -i 's/unpack_edk2_blobs = bzip2.found()/unpack_edk2_blobs = false/' meson.build; "
        # VIRTIO_NSM is only selected by the nitro-enclave machine (which needs gnutls and
        # vhost-user too): build the device on its own for x86's PCI machines
        "sed -i '/^config VIRTIO_NSM$/,/^$/ s/^   bool$/   bool\\n   default y/' "
        "hw/virtio/Kconfig; grep -A3 '^config VIRTIO_NSM' hw/virtio/Kconfig; "
        "mkdir b; cd b; "
        "../configure --target-list=x86_64-softmmu --without-default-features --enable-tcg "
        "--enable-libcbor --enable-fdt=system --enable-attr --enable-virtfs --disable-docs "
        "--disable-tools --disable-werror --disable-install-blobs; "
        "ninja -j$(nproc) qemu-system-x86_64"
    )
    progress("building qemu-system-x86_64 with libcbor (about 20 minutes on 2 cores)")
    _run(["chroot", str(root), "sh", "-c", script], progress, "building QEMU", env=apt.env(),
         show=lambda ln: ln.startswith(("ERROR", "../")) or bool(re.match(r"\[\d+00/", ln)))
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(build / "src" / "b" / "qemu-system-x86_64", exe)
    shutil.rmtree(build, ignore_errors=True)
    return _builtin_argv(root, exe)


def _builtin_argv(root: Path, exe: Path) -> list[str]:
    argv, _env = _root_qemu(root)
    # same loader and libraries as the root's QEMU; firmware from the root too
    return [*argv[:3], str(exe), *argv[4:]]


# --------------------------------------------------------------------------- entry points


def setup(cache_dir: Path | None = None, *, kernel_package: str = DEFAULT_KERNEL_PACKAGE,
          progress: Progress = stderr_progress, force_root_qemu: bool = False,
          with_builtin_nsm: bool = False) -> Toolchain:
    """Build or check the toolchain; idempotent. Returns the toolchain."""
    cache_dir = (cache_dir or default_cache_dir()).resolve()
    t0 = time.monotonic()
    existing = Toolchain.load(cache_dir)
    if existing is not None and kernel_package in existing.kernels and (
            existing.builtin_nsm_device or not with_builtin_nsm) and kernel_has_modules(
            existing.kernels[kernel_package]):
        version, devices = probe_qemu(existing.qemu, existing.qemu_env)
        existing.qemu_version, existing.qemu_devices = version, devices
        kernel = existing.kernel(kernel_package)
        existing.initramfs(kernel)
        _stage_enclave_tool(existing, progress)
        existing.save()
        progress(f"toolchain ready in {cache_dir} ({version}; kernel {kernel.version}) "
                 f"[{time.monotonic() - t0:.1f} s]")
        return existing

    _check_root()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SetupError(f"cannot create the cache directory {cache_dir}: {exc}") from exc
    with _locked(cache_dir):
        try:
            return _setup_locked(cache_dir, kernel_package, progress, force_root_qemu,
                                 with_builtin_nsm, t0)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise SetupError(f"the disk holding {cache_dir} is full: {exc}") from exc
            raise


def _setup_locked(cache_dir: Path, kernel_package: str, progress: Progress,
                  force_root_qemu: bool, with_builtin_nsm: bool, t0: float) -> Toolchain:
    existing = Toolchain.load(cache_dir)
    osr = _os_release()
    progress(f"setting up the VM toolchain in {cache_dir} "
             f"(host: {osr.get('PRETTY_NAME', 'unknown')})")
    host = None if force_root_qemu else _host_qemu()
    need_root = host is None or osr.get("VERSION_CODENAME") != SUITE or with_builtin_nsm
    root: Path | None = None
    stamp_ok = (cache_dir / "root" / ".nsm-qemu-done").exists()
    if need_root and not stamp_ok:
        _check_space(cache_dir)
        mirror = apt_mirror()
        progress(f"Debian mirror: {mirror}")
        _check_network(mirror)
    elif existing is None and not (cache_dir / "kernels").exists():
        _check_space(cache_dir)
    if need_root:
        mirror = apt_mirror()
        root = _stage_root(cache_dir, mirror, progress)
        if host is None:
            _stage_qemu(root, progress)
    if host is not None:
        qemu, qemu_env = host
        progress(f"using the host's QEMU {qemu[0]}")
    else:
        assert root is not None
        qemu, qemu_env = _root_qemu(root)
    version, devices = probe_qemu(qemu, qemu_env)
    if "vhost-user-test-device-pci" not in devices:
        raise SetupError(f"{version} has no vhost-user-test-device-pci (QEMU >= 10.2 needed)")
    progress(f"QEMU: {version}; devices: {', '.join(devices)}")
    apt = _Apt(root)
    lists = root / "var" / "lib" / "apt" / "lists" if root is not None else None
    if lists is not None and not any(lists.glob("*Packages")):
        _run(apt.argv("update"), progress, "apt-get update", env=apt.env(), show=_apt_progress)
    busybox = _stage_busybox(cache_dir, apt, root, progress)
    kernel = _stage_kernel(cache_dir, apt, kernel_package, progress)
    tc = Toolchain(
        cache_dir=str(cache_dir), qemu=qemu, qemu_env=qemu_env, qemu_version=version,
        qemu_devices=devices, busybox=str(busybox),
        kernels=dict(existing.kernels) if existing else {},
        default_kernel=existing.default_kernel if existing else "",
        builtin_qemu=existing.builtin_qemu if existing else [],
    )
    tc.kernels[kernel_package] = kernel
    if not tc.default_kernel or kernel_package == DEFAULT_KERNEL_PACKAGE:
        tc.default_kernel = kernel_package
    built = cache_dir / "qemu-nsm" / "qemu-system-x86_64"
    if with_builtin_nsm:
        assert root is not None
        tc.builtin_qemu = _stage_builtin_qemu(cache_dir, root, progress)
    elif not tc.builtin_qemu and root is not None and built.exists():
        tc.builtin_qemu = _builtin_argv(root, built)  # built by an earlier --with-builtin-nsm
    if tc.builtin_qemu:
        try:
            _version, bdevices = probe_qemu(tc.builtin_qemu, qemu_env)
        except SetupError:
            bdevices = []
        if "virtio-nsm-pci" not in bdevices:
            if with_builtin_nsm:
                raise SetupError(f"the QEMU built in {built.parent} has no working virtio-nsm-pci")
            tc.builtin_qemu = []
    initrd = tc.initramfs(kernel)
    _stage_enclave_tool(tc, progress)
    tc.save()
    progress(f"toolchain ready: kernel {kernel.version}, initramfs {initrd.name} "
             f"[{time.monotonic() - t0:.1f} s]")
    return tc


def _stage_enclave_tool(tc: Toolchain, progress: Progress) -> None:
    """Compile the enclave images' static helper now (cached by its source's hash); a
    host without a C compiler still gets a working VM tier, with a warning."""
    from virtio_nsm.enclave.image import tool_binary

    try:
        tool_binary(tc, progress)
    except SetupError as exc:
        progress(f"warning: enclave images will not build here: {exc}")


def load_or_setup(cache_dir: Path | None = None, kernel: str | None = None,
                  progress: Progress = stderr_progress) -> Toolchain:
    """The cached toolchain; runs set-up first when it is missing (a fresh machine)."""
    cache_dir = (cache_dir or default_cache_dir()).resolve()
    tc = Toolchain.load(cache_dir)
    if tc is not None and (kernel is None or kernel in tc.kernels or any(
            kernel == k.version for k in tc.kernels.values())):
        return tc
    progress("the VM toolchain is not set up yet; setting it up now")
    return setup(cache_dir, kernel_package=kernel or DEFAULT_KERNEL_PACKAGE, progress=progress)
