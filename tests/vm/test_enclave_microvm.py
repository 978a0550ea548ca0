"""The enclave machine without vsock: a TCG microvm with our NSM on virtio-mmio.

Boots Debian's kernel as ``-M microvm`` (ACPI describes the mmio transports) with the
enclave image's bootstrap pieces (virtio_mmio.ko, nsm.ko, nsm-enclave-tool) and a test
init instead of the heartbeat: Linux's ``nsm.ko`` must bind our vhost-user device and
answer a DescribeNSM through ``/dev/nsm``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cbor2
import pytest

from virtio_nsm.enclave import image, machine
from virtio_nsm.enclave.supervisor import TCG_CMDLINE
from virtio_nsm.vm.initramfs import build_cpio
from virtio_nsm.vm.setup import Toolchain, load_or_setup

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]

TEST_INIT = r"""#!/bin/busybox sh
B=/bin/busybox
$B mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B insmod /lib/modules/virtio_mmio.ko || echo "TEST: insmod virtio_mmio failed"
$B insmod /nsm.ko || echo "TEST: insmod nsm failed"
for i in 1 2 3 4 5 6 7 8 9 10; do [ -c /dev/nsm ] && break; $B sleep 0.2; done
echo "TEST: devices $($B cat /sys/bus/virtio/devices/*/device | $B tr '\n' ' ')"
echo "TEST: driver $($B ls /sys/bus/virtio/drivers/nsm 2>&1 | $B grep -c virtio)"
$B ls -l /dev/nsm
printf '\153DescribeNSM' | /bin/nsm-enclave-tool nsm-raw > /resp
echo "TEST: rc $?"
echo "TEST: resp $($B od -An -tx1 -v /resp | $B tr -d ' \n')"
$B poweroff -f
"""


@pytest.fixture(scope="module")
def toolchain() -> Toolchain:
    return load_or_setup()


def test_microvm_mmio_nsm_binds_and_answers(toolchain: Toolchain, tmp_path: Path) -> None:
    tc = toolchain
    kernel = image.enclave_kernel(tc)
    tool = image.tool_binary(tc)
    mods = Path(kernel.module_dir)
    entries = [(d, image.DIR, b"") for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules")]
    entries += [
        ("bin/busybox", image.EXE, Path(tc.busybox).read_bytes()),
        ("bin/nsm-enclave-tool", image.EXE, tool.read_bytes()),
        ("lib/modules/virtio_mmio.ko", image.REG, (mods / "virtio_mmio.ko").read_bytes()),
        ("nsm.ko", image.REG, (mods / "nsm.ko").read_bytes()),
        ("init", image.EXE, TEST_INIT.encode()),
    ]
    initrd = tmp_path / "initrd.cpio"
    initrd.write_bytes(build_cpio(entries))
    sock = tmp_path / "nsm.sock"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    backend = subprocess.Popen([sys.executable, "-m", "virtio_nsm", "serve", "-q",
                                "--vhost-user", str(sock), "--state-dir", str(tmp_path / "st")],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert backend.poll() is None, "nsm serve exited"
            assert time.monotonic() < deadline, "nsm serve did not create its socket"
            time.sleep(0.05)
        console = tmp_path / "console.log"
        spec = machine.MachineSpec(
            kernel=kernel.vmlinuz, initrd=str(initrd),
            cmdline=f"console=ttyS0 panic=-1 pci=off {TCG_CMDLINE}", cpus=1, memory_mib=256,
            console_log=console, nsm_socket=sock)
        res = subprocess.run(machine.qemu_argv(tc, spec), env=dict(os.environ, **tc.qemu_env),
                             capture_output=True, text=True, timeout=300)
    finally:
        backend.send_signal(signal.SIGTERM)
        backend.wait(10)
    log = console.read_text(errors="replace")
    assert res.returncode == 0, res.stderr + log[-3000:]
    lines = dict(re.findall(r"^TEST: (\w+) ?(.*)$", log, re.M))
    assert "0x0021" in lines.get("devices", ""), log[-3000:]  # virtio device 33 on mmio
    assert lines.get("driver") == "1", log[-3000:]            # nsm.ko bound it
    assert re.search(r"^crw-rw-rw-\s.*\s/dev/nsm$", log, re.M), log[-3000:]
    assert lines.get("rc") == "0", log[-3000:]
    answer = cbor2.loads(bytes.fromhex(lines["resp"]))
    desc = answer["DescribeNSM"]
    assert desc["max_pcrs"] == 32
    assert desc["digest"] == "SHA384"
    assert desc["locked_pcrs"] == list(range(16))
