"""Enclave images end to end (issue 15): build -> describe -> run -> attest over vsock ->
verify against the described PCRs -> terminate, as a user does it with the CLI.

Three TCG boots: a production-mode enclave, a debug-mode one (zero PCRs, console) and
an image whose init never sends the heartbeat.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import cbor2
import pytest

from virtio_nsm.eif import build_eif
from virtio_nsm.eif.measure import pcr_of_instance
from virtio_nsm.enclave import image, launcher, registry
from virtio_nsm.enclave.demo import attest_over_vsock
from virtio_nsm.vm.initramfs import build_cpio
from virtio_nsm.vm.setup import Toolchain, load_or_setup

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
INSTANCE = "i-0123456789abcdef0"


@pytest.fixture(scope="module")
def toolchain() -> Toolchain:
    return load_or_setup()


@pytest.fixture(scope="module")
def run_base() -> Iterator[Path]:
    """A private registry, and a private TMPDIR for the commands (to see what they leave)."""
    base = Path(tempfile.mkdtemp(prefix="encvm", dir="/tmp"))
    private_tmp = base / ".tmp"
    private_tmp.mkdir()
    saved = {k: os.environ.get(k) for k in (registry.RUN_DIR_ENV, "TMPDIR")}
    os.environ[registry.RUN_DIR_ENV] = str(base)
    os.environ["TMPDIR"] = str(private_tmp)
    yield base
    for e in launcher.list_enclaves():
        e.terminate()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    shutil.rmtree(base, ignore_errors=True)


def nsm(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ":".join([str(REPO / "src"),
                                  *[p for p in env.get("PYTHONPATH", "").split(":") if p]])
    return subprocess.run([sys.executable, "-m", "virtio_nsm", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def sample(toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    eif = tmp_path_factory.mktemp("eif") / "sample.eif"
    res = nsm("enclave", "build-sample", "-o", str(eif))
    assert res.returncode == 0, res.stderr
    built = json.loads(res.stdout)
    res = nsm("eif", "describe", "--eif-path", str(eif), "--json")
    assert res.returncode == 0, res.stderr
    described = json.loads(res.stdout)
    assert described["Measurements"] == built["Measurements"] and described["CheckCRC"] is True
    return eif, described["Measurements"]


def _processes_of(run_dir: Path) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if str(run_dir).encode() in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


def _wait_gone(run_dir: Path, timeout: float = 20) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _processes_of(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_run_attest_verify_terminate(sample: tuple[Path, dict], run_base: Path,
                                     tmp_path: Path) -> None:
    eif, measurements = sample
    res = nsm("enclave", "run", "--eif-path", str(eif), "--parent-instance-id", INSTANCE,
              "--enclave-name", "e2e")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["EnclaveName"] == "e2e" and info["EnclaveCID"] >= 4
    assert info["EnclaveID"].startswith(f"{INSTANCE}-enc")
    assert info["NumberOfCPUs"] == image.SAMPLE_CPUS
    assert info["MemoryMiB"] == image.SAMPLE_MEMORY_MIB  # the image header's default
    run_dir = run_base / info["EnclaveID"]
    [desc] = json.loads(nsm("enclave", "describe").stdout)
    assert desc["State"] == "RUNNING" and desc["Flags"] == "NONE"
    assert desc["Measurements"] == measurements and desc["ProcessID"] == info["ProcessID"]
    # production mode has no console
    res = nsm("enclave", "console", "--enclave-id", info["EnclaveID"])
    assert res.returncode == 1 and "debug mode" in res.stderr

    # the parent asks the enclave's app for a document over vsock (hybrid socket)
    enclave = launcher.find(info["EnclaveID"])
    nonce = secrets.token_bytes(image.SAMPLE_NONCE_LEN)
    document = attest_over_vsock(enclave, nonce)
    payload = cbor2.loads(cbor2.loads(document)[2])
    assert payload["module_id"] == info["EnclaveID"]  # as on Nitro
    assert payload["pcrs"][0].hex() == measurements["PCR0"]
    doc = tmp_path / "doc.cbor"
    doc.write_bytes(document)
    root = run_dir / "state" / "ca" / "root.pem"
    pcr_args = [f"--pcr={i}={measurements[f'PCR{i}']}" for i in (0, 1, 2)]
    res = nsm("verify", str(doc), "--root", str(root), "--nonce", nonce.hex(), *pcr_args,
              f"--pcr=4={pcr_of_instance(INSTANCE).hex()}", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    # a policy with another PCR0 fails
    res = nsm("verify", str(doc), "--root", str(root), "--nonce", nonce.hex(),
              f"--pcr=0={'00' * 48}")
    assert res.returncode == 1
    # a second request on a fresh connection: the app serves many
    assert attest_over_vsock(enclave, secrets.token_bytes(image.SAMPLE_NONCE_LEN))

    pids = _processes_of(run_dir)
    assert len(pids) >= 3  # supervisor, QEMU, nsm serve (+ the vsock backend)
    res = nsm("enclave", "terminate", "--enclave-id", info["EnclaveID"])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"EnclaveName": "e2e", "EnclaveID": info["EnclaveID"],
                                      "Terminated": True}
    assert _wait_gone(run_dir) == []
    assert not run_dir.exists() and not Path(info["VsockSocket"]).exists()
    assert sorted(os.listdir(run_base)) == [".lock", ".tmp"]
    assert os.listdir(run_base / ".tmp") == []  # no temporary file of the commands is left
    assert json.loads(nsm("enclave", "describe").stdout) == []


def test_debug_mode_zero_pcrs_and_console(sample: tuple[Path, dict], run_base: Path,
                                          tmp_path: Path) -> None:
    eif, _measurements = sample
    vsock = tmp_path / "v.sock"
    res = nsm("enclave", "run", "--eif-path", str(eif), "--debug-mode", "--vsock-socket",
              str(vsock), "--cpu-count", "1", "--memory", "320")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["VsockSocket"] == str(vsock) and info["MemoryMiB"] == 320
    enclave = launcher.find(info["EnclaveID"])
    nonce = secrets.token_bytes(image.SAMPLE_NONCE_LEN)
    document = attest_over_vsock(enclave, nonce)
    payload = cbor2.loads(cbor2.loads(document)[2])
    assert payload["nonce"] == nonce
    for i in range(16):
        assert payload["pcrs"][i] == bytes(48), f"PCR{i} is not zero in debug mode"
    res = nsm("enclave", "console", "--enclave-name", info["EnclaveName"],
              "--disconnect-timeout", "1")
    assert res.returncode == 0
    assert "nsm-enclave-init: ready" in res.stdout
    assert "sample app: /dev/nsm is crw-rw-rw-" in res.stdout
    run_dir = enclave.run_dir
    res = nsm("enclave", "terminate", "--all")
    assert res.returncode == 0 and json.loads(res.stdout)["Terminated"] is True
    assert _wait_gone(run_dir) == []
    assert not vsock.exists() and not Path(f"{vsock}_9000").exists()


def test_image_without_heartbeat_is_a_clear_error(toolchain: Toolchain, run_base: Path,
                                                  tmp_path: Path) -> None:
    kernel = image.enclave_kernel(toolchain)
    init = (b"#!/bin/busybox sh\n/bin/busybox mount -t devtmpfs dev /dev\n"
            b"echo 'broken init: no heartbeat here' > /dev/console\nexit 1\n")
    boot = tmp_path / "boot.cpio"
    boot.write_bytes(build_cpio([("bin", image.DIR, b""), ("dev", image.DIR, b""),
                                 ("bin/busybox", image.EXE, Path(toolchain.busybox).read_bytes()),
                                 ("init", image.EXE, init)]))
    eif = tmp_path / "broken.eif"
    build_eif(eif, kernel=kernel.vmlinuz, cmdline=image.SAMPLE_CMDLINE, ramdisks=[boot],
              metadata=None, default_mem=128 << 20, default_cpus=1)
    res = nsm("enclave", "run", "--eif-path", str(eif))
    assert res.returncode == 1
    assert "did not start: the enclave stopped before it was ready" in res.stderr, res.stderr
    assert "broken init: no heartbeat here" in res.stderr
    console = Path(res.stderr.split("console log: ")[1].split()[0])
    assert "broken init" in console.read_text()
    assert [p for p in run_base.iterdir() if not p.name.startswith((".", "failed-"))] == []
    assert os.listdir(run_base / ".tmp") == []
    assert _wait_gone(console.parent) == []


def test_demo_enclave(toolchain: Toolchain, run_base: Path, tmp_path: Path) -> None:
    res = nsm("demo", "--enclave", "-o", str(tmp_path / "kept"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "5/6 verify" in res.stdout and "demo passed" in res.stdout
    # what it kept verifies with the command it printed
    kept = tmp_path / "kept"
    line = next(ln for ln in res.stdout.splitlines() if "try: nsm verify" in ln)
    args = line.split("try: nsm verify ", 1)[1].rstrip(")").split()
    assert (kept / "document.cbor").is_file()
    res = nsm("verify", *args)
    assert res.returncode == 0, res.stdout + res.stderr
    assert [p for p in run_base.iterdir() if not p.name.startswith((".", "failed-"))] == []
