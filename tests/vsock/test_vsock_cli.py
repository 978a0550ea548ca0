"""``nsm vsock serve`` as a real process: sockets 0600, QEMU options, a guest through our
driver, clean stop on SIGTERM and SIGINT (both Unix sockets removed)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from virtio_nsm._process import stop_process
from virtio_nsm.vsock.driver import VsockDriver


def start(args: list[str]) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "virtio_nsm", "vsock", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines = [proc.stdout.readline() for _ in range(4)]  # printed once both sockets listen
    assert lines[0].startswith("vhost-user vsock backend listening on "), proc.stderr
    return proc, lines


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_prints_options_serves_and_stops_cleanly(tmp_path: Path, sig: int) -> None:
    vhost, uds = tmp_path / "vhost.sock", tmp_path / "v.sock"
    proc, lines = start(["--vhost-user", str(vhost), "--guest-cid", "42", "--uds-path", str(uds)])
    try:
        assert (vhost.stat().st_mode & 0o777) == 0o600
        assert (uds.stat().st_mode & 0o777) == 0o600
        assert f"-chardev socket,id=vsock0,path={vhost}" in lines[1]
        assert "-device vhost-user-vsock-pci,chardev=vsock0" in lines[1] and "share=on" in lines[1]
        assert lines[2].split(": ", 1)[1].startswith("-M microvm ")
        assert "-device vhost-user-vsock-device,chardev=vsock0" in lines[2]
        assert f"{uds}_P" in lines[3]
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(f"{uds}_7000")
        srv.listen()
        srv.settimeout(20)
        with VsockDriver(vhost) as drv:
            assert drv.cid == 42
            sock = drv.transport.connect(7000)
            drv.run_until(lambda: sock.state == "established", what="connect")
            conn, _ = srv.accept()
            drv.transport.write(sock, b"over a real process")
            drv.run_until(lambda: sock.tx_cnt == 19, what="send")
            conn.settimeout(20)
            assert conn.recv(100) == b"over a real process"
            conn.close()
        srv.close()
    finally:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert not vhost.exists() and not uds.exists()
    assert "frontend connected" in err


def test_serve_refuses_bad_arguments(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "virtio_nsm", "vsock", "serve", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    base = ["--vhost-user", str(tmp_path / "a.sock"), "--uds-path", str(tmp_path / "b.sock")]
    for cid in ("2", "-1", "4294967295", "x"):
        out = run(*base, "--guest-cid", cid)
        assert out.returncode == 2 and "--guest-cid" in out.stderr, out.stderr
    same = run(
        "--vhost-user", str(tmp_path / "a.sock"), "--uds-path", str(tmp_path / "a.sock"), "--guest-cid", "3"
    )
    assert same.returncode == 2 and "must differ" in same.stderr
    (tmp_path / "b.sock").write_text("not a socket")
    taken = run(*base, "--guest-cid", "5")
    assert taken.returncode == 2 and "is not a socket" in taken.stderr
    assert not (tmp_path / "a.sock").exists()  # nothing left behind
    assert (tmp_path / "b.sock").read_text() == "not a socket"
    os.unlink(tmp_path / "b.sock")


def test_sigterm_with_a_guest_and_host_streams_connected(tmp_path: Path) -> None:
    vhost, uds = tmp_path / "vhost.sock", tmp_path / "v.sock"
    proc, _ = start(["--vhost-user", str(vhost), "--guest-cid", "9", "--uds-path", str(uds)])
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(f"{uds}_7001")
    srv.listen()
    srv.settimeout(20)
    try:
        with VsockDriver(vhost) as drv:
            sock = drv.transport.connect(7001)
            drv.run_until(lambda: sock.state == "established", what="connect")
            conn, _ = srv.accept()
            waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            waiting.connect(str(uds))  # a host program that has not said CONNECT yet
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=20)
            assert proc.returncode == 0, err
            conn.settimeout(20)
            waiting.settimeout(20)
            assert conn.recv(10) == b""  # the guest's connection: closed
            with contextlib.suppress(ConnectionResetError):  # accepted (closed) or in the backlog (reset)
                assert waiting.recv(10) == b""
            conn.close()
            waiting.close()
    finally:
        srv.close()
        stop_process(proc, sig=signal.SIGKILL)
    assert not vhost.exists() and not uds.exists()
