"""Guest side of the vsock VM tier (run by tests/vm/test_vm_vsock.py inside `nsm vm run`).

Loads Linux's vsock modules, then drives AF_VSOCK with plain sockets against the host
programs the host test runs on the backend's Unix sockets.  Prints one JSON line per
step (``{"step": ..., ...}``); exits non-zero on the first failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time

HOST = 2
ECHO, SINK, SOURCE, HALF, SLOW, REFUSED = 5001, 5002, 5003, 5004, 5005, 5999
LISTEN = 6000
MIB = 1 << 20


def block(i: int) -> bytes:
    """Block ``i`` of the deterministic test stream (1 MiB): both sides can make it."""
    return hashlib.sha256(b"vsock-%d" % i).digest() * (MIB // 32)


def report(step: str, **values: object) -> None:
    print(json.dumps({"step": step, **values}), flush=True)


def load_modules() -> None:
    # The initramfs's init loads them; an older initramfs did not (load them from the cache).
    busybox, moddir = os.environ["NSM_VSOCK_BUSYBOX"], os.environ["NSM_VSOCK_MODDIR"]
    for mod in ("vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport"):
        if not os.path.isdir(f"/sys/module/{mod}"):
            subprocess.run([busybox, "insmod", f"{moddir}/{mod}.ko"], check=True)
    deadline = time.monotonic() + 30
    while True:  # the driver probes asynchronously
        try:
            with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as s:
                s.settimeout(30)
                s.connect((HOST, ECHO))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def connect(port: int) -> socket.socket:
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.settimeout(120)
    s.connect((HOST, port))
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(n - len(buf), 1 << 16))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def echo() -> None:
    data = os.urandom(MIB)
    with connect(ECHO) as s:
        s.sendall(data)
        assert recv_exact(s, len(data)) == data
    report("echo", bytes=len(data))


def bulk(mib: int) -> None:
    # guest -> host: the host answers with the SHA-256 of what it got
    digest = hashlib.sha256()
    t0 = time.monotonic()
    with connect(SINK) as s:
        s.sendall(b"%d\n" % mib)
        for i in range(mib):
            b = block(i)
            digest.update(b)
            s.sendall(b)
        s.shutdown(socket.SHUT_WR)
        answer = recv_exact(s, 32)
    up = time.monotonic() - t0
    assert answer == digest.digest(), "host saw different bytes"
    # host -> guest: the host sends the stream, we check it
    digest = hashlib.sha256()
    expected = hashlib.sha256()
    t0 = time.monotonic()
    with connect(SOURCE) as s:
        s.sendall(b"%d\n" % mib)
        got = 0
        while chunk := s.recv(1 << 16):
            digest.update(chunk)
            got += len(chunk)
    down = time.monotonic() - t0
    for i in range(mib):
        expected.update(block(i))
    assert got == mib * MIB, f"got {got} bytes"
    assert digest.digest() == expected.digest(), "guest saw different bytes"
    report("bulk", mib=mib, up_s=round(up, 2), down_s=round(down, 2))


def concurrent(n: int) -> None:
    socks = [connect(ECHO) for _ in range(n)]
    payloads = [os.urandom(16384 + i) for i in range(n)]
    for s, p in zip(socks, payloads, strict=True):
        s.sendall(p)
    for s, p in zip(socks, payloads, strict=True):
        assert recv_exact(s, len(p)) == p
        s.close()
    report("concurrent", connections=n)


def half_close() -> None:
    with connect(HALF) as s:
        s.sendall(b"x" * 100_000)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    assert reply == b"100000 bytes, bye", reply
    report("half_close")


def refused() -> None:
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.settimeout(30)
    try:
        s.connect((HOST, REFUSED))
    except (ConnectionResetError, ConnectionRefusedError) as exc:
        report("refused", error=type(exc).__name__)
    else:
        raise AssertionError("connected to a port nobody listens on")
    finally:
        s.close()


def host_initiated() -> None:
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as srv:
        srv.bind((socket.VMADDR_CID_ANY, LISTEN))
        srv.listen()
        srv.settimeout(120)
        report("listening", port=LISTEN)  # the host connects when it reads this line
        conn, (peer_cid, peer_port) = srv.accept()
        with conn:
            conn.settimeout(60)
            data = recv_exact(conn, 5)
            conn.sendall(data.upper())
    assert data == b"hello"
    report("host_initiated", peer_cid=peer_cid, peer_port=peer_port)


def slow_reader(mib: int, pause: float) -> None:
    expected = hashlib.sha256()
    for i in range(mib):
        expected.update(block(i))
    with connect(SLOW) as s:
        s.sendall(b"%d\n" % mib)
        time.sleep(pause)  # not reading: the host writer must block
        digest = hashlib.sha256()
        got = 0
        while chunk := s.recv(1 << 16):
            digest.update(chunk)
            got += len(chunk)
    assert got == mib * MIB and digest.digest() == expected.digest()
    report("slow_reader", mib=mib)


def main() -> None:
    load_modules()
    report("modules")
    echo()
    refused()
    half_close()
    concurrent(64)
    host_initiated()
    slow_reader(32, pause=8)
    bulk(int(os.environ.get("NSM_VSOCK_BULK_MIB", "100")))
    report("done")


if __name__ == "__main__":
    try:
        main()
    except BaseException as exc:
        report("failed", error=f"{type(exc).__name__}: {exc}")
        sys.exit(1)
