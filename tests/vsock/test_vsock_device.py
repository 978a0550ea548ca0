"""The vsock device on the real vhost-user daemon, driven by our Python driver as the guest,
with real Unix sockets on the host side."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from vhost_support import serve_in_thread, wait_for

from virtio_nsm.vhost_user.daemon import VhostUserDaemon
from virtio_nsm.vsock import BridgeLimits, Header
from virtio_nsm.vsock import constants as c
from virtio_nsm.vsock.device import VsockDevice
from virtio_nsm.vsock.driver import VsockDriver
from virtio_nsm.vsock.guest import GuestSocket

CID = 7


@dataclass
class Served:
    vhost: Path
    uds: Path
    device: VsockDevice
    daemon: VhostUserDaemon


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    uds = tmp_path / "v.sock"
    device = VsockDevice(CID, uds, limits=BridgeLimits(host_buffer=65536))
    with serve_in_thread(tmp_path / "vhost.sock", device, message_timeout=5.0) as run:
        yield Served(tmp_path / "vhost.sock", uds, device, run.daemon)
    assert not uds.exists()


def host_listener(path: Path) -> socket.socket:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(128)
    srv.settimeout(20)
    return srv


def in_thread(target: Callable[[], None]) -> threading.Thread:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:  # reported by join_ok
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


def join_ok(thread: threading.Thread) -> None:
    thread.join(30)
    assert not thread.is_alive()
    assert not thread.errors, thread.errors  # type: ignore[attr-defined]


def echo_server(srv: socket.socket, connections: int) -> None:
    def serve_one(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threads = []
    for _ in range(connections):
        conn, _ = srv.accept()
        conn.settimeout(30)
        t = threading.Thread(target=serve_one, args=(conn,), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join(30)


def host_connects(drv: VsockDriver, uds: Path, port: int) -> tuple[socket.socket, GuestSocket]:
    """A host program's ``CONNECT port`` to a guest listening on ``port``: (host end, guest end)."""
    drv.transport.listen(port)
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.connect(str(uds))
    host.sendall(f"CONNECT {port}\n".encode())
    drv.run_until(lambda: bool(drv.transport.accepted), what="accept")
    return host, drv.transport.accepted.popleft()


def read_all(drv: VsockDriver, sock: GuestSocket, n: int) -> bytes:
    got = bytearray()

    def enough() -> bool:
        got.extend(drv.transport.read(sock, 1 << 20))
        return len(got) >= n or sock.eof

    drv.run_until(enough, what=f"{n} bytes")
    return bytes(got)


def test_config_features_and_reset_event(served: Served) -> None:
    with VsockDriver(served.vhost) as drv:
        assert drv.cid == CID
        assert drv.fe.features & (1 << c.VIRTIO_VSOCK_F_STREAM)
        drv.run_until(lambda: drv.events == [c.VIRTIO_VSOCK_EVENT_TRANSPORT_RESET], what="the reset event")
    assert (served.uds.stat().st_mode & 0o777) == 0o600


def test_guest_to_host_echo_checksummed(served: Served, tmp_path: Path) -> None:
    srv = host_listener(Path(f"{served.uds}_1234"))
    host = in_thread(lambda: echo_server(srv, 1))
    data = os.urandom(3 << 20)
    with VsockDriver(served.vhost) as drv:
        sock = drv.transport.connect(1234)
        drv.run_until(lambda: sock.state == "established", what="connect")
        drv.transport.write(sock, data)
        echoed = read_all(drv, sock, len(data))
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(data).digest()
        drv.transport.close(sock)
        drv.run_until(lambda: sock.state == "closed", what="close")
        assert not sock.reset
    join_ok(host)
    srv.close()
    assert drv.transport.violations == []


def test_cid_3_reaches_the_same_unix_socket(served: Served) -> None:
    srv = host_listener(Path(f"{served.uds}_80"))
    host = in_thread(lambda: echo_server(srv, 1))
    with VsockDriver(served.vhost) as drv:
        sock = drv.transport.connect(80, cid=c.NITRO_PARENT_CID)
        drv.run_until(lambda: sock.state == "established", what="connect")
        drv.transport.write(sock, b"parent?")
        assert read_all(drv, sock, 7) == b"parent?"
        drv.transport.close(sock)
        drv.run_until(lambda: sock.state == "closed", what="close")
    join_ok(host)
    srv.close()


def test_host_initiated_connect_and_half_close(served: Served) -> None:
    result: dict[str, bytes] = {}

    def host_program() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(20)
            s.connect(str(served.uds))
            s.sendall(b"CONNECT 500\n")
            line = b""
            while not line.endswith(b"\n"):
                line += s.recv(1)
            result["line"] = line
            s.sendall(b"hello guest")
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
            result["reply"] = reply

    with VsockDriver(served.vhost) as drv:
        drv.transport.listen(500)
        host = in_thread(host_program)
        drv.run_until(lambda: bool(drv.transport.accepted), what="the host's connection")
        sock = drv.transport.accepted.popleft()
        assert read_all(drv, sock, 100) == b"hello guest" and sock.eof
        drv.transport.write(sock, b"hello host")
        drv.transport.close(sock)
        drv.run_until(lambda: sock.state == "closed", what="close")
        join_ok(host)
    assert result == {"line": b"OK %d\n" % sock.peer_port, "reply": b"hello host"}


def test_refused_port_and_guest_port_not_listening(served: Served) -> None:
    with VsockDriver(served.vhost) as drv:
        sock = drv.transport.connect(4321)
        drv.run_until(lambda: sock.state == "closed", what="the refusal")
        assert sock.reset
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(20)
            s.connect(str(served.uds))
            s.sendall(b"CONNECT 999\n")
            got = []
            t = in_thread(lambda: got.append(s.recv(100)))
            drv.run_until(lambda: not t.is_alive(), what="the host stream closed")
            join_ok(t)
            assert got == [b""]  # closed without an OK


def test_guest_that_stops_reading_blocks_the_host_writer(served: Served) -> None:
    with VsockDriver(served.vhost) as drv:
        host, sock = host_connects(drv, served.uds, 600)
        host.setblocking(False)
        data = os.urandom(16 << 20)
        written = 0
        stalled = 0
        while stalled < 50:
            try:
                written += host.send(data[written : written + 65536])
                stalled = 0
            except BlockingIOError:
                drv.pump()
                drv.wait(0.005)
                stalled += 1
        # The writer is blocked with a bounded amount in flight: guest credit (256 KiB),
        # the bridge's buffer (64 KiB) and the two socket buffers.
        assert written < 4 << 20
        assert served.device.bridge.buffered() <= 65536 + 64
        got = bytearray()

        def drained() -> bool:
            nonlocal written
            got.extend(drv.transport.read(sock, 1 << 20))
            with contextlib.suppress(BlockingIOError):
                if written < len(data):
                    written += host.send(data[written : written + 65536])
            return len(got) == len(data)

        drv.run_until(drained, timeout=120, what="all the data")
        assert bytes(got) == data
        host.close()


def test_a_full_buffer_stops_watching_the_host_socket(served: Served) -> None:
    """Once a connection's buffer towards the guest is full, a readable host socket must
    not wake the backend: it would spin (level-triggered) until the guest reads."""
    host_side = served.device.host
    calls = 0
    on_ready = host_side._on_ready

    def counting(host_id: int, ready: int) -> None:
        nonlocal calls
        calls += 1
        on_ready(host_id, ready)

    host_side._on_ready = counting  # type: ignore[method-assign]
    with VsockDriver(served.vhost) as drv:
        host, _ = host_connects(drv, served.uds, 601)  # and never read: the guest's credit runs out
        host.setblocking(False)
        stalled = 0
        while stalled < 50:  # until the host writer stays blocked
            try:
                host.send(bytes(65536))
                stalled = 0
            except BlockingIOError:
                drv.pump()
                drv.wait(0.005)
                stalled += 1
        bridge = served.device.bridge
        (host_id,) = bridge.host_ids()
        assert bridge.read_budget(host_id) == 0
        before = calls
        time.sleep(0.3)  # the host socket stays readable all along
        assert calls - before <= 2
        host.close()


def test_a_quiet_guest_gets_its_tx_buffers_back(served: Served) -> None:
    """Tx buffers are given back in batches; a guest that goes quiet still gets all of
    them back (and an interrupt) soon after its last packet."""
    srv = host_listener(Path(f"{served.uds}_67"))
    with VsockDriver(served.vhost) as drv:
        sock = drv.transport.connect(67)
        drv.run_until(lambda: sock.state == "established", what="connect")
        drv.transport.write(sock, b"one packet")
        drv.pump()
        start = time.monotonic()
        while len(drv._free_tx) < drv.queue_size:
            assert time.monotonic() - start < 5, "tx buffers held"
            drv.wait(0.1)  # woken by the interrupt for them
            drv.pump()
    srv.close()


def test_many_concurrent_connections(served: Served) -> None:
    n = 32
    srv = host_listener(Path(f"{served.uds}_9000"))
    host = in_thread(lambda: echo_server(srv, n))
    payloads = [os.urandom(50_000 + i) for i in range(n)]
    with VsockDriver(served.vhost) as drv:
        socks = [drv.transport.connect(9000) for _ in range(n)]
        drv.run_until(lambda: all(s.state == "established" for s in socks), what="connects")
        for s, p in zip(socks, payloads, strict=True):
            drv.transport.write(s, p)
        got = [bytearray() for _ in socks]

        def all_back() -> bool:
            for s, g in zip(socks, got, strict=True):
                g.extend(drv.transport.read(s, 1 << 20))
            return all(len(g) == len(p) for g, p in zip(got, payloads, strict=True))

        drv.run_until(all_back, timeout=60, what="every echo")
        assert [bytes(g) for g in got] == payloads
        for s in socks:
            drv.transport.close(s)
        drv.run_until(lambda: all(s.state == "closed" for s in socks), what="closes")
    join_ok(host)
    srv.close()
    wait_for(lambda: served.device.bridge.stream_count == 0, "every host stream closed")


def test_frontend_reconnect_drops_connections_and_resets_the_guest(served: Served) -> None:
    srv = host_listener(Path(f"{served.uds}_77"))
    with VsockDriver(served.vhost) as drv:
        sock = drv.transport.connect(77)
        drv.run_until(lambda: sock.state == "established", what="connect")
        conn, _ = srv.accept()
    # the frontend went away: its connection's host socket is closed
    conn.settimeout(20)
    assert conn.recv(10) == b""
    conn.close()
    with VsockDriver(served.vhost) as drv:
        drv.run_until(lambda: drv.events == [c.VIRTIO_VSOCK_EVENT_TRANSPORT_RESET], what="the reset event")
    srv.close()


def test_hostile_packets_on_the_ring_do_not_stop_the_device(served: Served) -> None:
    srv = host_listener(Path(f"{served.uds}_55"))
    host = in_thread(lambda: echo_server(srv, 1))
    with VsockDriver(served.vhost) as drv:
        # garbage and a spoofed source before a proper connection
        drv.transport._control.append(b"\xff" * 30)
        drv.transport._control.append(Header(99, 2, 1, 55, 0, 1, c.VIRTIO_VSOCK_OP_REQUEST).encode())
        sock = drv.transport.connect(55)
        drv.run_until(lambda: sock.state == "established", what="connect")
        drv.transport.write(sock, b"fine")
        assert read_all(drv, sock, 4) == b"fine"
        drv.transport.close(sock)
        drv.run_until(lambda: sock.state == "closed", what="close")
    join_ok(host)
    srv.close()
    stats = served.device.bridge.stats
    assert stats["bad_malformed"] == 1 and stats["bad_src_cid"] == 1


def test_restarted_backend_resets_the_guests_connections(tmp_path: Path) -> None:
    vhost, uds = tmp_path / "vhost.sock", tmp_path / "v.sock"
    srv = host_listener(Path(f"{uds}_88"))
    with serve_in_thread(vhost, VsockDevice(CID, uds)):
        drv = VsockDriver(vhost)
        sock = drv.transport.connect(88)
        drv.run_until(lambda: sock.state == "established", what="connect")
        conn, _ = srv.accept()
    try:
        conn.settimeout(20)
        assert conn.recv(10) == b""  # the backend's end went with it
        with serve_in_thread(vhost, VsockDevice(CID, uds)):
            drv.fe.reconnect()
            drv.run_until(lambda: len(drv.events) == 2, what="TRANSPORT_RESET from the new backend")
            assert sock.state == "closed" and sock.reset
            again = drv.transport.connect(88)
            drv.run_until(lambda: again.state == "established", what="a new connection")
            drv.transport.close(again)
            drv.run_until(lambda: again.state == "closed", what="close")
    finally:
        conn.close()
        srv.close()
        drv.close()


def test_host_that_stops_reading_blocks_the_guest_writer(served: Served) -> None:
    srv = host_listener(Path(f"{served.uds}_66"))
    data = os.urandom(8 << 20)
    with VsockDriver(served.vhost) as drv:
        sock = drv.transport.connect(66)
        drv.run_until(lambda: sock.state == "established", what="connect")
        conn, _ = srv.accept()
        drv.transport.write(sock, data)
        for _ in range(200):  # the host program reads nothing meanwhile
            drv.pump()
            drv.wait(0.005)
        # the guest may not send beyond the credit: the rest waits in the guest
        limit = served.device.bridge.limits.buf_alloc
        assert sock.tx_cnt <= limit + (4 << 20)  # credit + what the Unix socket buffers took
        assert len(sock.tx) >= len(data) - sock.tx_cnt
        assert served.device.bridge.buffered() <= limit
        got = bytearray()
        conn.setblocking(False)

        def drained() -> bool:
            with contextlib.suppress(BlockingIOError):
                got.extend(conn.recv(1 << 20))
            return len(got) == len(data)

        drv.run_until(drained, timeout=120, what="all the data")
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        conn.close()
    srv.close()


# -- descriptors: a long-running nsm vsock serve loses none --------------------------------------
# The daemon, the guest driver and the host programs all run in this process, so
# /proc/self/fd counts every side: once the last stream is closed and the daemon has
# dropped the last frontend, the table must be back where it started.

SESSIONS = 10
PER_SESSION = 20  # 200 guest connections in all


def open_fds() -> dict[int, str]:
    gc.collect()
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def assert_none_leaked(served: Served, before: dict[int, str]) -> None:
    wait_for(lambda: served.device.bridge.stream_count == 0, "every host stream closed")
    wait_for(lambda: served.daemon._conn is None, "the daemon to drop the last frontend")
    leaked = {fd: what for fd, what in open_fds().items() if before.get(fd) != what}
    assert not leaked, f"{len(leaked)} descriptors leaked: {sorted(set(leaked.values()))}"


def echo_session(drv: VsockDriver, session: int, close: bool) -> None:
    """``PER_SESSION`` guest connections to the echo server, each echoed once."""
    socks = [drv.transport.connect(1234) for _ in range(PER_SESSION)]
    drv.run_until(lambda: all(s.state == "established" for s in socks), what="connects")
    for i, s in enumerate(socks):
        drv.transport.write(s, b"%d.%d" % (session, i))
    got = [bytearray() for _ in socks]

    def all_back() -> bool:
        for s, g in zip(socks, got, strict=True):
            g.extend(drv.transport.read(s, 4096))
        return all(got)

    drv.run_until(all_back, what="every echo")
    assert [bytes(g) for g in got] == [b"%d.%d" % (session, i) for i in range(PER_SESSION)]
    if close:
        for s in socks:
            drv.transport.close(s)
        drv.run_until(lambda: all(s.state == "closed" for s in socks), what="closes")


def refused_host_connection(drv: VsockDriver, uds: Path, line: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(20)
        s.connect(str(uds))
        s.sendall(line)
        got: list[bytes] = []
        t = in_thread(lambda: got.append(s.recv(100)))
        drv.run_until(lambda: not t.is_alive(), what="the host stream closed")
        join_ok(t)
        assert got == [b""]  # closed without an OK


def test_guest_connections_and_frontend_sessions_keep_no_descriptor(served: Served) -> None:
    srv = host_listener(Path(f"{served.uds}_1234"))
    try:
        before = open_fds()
        host = in_thread(lambda: echo_server(srv, SESSIONS * PER_SESSION))
        for session in range(SESSIONS):
            with VsockDriver(served.vhost) as drv:
                # half the sessions end with their connections still open (the frontend goes)
                echo_session(drv, session, close=bool(session % 2))
        join_ok(host)
        assert_none_leaked(served, before)
    finally:
        srv.close()


def test_refused_host_connections_keep_no_descriptor(served: Served) -> None:
    before = open_fds()
    with VsockDriver(served.vhost) as drv:
        for line in [b"CONNECT 999\n", b"HELLO\n", b"A" * 64] * 67:
            refused_host_connection(drv, served.uds, line)
    assert_none_leaked(served, before)
