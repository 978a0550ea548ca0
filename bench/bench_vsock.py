"""Our vsock beside QEMU's user-mode network, in one TCG guest (needs root and `nsm vm setup`).

One boot of a q35 TCG guest (`nsm vm run`) with two ways to reach the host:

* vsock: our backend (`nsm vsock serve`, a separate process) as QEMU's
  `vhost-user-vsock-pci`, Linux's `vmw_vsock_virtio_transport`, guest `AF_VSOCK` to CID 2,
  host programs on the backend's Unix sockets;
* user-mode network: `-netdev user` + `virtio-net-pci`, guest TCP to 10.0.2.2 (QEMU's
  slirp), host programs on 127.0.0.1 -- what a user would reach for instead.

In the same guest, each measurement over one transport right after the same over the
other (the order swapped every repeat, medians reported): bulk throughput guest -> host
and host -> guest (MiB/s, timed in the guest from the first byte sent to the host's
acknowledgement / the last byte received) and ping-pong round trips per second (1-byte
messages).  The backend's CPU time per MiB moved is read from /proc, and so is its CPU
time while the guest idles for ``--idle`` seconds after a first exchange.  Ratios are
ours / user-mode.

    PYTHONPATH=src python bench/bench_vsock.py [--mib 64] [--seconds 5] [--repeat 3] [--idle 3]

The guest needs virtio_net (Debian builds it as a module, not in the test cache): the
first run downloads the cached kernel's package once (~110 MB) and keeps its
virtio_net, net_failover and failover modules under the cache's ``bench-net/``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _harness import start_vsock_serve

from virtio_nsm.vm import run as vm_run
from virtio_nsm.vm import setup as vm_setup

MIB = 1 << 20
CID = 5
BULK_UP, BULK_DOWN, PINGPONG = 7001, 7002, 7003
NET_MODULES = {
    "failover": "kernel/net/core/failover.ko",
    "net_failover": "kernel/drivers/net/net_failover.ko",
    "virtio_net": "kernel/drivers/net/virtio_net.ko",
}
VSOCK_MODULES = ("vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport")

GUEST = r"""
import json, os, socket, subprocess, sys, time
busybox, vmods, nmods = sys.argv[1], sys.argv[2], sys.argv[3]
mib, seconds, idle, repeat = int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7])
for d, m in [(vmods, "vsock"), (vmods, "vmw_vsock_virtio_transport_common"),
             (vmods, "vmw_vsock_virtio_transport"), (nmods, "failover"),
             (nmods, "net_failover"), (nmods, "virtio_net")]:
    loaded = {line.split()[0] for line in open("/proc/modules")}
    if m not in loaded:  # the VM's init may have loaded vsock already
        subprocess.run([busybox, "insmod", f"{d}/{m}.ko"], check=True)
time.sleep(1)
ifname = [n for n in os.listdir("/sys/class/net") if n != "lo"][0]
for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "link", "set", ifname, "up"],
            ["ip", "addr", "add", "10.0.2.15/24", "dev", ifname]):
    subprocess.run([busybox, *cmd], check=True)
CHUNK = b"\xa5" * (1 << 16)

def conn(kind, port):
    for _ in range(100):
        try:
            if kind == "vsock":
                s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM); s.connect((2, port))
            else:
                s = socket.create_connection(("10.0.2.2", port))
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(300)
            return s
        except OSError:
            time.sleep(0.2)
    raise OSError(f"cannot reach {kind} port {port}")

# The backend's CPU while the guest idles (after a first exchange; polling must stop).
s = conn("vsock", 7003)
s.sendall(b"p"); assert s.recv(1) == b"p"
print("IDLE start", flush=True)
time.sleep(idle)
print("IDLE end", flush=True)
s.close()
def up(kind):
    s = conn(kind, 7001)
    t0 = time.monotonic()
    for _ in range(mib * 16):
        s.sendall(CHUNK)
    s.shutdown(socket.SHUT_WR)
    assert s.recv(64) == b"%d" % (mib * 1 << 20)
    t = time.monotonic() - t0
    s.close()
    return mib / t

def down(kind):
    s = conn(kind, 7002)
    t0 = time.monotonic(); got = 0
    while chunk := s.recv(1 << 16):
        got += len(chunk)
    t = time.monotonic() - t0
    s.close()
    assert got == mib << 20
    return mib / t

def pingpong(kind):
    s = conn(kind, 7003)
    s.sendall(b"p"); assert s.recv(1) == b"p"
    print(f"PINGPONG {kind} start", flush=True)
    n = 0; t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        s.sendall(b"p"); assert s.recv(1) == b"p"; n += 1
    t = time.monotonic() - t0
    print(f"PINGPONG {kind} end {n}", flush=True)
    s.close()
    return n / t

# Each measurement right after the other transport's (the host's load drifts), the
# order swapped every repeat.
results = {kind: {"up_mib_s": [], "down_mib_s": [], "round_trips_s": []} for kind in ("vsock", "tcp")}
print("MEASURE start", flush=True)
for r in range(repeat):
    order = ("vsock", "tcp") if r % 2 == 0 else ("tcp", "vsock")
    for key, fn in (("up_mib_s", up), ("down_mib_s", down), ("round_trips_s", pingpong)):
        for kind in order:
            results[kind][key].append(fn(kind))
print("MEASURE end", flush=True)
print(json.dumps(results), flush=True)
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def net_modules(tc: vm_setup.Toolchain) -> Path:
    kernel = tc.kernel(None)
    dest = Path(tc.cache_dir) / "bench-net" / kernel.version
    if all((dest / f"{m}.ko").exists() for m in NET_MODULES):
        return dest
    root = Path(tc.cache_dir) / "root"
    apt = vm_setup._Apt(root if root.is_dir() else None)
    package = f"linux-image-{kernel.version}"
    print(f"downloading {package} once for its virtio_net module ...", file=sys.stderr)
    deb = apt.download(package, Path(tc.cache_dir) / "bench-net" / "dl", vm_setup.stderr_progress)
    by_path = {v: k for k, v in NET_MODULES.items()}
    dest.mkdir(parents=True, exist_ok=True)

    def rel(name: str) -> str:
        return re.sub(r"\.(xz|zst)$", "", re.sub(r"^(usr/)?lib/modules/[^/]+/", "", name))

    for name, data in vm_setup._deb_members(deb, lambda n: rel(n) in by_path):
        if name.endswith(".xz"):
            import lzma

            data = lzma.decompress(data)
        elif name.endswith(".zst"):
            data = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout
        (dest / f"{by_path[rel(name)]}.ko").write_bytes(data)
    deb.unlink()
    missing = [m for m in NET_MODULES if not (dest / f"{m}.ko").exists()]
    if missing:
        raise SystemExit(f"{deb.name} has no {missing}")
    return dest


class HostPrograms:
    """Sink, source and echo for both transports (threads); counts what the sink got."""

    def __init__(self, uds: Path, mib: int) -> None:
        self.mib = mib
        self.servers: list[socket.socket] = []
        for port, handler in ((BULK_UP, self.sink), (BULK_DOWN, self.source), (PINGPONG, self.echo)):
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            unix.bind(f"{uds}_{port}")
            tcp = socket.create_server(("127.0.0.1", port))
            for srv in (unix, tcp):
                srv.listen(8)
                self.servers.append(srv)
                threading.Thread(target=self.accept, args=(srv, handler), daemon=True).start()

    def accept(self, srv: socket.socket, handler: object) -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            if conn.family == socket.AF_INET:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=handler, args=(conn,), daemon=True).start()  # type: ignore[arg-type]

    def sink(self, conn: socket.socket) -> None:
        with conn:
            n = 0
            while data := conn.recv(1 << 18):
                n += len(data)
            conn.sendall(b"%d" % n)

    def source(self, conn: socket.socket) -> None:
        chunk = b"\x5a" * (1 << 18)
        with conn:
            for _ in range(self.mib * 4):
                conn.sendall(chunk)

    def echo(self, conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(64):
                conn.sendall(data)

    def close(self) -> None:
        for srv in self.servers:
            srv.close()


class Lines:
    """The guest's console: results, and the backend's CPU time at its markers."""

    def __init__(self, backend_pid: int) -> None:
        self.buf = b""
        self.results: dict[str, dict[str, list[float]]] = {}
        self.pid = backend_pid
        self.marks: dict[str, tuple[float, float]] = {}  # marker -> (time, backend CPU s)
        #: Backend CPU seconds and round trips over the vsock ping-pong runs.
        self.pingpong_cpu = 0.0
        self.pingpong_trips = 0
        self._pingpong_from = 0.0

    def write(self, chunk: bytes) -> int:
        self.buf += chunk
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if line.startswith(b"PINGPONG vsock start"):
                self._pingpong_from = cpu_seconds(self.pid)
            elif line.startswith(b"PINGPONG vsock end "):
                self.pingpong_cpu += cpu_seconds(self.pid) - self._pingpong_from
                self.pingpong_trips += int(line.split()[3])
            elif line.startswith(b"PINGPONG "):
                pass
            elif line.startswith((b"IDLE ", b"MEASURE ")):
                self.marks[line.decode().strip()] = (time.monotonic(), cpu_seconds(self.pid))
            elif line.startswith(b"{"):
                self.results = json.loads(line)
            else:
                sys.stderr.write(line.decode(errors="replace") + "\n")
        return len(chunk)

    def flush(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="MiB per bulk transfer (default 64)")
    parser.add_argument("--seconds", type=float, default=5.0, help="ping-pong duration (default 5)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="measurements of each kind per transport (default 3)"
    )
    parser.add_argument(
        "--idle", type=float, default=3.0, help="seconds of idle guest: the backend's idle CPU (default 3)"
    )
    parser.add_argument(
        "--backend-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for nsm vsock serve (e.g. --backend-arg=--poll-us=200)",
    )
    args = parser.parse_args()
    tc = vm_setup.load_or_setup()
    kernel = tc.kernel(None)
    netdir = net_modules(tc)
    tmp = Path(tempfile.mkdtemp(prefix="bench-vsock-"))
    vhost, uds = tmp / "vhost.sock", tmp / "v.sock"
    backend = start_vsock_serve(vhost, CID, uds, *args.backend_arg)
    host = HostPrograms(uds, args.mib)
    script = tmp / "guest.py"
    script.write_text(GUEST)
    lines = Lines(backend.pid)
    try:
        result = vm_run.run(
            tc,
            vm_run.RunOptions(
                command=[
                    sys.executable,
                    str(script),
                    tc.busybox,
                    kernel.module_dir,
                    str(netdir),
                    str(args.mib),
                    str(args.seconds),
                    str(args.idle),
                    str(args.repeat),
                ],
                device="none",
                timeout=1800,
                quiet=True,
                stdout=lines,  # type: ignore[arg-type]
                extra_qemu_args=[
                    "-chardev",
                    f"socket,id=vsock0,path={vhost}",
                    "-device",
                    "vhost-user-vsock-pci,chardev=vsock0",
                    "-netdev",
                    "user,id=net0",
                    "-device",
                    "virtio-net-pci,netdev=net0",
                ],
            ),
        )
    finally:
        host.close()
        backend.send_signal(signal.SIGTERM)
        backend.wait(30)
    if result.status != 0 or not lines.results or len(lines.marks) != 4:
        raise SystemExit(f"guest failed (status {result.status}); console: {result.console_log}")
    ours, user = lines.results["vsock"], lines.results["tcp"]
    print(f"backend: nsm vsock serve {' '.join(args.backend_arg)}".rstrip())
    print(
        f"{kernel.version} guest, QEMU TCG, {args.mib} MiB per bulk transfer, "
        f"{args.seconds:.0f} s of 1-byte ping-pong; one boot, side by side, "
        f"{args.repeat} measurements each, alternating"
    )
    print(f"{'':22}{'vsock (ours)':>13}{'-netdev user':>13}{'ratio':>7}   ratio of each pair")
    for key, label in (
        ("up_mib_s", "guest->host MiB/s"),
        ("down_mib_s", "host->guest MiB/s"),
        ("round_trips_s", "round trips/s"),
    ):
        a, b = statistics.median(ours[key]), statistics.median(user[key])
        pairs = " ".join(f"{x / y:.2f}" for x, y in zip(ours[key], user[key], strict=True))
        print(f"{label:22}{a:13.1f}{b:13.1f}{a / b:7.2f}   {pairs}")
    (_, c0), (_, c1) = lines.marks["MEASURE start"], lines.marks["MEASURE end"]
    moved = 2 * args.mib * args.repeat
    print(
        f"backend CPU: {c1 - c0:.2f} s over the measurements "
        f"({1000 * (c1 - c0) / moved:.1f} ms per MiB moved over vsock, ping-pong included)"
    )
    if lines.pingpong_trips:
        print(
            f"backend CPU per vsock round trip: {1e6 * lines.pingpong_cpu / lines.pingpong_trips:.0f} us "
            f"({lines.pingpong_trips} round trips)"
        )
    (t0, i0), (t1, i1) = lines.marks["IDLE start"], lines.marks["IDLE end"]
    print(f"backend CPU while the guest idles: {1000 * (i1 - i0):.0f} ms over {t1 - t0:.1f} s")


if __name__ == "__main__":
    main()
