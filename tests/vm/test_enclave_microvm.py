"""The enclave machine without vsock: a TCG microvm with our NSM on virtio-mmio.

Boots Debian's kernel as ``-M microvm`` (ACPI describes the mmio transports) with the
sample image's bootstrap ramdisk (its init minus the heartbeat: no vsock device here)
and a test app ramdisk: the init must load the drivers, hand /cmd and /env to the app
in its own session inside /rootfs, and Linux's ``nsm.ko`` must bind our vhost-user
device and answer a DescribeNSM through ``/dev/nsm``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import cbor2
import pytest

from virtio_nsm._process import stop_process
from virtio_nsm.enclave import image, machine
from virtio_nsm.enclave.supervisor import TCG_CMDLINE
from virtio_nsm.vm.initramfs import build_cpio
from virtio_nsm.vm.setup import Toolchain, load_or_setup

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]

#: The app for this test: what the init handed over (arguments, environment, session,
#: mounts) and the NSM through /dev/nsm; exits 7.
TEST_APP = r"""#!/bin/sh
echo "TEST: args $#|$1|$2"
echo "TEST: env $GREETING|$HOME|$PATH"
echo "TEST: session $(cut -d' ' -f6 /proc/self/stat) $$"
echo "TEST: mounts $(grep -c -E ' /(dev|proc|sys|tmp|run) ' /proc/mounts)"
echo "TEST: devices $(cat /sys/bus/virtio/devices/*/device | tr '\n' ' ')"
echo "TEST: driver $(ls /sys/bus/virtio/drivers/nsm | grep -c virtio)"
ls -l /dev/nsm
printf '\153DescribeNSM' | nsm-enclave-tool nsm-raw > /tmp/resp
echo "TEST: rc $?"
echo "TEST: resp $(od -An -tx1 -v /tmp/resp | tr -d ' \n')"
exit 7
"""
HEARTBEAT = "/bin/nsm-enclave-tool heartbeat 3 9000 20000"


@pytest.fixture(scope="module")
def toolchain() -> Toolchain:
    return load_or_setup()


def test_microvm_mmio_nsm_binds_and_answers(toolchain: Toolchain, tmp_path: Path) -> None:
    tc = toolchain
    kernel = image.enclave_kernel(tc)
    tool = image.tool_binary(tc)
    busybox = Path(tc.busybox)
    # the image's own init, without the heartbeat (this machine has no vsock device)
    assert HEARTBEAT in image.BOOTSTRAP_INIT
    boot = image.bootstrap_entries(busybox, Path(kernel.module_dir), tool)
    boot = [(n, m, image.BOOTSTRAP_INIT.replace(HEARTBEAT, "true").encode() if n == "init" else d)
            for n, m, d in boot]
    app = image.app_entries(busybox, tool, ["/app/t.sh", "two words", "x"],
                            {"GREETING": "hi there", "HOME": "/root"},
                            {"app/t.sh": (0o755, TEST_APP.encode())})
    initrd = tmp_path / "initrd.cpio"
    initrd.write_bytes(build_cpio(boot) + build_cpio(app))
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
            cmdline=f"{image.SAMPLE_CMDLINE} {TCG_CMDLINE}", cpus=1, memory_mib=256,
            console_log=console, nsm_socket=sock)
        res = subprocess.run(machine.qemu_argv(tc, spec), env=dict(os.environ, **tc.qemu_env),
                             capture_output=True, text=True, timeout=300)
    finally:
        stop_process(backend, timeout=10)
    log = console.read_text(errors="replace")
    assert res.returncode == 0, res.stderr + log[-3000:]
    lines = dict(re.findall(r"^TEST: (\w+) ?(.*)$", log, re.M))
    assert lines.get("args") == "2|two words|x", log[-3000:]  # /cmd: one argument per line
    assert lines.get("env") == "hi there|/root|/sbin:/usr/sbin:/bin:/usr/bin"
    sid, pid = lines["session"].split()
    assert sid == pid  # the command leads its own session
    assert lines.get("mounts") == "5"
    assert "nsm-enclave-init: command exited with status 7" in log
    assert "0x0021" in lines.get("devices", ""), log[-3000:]  # virtio device 33 on mmio
    assert lines.get("driver") == "1", log[-3000:]            # nsm.ko bound it
    assert re.search(r"^crw-rw-rw-\s.*\s/dev/nsm$", log, re.M), log[-3000:]
    assert lines.get("rc") == "0", log[-3000:]
    answer = cbor2.loads(bytes.fromhex(lines["resp"]))
    desc = answer["DescribeNSM"]
    assert desc["max_pcrs"] == 32
    assert desc["digest"] == "SHA384"
    assert desc["locked_pcrs"] == list(range(16))
