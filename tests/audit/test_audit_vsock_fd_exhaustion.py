"""Audit: ``nsm vsock serve`` out of file descriptors (EMFILE).

A guest can open as many connections as the bridge's table allows (1024 by
default), which is the default ``RLIMIT_NOFILE`` of most systems. Running out of
descriptors must cost the guest the connection it asked for (RST), never the
whole device: before the fix the ``socket()`` call in the host connect raised
out of the queue worker, the daemon logged "internal error" and dropped the
frontend (every connection of the guest gone). Host clients arriving while no
descriptor is free must not make the backend spin on its readable listener.
"""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtio_nsm._process import stop_process
from virtio_nsm.vsock.driver import VsockDriver

LIMIT = 48  # descriptors for the whole backend process
CID = 7


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    log = (tmp_path / "backend.log").open("wb")
    vhost, uds = tmp_path / "vh.sock", tmp_path / "v.sock"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))

    proc = subprocess.Popen(
        [sys.executable, "-m", "virtio_nsm", "vsock", "serve", "--vhost-user", str(vhost),
         "--guest-cid", str(CID), "--uds-path", str(uds), "-q"],
        stdout=subprocess.DEVNULL, stderr=log, preexec_fn=limit)
    try:
        deadline = time.monotonic() + 30
        while not (vhost.exists() and uds.exists()):
            assert proc.poll() is None and time.monotonic() < deadline, "backend did not start"
            time.sleep(0.05)
        yield proc, vhost, uds
    finally:
        stop_process(proc, timeout=10)
        log.close()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks


def test_guest_connections_beyond_the_descriptors_are_refused_not_the_device(
        backend: tuple[subprocess.Popen[bytes], Path, Path]) -> None:
    proc, vhost, uds = backend
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(f"{uds}_77")
    srv.listen(512)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except TimeoutError:
                continue

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        with VsockDriver(vhost) as drv:
            t = drv.transport
            socks = [t.connect(77) for _ in range(2 * LIMIT)]
            drv.run_until(lambda: all(s.state != "connecting" for s in socks), timeout=30,
                          what="every connect answered")
            states = [s.state for s in socks]
            assert proc.poll() is None
            assert 0 < states.count("established") < len(socks)  # some refused (RST)
            assert states.count("closed") == len(socks) - states.count("established")
            # the frontend was not dropped: the established ones still carry data
            ok = next(s for s in socks if s.state == "established")
            t.write(ok, b"ping")
            drv.run_until(lambda: any(c.recv(4, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"ping"
                                      for c in list(held) if _readable(c)), what="data to the host")
            for s in socks:
                if s.state == "established":
                    t.close(s)
            drv.run_until(lambda: all(s.state == "closed" for s in socks), what="closes")
            again = t.connect(77)
            drv.run_until(lambda: again.state == "established", what="a new connection")
    finally:
        stop.set()
        acceptor.join(5)
        for c in held:
            c.close()
        srv.close()
    assert proc.poll() is None


def _readable(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(4, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:
        return False


def test_host_clients_beyond_the_descriptors_do_not_make_it_spin(
        backend: tuple[subprocess.Popen[bytes], Path, Path], tmp_path: Path) -> None:
    proc, _, uds = backend
    clients = []
    for _ in range(2 * LIMIT):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        try:
            c.connect(str(uds))
        except BlockingIOError:
            pass
        except OSError:
            c.close()
            break
        clients.append(c)
    try:
        time.sleep(0.5)
        before = _cpu_seconds(proc.pid)
        time.sleep(2)
        assert _cpu_seconds(proc.pid) - before < 0.3  # waits, does not spin
        assert proc.poll() is None
        warnings = (tmp_path / "backend.log").read_text().count("Too many open files")
        assert 1 <= warnings <= 5  # said, not repeated on every loop iteration
    finally:
        for c in clients:
            c.close()
    # descriptors free again: the waiting clients are taken and new ones too
    time.sleep(0.5)
    late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    late.settimeout(10)
    late.connect(str(uds))
    late.sendall(b"NONSENSE\n")  # accepted and read: a bad CONNECT line is closed at once
    assert late.recv(100) == b""
    late.close()
    assert proc.poll() is None
