"""The vsock device under a real guest: stock QEMU (``vhost-user-vsock-pci``), Linux's own
``vmw_vsock_virtio_transport``, plain ``socket.AF_VSOCK`` in the guest and plain Unix
sockets on the host, with ``nsm vsock serve`` as a separate process.

One boot runs ``guest/vsock_guest.py``: echo, a refused port (ECONNRESET), half-close,
64 concurrent connections, a host-initiated connection (``CONNECT 6000``), a guest that
stops reading (the host writer blocks and the backend's memory stays flat), and 100 MiB
each way with a SHA-256 on both ends.
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from virtio_nsm.vm import run as vm_run
from virtio_nsm.vm.setup import Toolchain, load_or_setup

BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # bench_vsock.py starts the backend the same way

from _harness import start_vsock_serve  # noqa: E402

pytestmark = pytest.mark.vm

GUEST = Path(__file__).resolve().parent / "guest" / "vsock_guest.py"
MODULES = ("vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport")
CID = 5
MIB = 1 << 20


def block(i: int) -> bytes:
    return hashlib.sha256(b"vsock-%d" % i).digest() * (MIB // 32)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Host:
    """The host programs, each on ``<uds>_<port>``, in threads; failures are collected."""

    def __init__(self, uds: Path, backend_pid: int) -> None:
        self.uds = uds
        self.backend_pid = backend_pid
        self.errors: list[str] = []
        self.results: dict[str, object] = {}
        self.listening = threading.Event()
        self._servers: list[socket.socket] = []

    def serve(self, port: int, handler: Callable[[socket.socket], None]) -> None:
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(f"{self.uds}_{port}")
        srv.listen(128)
        self._servers.append(srv)

        def one(conn: socket.socket) -> None:
            try:
                with conn:
                    conn.settimeout(300)
                    handler(conn)
            except Exception as exc:
                self.errors.append(f"port {port}: {type(exc).__name__}: {exc}")

        def accept() -> None:
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                threading.Thread(target=one, args=(conn,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()

    def close(self) -> None:
        for srv in self._servers:
            srv.close()

    @staticmethod
    def line(conn: socket.socket) -> int:
        buf = b""
        while not buf.endswith(b"\n"):
            buf += conn.recv(1)
        return int(buf)

    def echo(self, conn: socket.socket) -> None:
        while data := conn.recv(65536):
            conn.sendall(data)

    def sink(self, conn: socket.socket) -> None:
        self.line(conn)
        digest, n = hashlib.sha256(), 0
        while data := conn.recv(1 << 16):
            digest.update(data)
            n += len(data)
        self.results["sink_bytes"] = n
        conn.sendall(digest.digest())

    def source(self, conn: socket.socket) -> None:
        for i in range(self.line(conn)):
            conn.sendall(block(i))

    def half(self, conn: socket.socket) -> None:
        n = 0
        while data := conn.recv(65536):
            n += len(data)
        conn.sendall(b"%d bytes, bye" % n)

    def slow(self, conn: socket.socket) -> None:
        mib = self.line(conn)
        rss_before = rss_kib(self.backend_pid)
        conn.setblocking(False)
        data = b"".join(block(i) for i in range(mib))
        sent, blocked_since = 0, None
        while sent < len(data):
            try:
                sent += conn.send(data[sent : sent + 65536])
                blocked_since = None
            except BlockingIOError:
                now = time.monotonic()
                blocked_since = blocked_since or now
                if now - blocked_since > 3:
                    break
                time.sleep(0.01)
        self.results["slow_sent_before_block"] = sent
        self.results["slow_rss_growth_kib"] = rss_kib(self.backend_pid) - rss_before
        conn.settimeout(300)
        conn.sendall(data[sent:])

    def connect_guest(self) -> None:
        try:
            assert self.listening.wait(600), "the guest never listened"
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(120)
                s.connect(str(self.uds))
                s.sendall(b"CONNECT 6000\n")
                ok = b""
                while not ok.endswith(b"\n"):
                    ok += s.recv(1)
                self.results["ok_line"] = ok.decode()
                s.sendall(b"hello")
                reply = b""
                while len(reply) < 5:
                    reply += s.recv(5 - len(reply))
                self.results["host_initiated_reply"] = reply
        except Exception as exc:
            self.errors.append(f"host-initiated: {type(exc).__name__}: {exc}")


class Steps:
    """A file-like sink for the guest's output that reacts to its JSON step lines."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.buf = b""
        self.steps: list[dict[str, object]] = []

    def write(self, chunk: bytes) -> int:
        self.buf += chunk
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            try:
                step = json.loads(line)
            except ValueError:
                continue
            if isinstance(step, dict):
                self.steps.append(step)
                if step.get("step") == "listening":
                    self.host.listening.set()
        return len(chunk)

    def flush(self) -> None:
        pass


@pytest.fixture(scope="module")
def toolchain() -> Toolchain:
    return load_or_setup()


def test_guest_af_vsock_through_our_backend(toolchain: Toolchain, tmp_path: Path) -> None:
    kernel = toolchain.kernel(None)
    moddir = Path(kernel.module_dir)
    missing = [m for m in MODULES if not (moddir / f"{m}.ko").exists()]
    if missing:
        pytest.skip(f"the VM cache's kernel has no {', '.join(missing)} (nsm vm setup extracts them)")
    vhost, uds = tmp_path / "vhost.sock", tmp_path / "v.sock"
    backend = start_vsock_serve(vhost, CID, uds, stderr=subprocess.PIPE)
    host = Host(uds, backend.pid)
    try:
        for port, handler in (
            (5001, host.echo),
            (5002, host.sink),
            (5003, host.source),
            (5004, host.half),
            (5005, host.slow),
        ):
            host.serve(port, handler)
        connector = threading.Thread(target=host.connect_guest, daemon=True)
        connector.start()
        steps = Steps(host)
        opts = vm_run.RunOptions(
            command=[sys.executable, str(GUEST)],
            device="none",
            timeout=1200,
            memory_mb=512,
            quiet=True,
            stdout=steps,  # type: ignore[arg-type]
            env={"NSM_VSOCK_BUSYBOX": toolchain.busybox, "NSM_VSOCK_MODDIR": str(moddir)},
            extra_qemu_args=[
                "-chardev",
                f"socket,id=vsock0,path={vhost}",
                "-device",
                "vhost-user-vsock-pci,chardev=vsock0",
            ],
        )
        result = vm_run.run(toolchain, opts)
        connector.join(10)
    finally:
        host.close()
        backend.send_signal(signal.SIGTERM)
        _, err = backend.communicate(timeout=30)
    names = [s["step"] for s in steps.steps]
    assert result.status == 0, f"guest failed: {steps.steps[-3:]} (console {result.console_log})"
    assert names == [
        "modules",
        "echo",
        "refused",
        "half_close",
        "concurrent",
        "listening",
        "host_initiated",
        "slow_reader",
        "bulk",
        "done",
    ], steps.steps
    assert host.errors == [], host.errors
    by = {s["step"]: s for s in steps.steps}
    assert by["refused"]["error"] in ("ConnectionResetError", "ConnectionRefusedError")
    assert by["host_initiated"]["peer_cid"] == 2
    assert host.results["ok_line"] == f"OK {by['host_initiated']['peer_port']}\n"
    assert host.results["host_initiated_reply"] == b"HELLO"
    assert host.results["sink_bytes"] == 100 * MIB
    # the guest that did not read: the writer blocked early and the backend stayed flat
    assert host.results["slow_sent_before_block"] < 8 * MIB, host.results
    assert host.results["slow_rss_growth_kib"] < 16 * 1024, host.results
    assert backend.returncode == 0, err
    assert not vhost.exists() and not uds.exists()
    print(
        f"\nvsock VM tier: bulk 100 MiB up {by['bulk']['up_s']} s, down {by['bulk']['down_s']} s; "
        f"slow reader blocked the host after {host.results['slow_sent_before_block']} bytes, "
        f"backend RSS +{host.results['slow_rss_growth_kib']} KiB"
    )
