"""The sample enclave image's pieces (no VM): ramdisk layout, /cmd and /env, the app's request."""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
from pathlib import Path

import cbor2
import pytest

from virtio_nsm.enclave import image
from virtio_nsm.nsm.device import NsmDevice
from virtio_nsm.vm.initramfs import build_cpio
from virtio_nsm.vm.setup import Toolchain, default_cache_dir


def _parse_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    out: dict[str, tuple[int, bytes]] = {}
    off = 0
    while True:
        hdr = data[off:off + 110]
        assert hdr[:6] == b"070701"
        fields = [int(hdr[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[off + 110:off + 110 + namesize - 1].decode()
        off += 110 + namesize
        off += -off % 4
        body = data[off:off + size]
        off += size + (-size % 4)
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body)


def _printf_bytes(fmt: str) -> bytes:
    """What busybox's printf writes for a format of literal text and octal escapes."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fmt.encode())


def test_sample_app_request_is_an_attestation_request_the_device_answers() -> None:
    fmt = re.search(r"printf '([^']*)'", image.SAMPLE_ATTEST)
    assert fmt is not None
    nonce = bytes(range(image.SAMPLE_NONCE_LEN))
    request = _printf_bytes(fmt.group(1)) + nonce
    assert cbor2.loads(request) == {"Attestation": {"nonce": nonce}}
    answer = cbor2.loads(NsmDevice().handle(request))
    assert set(answer) == {"Attestation"} and isinstance(answer["Attestation"]["document"], bytes)
    assert f"head -c {image.SAMPLE_NONCE_LEN}" in image.SAMPLE_ATTEST


def test_app_ramdisk_layout(tmp_path: Path) -> None:
    tc = Toolchain.load(default_cache_dir())
    busybox = tc.busybox if tc is not None else shutil.which("busybox")
    if busybox is None:
        pytest.skip("no busybox here (neither the VM cache's nor the host's)")
    tool = tmp_path / "tool"
    tool.write_bytes(b"\x7fELF tool")
    entries = image.app_entries(Path(busybox), tool, ["/app/main.sh", "--flag", "two words"],
                                {"A": "1", "B": "x=y"}, {"app/main.sh": (0o755, b"#!/bin/sh\n")})
    files = _parse_cpio(build_cpio(entries))
    assert files["cmd"][1] == b"/app/main.sh\n--flag\ntwo words\n"  # one argument per line
    assert files["env"][1] == b"A=1\nB=x=y\n"
    mode, data = files["rootfs/app/main.sh"]
    assert stat.S_ISREG(mode) and mode & 0o777 == 0o755 and data == b"#!/bin/sh\n"
    assert stat.S_ISLNK(files["rootfs/bin/sh"][0]) and files["rootfs/bin/sh"][1] == b"busybox"
    assert files["rootfs/bin/nsm-enclave-tool"][1] == b"\x7fELF tool"
    for d in ("rootfs/dev", "rootfs/proc", "rootfs/tmp", "rootfs/app"):
        assert stat.S_ISDIR(files[d][0])


@pytest.mark.parametrize(("command", "env"), [
    ([], {}), (["a\nb"], {}), ([""], {}), (["x"], {"A=B": "1"}), (["x"], {"A": "1\n2"}),
    (["x"], {"": "1"}),
])
def test_app_ramdisk_refuses_what_cmd_and_env_cannot_hold(tmp_path: Path, command: list[str],
                                                          env: dict[str, str]) -> None:
    (tmp_path / "bb").write_bytes(b"")
    with pytest.raises(ValueError):
        image.app_entries(tmp_path / "bb", tmp_path / "bb", command, env)


def test_bootstrap_ramdisk_layout(tmp_path: Path) -> None:
    mods = tmp_path / "mods"
    mods.mkdir()
    for m in (*image.ENCLAVE_MODULES, "nsm"):
        (mods / f"{m}.ko").write_bytes(m.encode())
    (tmp_path / "bb").write_bytes(b"busybox")
    (tmp_path / "tool").write_bytes(b"tool")
    files = _parse_cpio(build_cpio(image.bootstrap_entries(tmp_path / "bb", mods,
                                                           tmp_path / "tool")))
    assert files["nsm.ko"][1] == b"nsm"  # where AWS's init looks for it
    assert files["init"][1] == image.BOOTSTRAP_INIT.encode() and files["init"][0] & 0o111
    for m in image.ENCLAVE_MODULES:
        assert files[f"lib/modules/{m}.ko"][1] == m.encode()
    init = image.BOOTSTRAP_INIT
    # the order AWS's init keeps: drivers, then the heartbeat, then the command
    assert init.index("insmod /nsm.ko") < init.index("heartbeat 3 9000") < init.index("chroot /rootfs")
    # the modules the image carries, in dependency order (vsock before its transports)
    loop = re.search(r"^for m in (.*); do$", init, re.M)
    assert loop is not None and tuple(loop.group(1).split()) == image.ENCLAVE_MODULES
    assert image.ENCLAVE_MODULES.index("vsock") < image.ENCLAVE_MODULES.index(
        "vmw_vsock_virtio_transport_common") < image.ENCLAVE_MODULES.index(
        "vmw_vsock_virtio_transport")


def test_tool_compiles_and_checks_its_arguments(tmp_path: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "t.c"
    src.write_bytes(image.tool_source())
    out = tmp_path / "t"
    assert image._compile(src, out, None) is None, "the tool does not compile"
    res = subprocess.run([str(out)], capture_output=True, text=True)
    assert res.returncode == 2 and "usage" in res.stderr
    res = subprocess.run([str(out), "heartbeat", "3", "notaport"], capture_output=True, text=True)
    assert res.returncode == 2 and "not a number" in res.stderr
    res = subprocess.run([str(out), "nsm-raw", str(tmp_path / "nodev")], input=b"\xa0",
                         capture_output=True)
    assert res.returncode == 1 and b"nodev" in res.stderr
    res = subprocess.run([str(out), "nsm-raw", "/dev/null"], input=b"x" * 5000,
                         capture_output=True)
    assert res.returncode == 1 and b"longer than 4096" in res.stderr
