"""Fast checks of the VM tier's plumbing (no guest is booted)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from virtio_nsm.vm import initramfs, run, setup


def _parse_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    out: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[pos + 110: pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos: pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body)


def test_cpio_round_trip() -> None:
    entries = [("bin", 0o040755, b""), ("bin/x", 0o100755, b"abc"), ("init", 0o100755, b"#!")]
    parsed = _parse_newc(initramfs.build_cpio(entries))
    assert parsed == {name: (mode, data) for name, mode, data in entries}


def test_initramfs_contents(tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF-busybox")
    mods = tmp_path / "mods"
    mods.mkdir()
    for m in initramfs.GUEST_MODULES:
        (mods / f"{m}.ko").write_bytes(m.encode())
    path = initramfs.write_initramfs(busybox, mods, tmp_path / "out")
    assert path == initramfs.write_initramfs(busybox, mods, tmp_path / "out")  # cached by content
    parsed = _parse_newc(path.read_bytes())
    assert parsed["init"][1].decode() == initramfs.INIT_SCRIPT
    assert parsed["bin/busybox"][1] == b"\x7fELF-busybox"
    assert {f"lib/modules/{m}.ko" for m in initramfs.GUEST_MODULES} <= set(parsed)
    assert "NSM-VM-EXIT:" in initramfs.INIT_SCRIPT and "poweroff -f" in initramfs.INIT_SCRIPT


def test_apt_mirror_one_line_and_deb822(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NSM_VM_MIRROR", raising=False)
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb\n# comment\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n")
    assert setup.apt_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list").write_text(
        "deb [arch=amd64] http://other.example/debian/ trixie main\n")
    assert setup.apt_mirror(tmp_path) == "http://other.example/debian"
    monkeypatch.setenv("NSM_VM_MIRROR", "http://override.example/debian/")
    assert setup.apt_mirror(tmp_path) == "http://override.example/debian"


def test_apt_mirror_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NSM_VM_MIRROR", raising=False)
    with pytest.raises(setup.SetupError, match="NSM_VM_MIRROR"):
        setup.apt_mirror(tmp_path)


def test_setup_needs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(setup.SetupError, match="must run as root"):
        setup.setup(tmp_path / "cache", progress=lambda _m: None)


def test_setup_reports_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Usage:
        free = 100 * 2**20

    monkeypatch.setattr(setup.shutil, "disk_usage", lambda _p: Usage())
    with pytest.raises(setup.SetupError, match="not enough disk space"):
        setup._check_space(tmp_path / "a" / "b")


def test_setup_reports_no_network() -> None:
    with pytest.raises(setup.SetupError, match="cannot reach the Debian archive"):
        setup._check_network("http://127.0.0.1:9/debian")


def test_failed_download_is_called_a_network_problem() -> None:
    with pytest.raises(setup.SetupError, match="no network"):
        setup._run(["sh", "-c", "echo 'E: Failed to fetch http://x/y'; exit 100"],
                   lambda _m: None, "apt-get install")
    with pytest.raises(setup.SetupError, match="disk is full"):
        setup._run(["sh", "-c", "echo 'write: No space left on device'; exit 1"],
                   lambda _m: None, "debootstrap")


def test_guest_command_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NSM_DEVICE", "vhost-user:/host/only.sock")
    monkeypatch.setenv("PYTHONPATH", "/some/where")
    opts = run.RunOptions(command=["sh", "-c", "echo 'a b' \"$X\""], env={"X": "y z"},
                          cwd="/work")
    run.write_command_script(opts, tmp_path)
    script = (tmp_path / "cmd.sh").read_text()
    lines = script.splitlines()
    assert lines[-1] == "exec " + shlex.join(opts.command)
    assert "NSM_DEVICE" not in script  # the guest uses its own /dev/nsm
    assert "export X='y z'" in lines
    assert "cd /work 2>/dev/null || cd /" in lines
    pythonpath = next(ln for ln in lines if ln.startswith("export PYTHONPATH="))
    assert "/some/where" in pythonpath
    assert os.access(tmp_path / "bin" / "nsm", os.X_OK)


def test_guest_status_from_file_or_console(tmp_path: Path) -> None:
    assert run._guest_status(tmp_path) is None
    (tmp_path / "console.log").write_text("boot\nNSM-VM-EXIT: 7\n")
    assert run._guest_status(tmp_path) == 7
    (tmp_path / "status").write_text("3\n")
    assert run._guest_status(tmp_path) == 3


def test_kernel_stage_adds_cuse_and_keeps_modules_extracted_before(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache extracted without cuse.ko is extracted again (nsm cuse needs /dev/cuse in the
    guest); modules another tree's set-up put there stay."""
    from collections.abc import Callable, Iterator

    kdir = tmp_path / "kernels" / "linux-image-6.12-amd64"
    (kdir / "modules").mkdir(parents=True)
    for m in initramfs.GUEST_MODULES:
        if m != "cuse":
            (kdir / "modules" / f"{m}.ko").write_bytes(b"old")
    (kdir / "modules" / "other.ko").write_bytes(b"someone else's")  # no set-up extracts it
    (kdir / ".done").write_text('{"version": "6.12", "vmlinuz": "x", "module_dir": "y"}')

    class FakeApt:
        def resolve_kernel(self, package: str) -> list[str]:
            return ["linux-image-6.12-amd64"]

        def download(self, package: str, dest: Path, progress: object) -> Path:
            dest.mkdir(parents=True, exist_ok=True)
            return dest / "k.deb"

    def members(deb: Path, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
        names = ["boot/vmlinuz-6.12-amd64"] + [
            f"lib/modules/6.12-amd64/{path}" for path in setup._MODULE_PATHS.values()]
        for name in names:
            if wanted(name):
                yield name, b"new " + name.encode()

    monkeypatch.setattr(setup, "_deb_members", members)
    kernel = setup._stage_kernel(tmp_path, FakeApt(), "linux-image-amd64",  # type: ignore[arg-type]
                                 lambda _m: None)
    mods = Path(kernel.module_dir)
    assert (mods / "cuse.ko").read_bytes().endswith(b"kernel/fs/fuse/cuse.ko")
    assert (mods / "nsm.ko").read_bytes().startswith(b"new ")
    assert (mods / "other.ko").read_bytes() == b"someone else's"
    assert (mods / "vsock.ko").read_bytes().startswith(b"new ")  # the guests load it now
    assert "insmod /lib/modules/cuse.ko" in initramfs.INIT_SCRIPT
