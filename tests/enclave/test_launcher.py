"""The launcher and supervisor without a VM: QEMU replaced by a script that plays the
enclave's side of the readiness heartbeat; the NSM backend is the real ``nsm serve``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtio_nsm.enclave import launcher, registry
from virtio_nsm.vm.setup import Toolchain

FAKE_QEMU = Path(__file__).with_name("fake_qemu.py")


@pytest.fixture
def run_base(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # short: Unix socket paths are limited to 108 bytes
    base = Path(tempfile.mkdtemp(prefix="enc", dir="/tmp"))
    monkeypatch.setenv(registry.RUN_DIR_ENV, str(base))
    yield base
    for d, rec in registry.records(base):  # running or still starting
        launcher.Enclave(d, rec).terminate()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def fake_tc(tmp_path: Path) -> Toolchain:
    return Toolchain(cache_dir=str(tmp_path), qemu=[sys.executable, str(FAKE_QEMU)], qemu_env={},
                     qemu_version="fake", qemu_devices=[], busybox="")


@pytest.fixture
def parts_image(tmp_path: Path) -> launcher.BootImage:
    (tmp_path / "vmlinuz").write_bytes(b"K" * 1000)
    (tmp_path / "r1").write_bytes(b"1" * 300)
    (tmp_path / "r2").write_bytes(b"2" * 200)
    return launcher.image_from_parts(tmp_path / "vmlinuz", [tmp_path / "r1", tmp_path / "r2"],
                                     "console=ttyS0", name="fake")


def _pids(e: launcher.Enclave) -> list[int]:
    return [int(e.record[k]) for k in ("ProcessID", "QemuPID", "NsmBackendPID", "VsockBackendPID")
            if k in e.record]


def _wait_dead(pids: list[int], timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if registry.pid_alive(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return alive


def test_start_describe_terminate_leaves_nothing(run_base: Path, fake_tc: Toolchain,
                                                 parts_image: launcher.BootImage,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "ok")
    e = launcher.start(parts_image, launcher.EnclaveOptions(cpu_count=1, memory_mib=128),
                       tc=fake_tc)
    info = e.run_info()
    assert list(info) == ["EnclaveName", "EnclaveID", "ProcessID", "EnclaveCID", "NumberOfCPUs",
                          "CPUIDs", "MemoryMiB", "VsockSocket"]
    assert info["EnclaveName"] == "fake" and info["EnclaveCID"] == 4
    assert info["EnclaveID"].startswith(registry.DEFAULT_INSTANCE_ID + "-enc")
    assert info["NumberOfCPUs"] == 1 and info["CPUIDs"] == [0] and info["MemoryMiB"] == 128
    # the supervisor is the enclave's process, in a session of its own
    assert os.getsid(e.pid) == e.pid
    [desc] = [d.describe() for d in launcher.list_enclaves()]
    assert desc["State"] == "RUNNING" and desc["Flags"] == "NONE"
    assert desc["EnclaveID"] == info["EnclaveID"]
    # the fake read the kernel and the concatenated ramdisks from QEMU's -kernel/-initrd
    deadline = time.monotonic() + 10
    while "answered" not in (log := (e.run_dir / "fake-qemu.txt").read_text()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "kernel 1000 bytes, initrd 500 bytes" in log and "heartbeat answered" in log
    # no console outside debug mode (the boot log is gone once the enclave is ready)
    assert not e.console_log.exists()
    assert (e.run_dir / "state").is_dir()  # a fresh NSM state directory
    assert oct(e.run_dir.stat().st_mode & 0o777) == "0o700"
    # a second enclave gets the next CID; the name must differ
    with pytest.raises(launcher.EnclaveError, match="already running"):
        launcher.start(parts_image, launcher.EnclaveOptions(cpu_count=1, memory_mib=128),
                       tc=fake_tc)
    e2 = launcher.start(parts_image, launcher.EnclaveOptions(cpu_count=1, memory_mib=128,
                                                             enclave_name="second"), tc=fake_tc)
    assert e2.cid == 5
    with pytest.raises(launcher.EnclaveError, match="CID 5 is in use"):
        launcher.start(parts_image, launcher.EnclaveOptions(enclave_cid=5, enclave_name="x",
                                                            memory_mib=128), tc=fake_tc)
    pids = _pids(e) + _pids(e2)
    assert len(pids) == 8 and _wait_dead(pids, 0.1) == pids
    assert e.terminate() and e2.terminate()
    assert _wait_dead(pids) == []
    assert list(run_base.iterdir()) == [run_base / ".lock"]
    assert launcher.list_enclaves() == []


def test_enclave_survives_a_killed_launcher_and_supervisor_kill_is_cleaned(
        run_base: Path, fake_tc: Toolchain, parts_image: launcher.BootImage,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "ok")
    e = launcher.start(parts_image, launcher.EnclaveOptions(memory_mib=128), tc=fake_tc)
    pids = _pids(e)
    # SIGKILL of the supervisor: its children die with it, the next look-up removes the rest
    os.kill(e.pid, 9)
    assert _wait_dead(pids) == []
    assert launcher.list_enclaves() == []
    assert list(run_base.iterdir()) == [run_base / ".lock"]


def test_a_dead_device_ends_the_enclave(run_base: Path, fake_tc: Toolchain,
                                        parts_image: launcher.BootImage,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "ok")
    e = launcher.start(parts_image, launcher.EnclaveOptions(memory_mib=128), tc=fake_tc)
    for p in e.run_dir.iterdir():
        assert p.stat().st_mode & 0o077 == 0, p  # private to the user
    pids = _pids(e)
    os.kill(int(e.record["NsmBackendPID"]), signal.SIGKILL)
    assert e.wait(15)
    assert _wait_dead(pids) == []
    assert list(run_base.iterdir()) == [run_base / ".lock"]


@pytest.mark.parametrize(("mode", "message"), [
    ("exit", "stopped before it was ready"),
    ("wrong", "stopped before it was ready"),
    ("silent", "no readiness heartbeat"),
])
def test_failed_start_is_a_clear_error_and_leaves_nothing_running(
        run_base: Path, fake_tc: Toolchain, parts_image: launcher.BootImage,
        monkeypatch: pytest.MonkeyPatch, mode: str, message: str) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", mode)
    with pytest.raises(launcher.EnclaveError, match=message) as info:
        launcher.start(parts_image, launcher.EnclaveOptions(memory_mib=128, ready_timeout=3),
                       tc=fake_tc)
    text = str(info.value)
    # the console's last userspace line is quoted
    assert f"console's last message: 'fake enclave booting (mode {mode})'" in text
    console = Path(text.split("console log: ")[1].split(" ")[0])
    assert console.is_file() and "fake enclave booting" in console.read_text()
    failed = console.parent
    assert failed.name.startswith(registry.FAILED_PREFIX)
    assert not any(p.is_socket() for p in failed.iterdir())
    rec = json.loads((failed / "enclave.json").read_text())
    keys = ("ProcessID", "QemuPID", "NsmBackendPID", "VsockBackendPID")
    assert _wait_dead([int(rec[k]) for k in keys]) == []
    assert launcher.list_enclaves() == []
    assert sorted(p.name for p in run_base.iterdir()) == [".lock", failed.name]


def test_option_errors(run_base: Path, fake_tc: Toolchain,
                       parts_image: launcher.BootImage) -> None:
    bad = [
        (launcher.EnclaveOptions(cpu_count=0), "cpu-count"),
        (launcher.EnclaveOptions(memory_mib=16), "at least 64"),
        (launcher.EnclaveOptions(enclave_cid=3), "enclave-cid must be"),
        (launcher.EnclaveOptions(parent_instance_id="xyz"), "not an EC2 instance id"),
        (launcher.EnclaveOptions(enclave_name="a b"), "enclave name"),
        (launcher.EnclaveOptions(vsock_socket=Path("/tmp/" + "x" * 120)), "too long"),
    ]
    for opts, message in bad:
        with pytest.raises(launcher.EnclaveError, match=message):
            launcher.start(parts_image, opts, tc=fake_tc)
    assert list(run_base.iterdir()) == [run_base / ".lock"]


def test_memory_must_hold_the_ramdisks(tmp_path: Path, run_base: Path, fake_tc: Toolchain) -> None:
    big = tmp_path / "big"
    with open(big, "wb") as fh:
        fh.truncate(100 << 20)
    (tmp_path / "k").write_bytes(b"k")
    img = launcher.image_from_parts(tmp_path / "k", [big], "")
    with pytest.raises(launcher.EnclaveError, match="too small for 100 MiB"):
        launcher.start(img, launcher.EnclaveOptions(memory_mib=128), tc=fake_tc)


def _hybrid_server(path: Path, answer: bytes) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            line = b""
            while not line.endswith(b"\n"):
                line += conn.recv(1)
            assert line == b"CONNECT 5000\n"
            conn.sendall(answer)
            if answer.startswith(b"OK"):
                conn.sendall(conn.recv(100))  # echo
        srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_connect_vsock_hybrid(tmp_path: Path) -> None:
    sock = tmp_path / "v.sock"
    t = _hybrid_server(sock, b"OK 1073741824\n")
    with launcher.connect_vsock(sock, 5000, timeout=5) as s:
        s.sendall(b"ping")
        assert s.recv(100) == b"ping"
    t.join(5)
    sock.unlink()
    t = _hybrid_server(sock, b"")
    with pytest.raises(ConnectionRefusedError, match="refused vsock port 5000"):
        launcher.connect_vsock(sock, 5000, timeout=5)
    t.join(5)


def test_console_only_in_debug_mode(tmp_path: Path) -> None:
    e = launcher.Enclave(tmp_path, {"EnclaveID": "i-0-enc1", "Flags": "NONE", "ProcessID": 0})
    with pytest.raises(launcher.EnclaveError, match="not started in debug mode"):
        launcher.follow_console(e, open(os.devnull, "wb"))  # noqa: SIM115


def test_interrupted_launcher_leaves_no_enclave(run_base: Path, fake_tc: Toolchain,
                                                parts_image: launcher.BootImage,
                                                tmp_path: Path) -> None:
    script = tmp_path / "launch.py"
    script.write_text(f"""
import sys
from pathlib import Path
from virtio_nsm.enclave import launcher
from virtio_nsm.vm.setup import Toolchain
tc = Toolchain(cache_dir={str(tmp_path)!r}, qemu=[sys.executable, {str(FAKE_QEMU)!r}],
               qemu_env={{}}, qemu_version="fake", qemu_devices=[], busybox="")
img = launcher.image_from_parts(Path({parts_image.kernel.path!r}),
                                [Path(p) for p in {[r.path for r in parts_image.ramdisks]!r}], "x")
try:
    launcher.start(img, launcher.EnclaveOptions(memory_mib=128), tc=tc)
except KeyboardInterrupt:
    sys.exit(130)
""")
    env = dict(os.environ, FAKE_QEMU_MODE="silent")
    proc = subprocess.Popen([sys.executable, str(script)], env=env)
    deadline = time.monotonic() + 30
    recs: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        recs = [rec for _d, rec in registry.records(run_base) if rec.get("QemuPID")]
        if recs:
            break
        time.sleep(0.05)
    assert recs, "the enclave never got to QEMU"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 130
    keys = ("ProcessID", "QemuPID", "NsmBackendPID", "VsockBackendPID")
    pids = [int(recs[0][k]) for k in keys]  # type: ignore[call-overload]
    assert _wait_dead(pids) == []
    assert [p.name for p in run_base.iterdir() if not p.name.startswith((".", "failed-"))] == []
