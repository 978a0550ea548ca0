"""The vsock backend's own cost per round trip, without a VM: our Python driver as the guest.

A TCG guest makes ``bench_vsock.py``'s round trips noisy (±30 % between pairs on a
shared machine), too noisy to see a few µs of backend work.  Here the guest is our
Python driver (``VsockDriver``, a vhost-user frontend over real rings and eventfds) in
this process, the backend is a real ``nsm vsock serve`` process and the host program a
forked echo process on the backend's ``PATH_<port>`` socket.  Each measurement is a
1-byte ping-pong for ``--seconds``; it reports round trips/s and the backend's CPU µs per
round trip (from /proc).  Give ``--backend-src`` twice (two source trees, e.g. main's and
a branch's ``src``) to compare backends, alternating, in the same minutes.

    .venv/bin/python bench/bench_vsock_host.py [--seconds 3] [--rounds 3] [--backend-src DIR ...]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from virtio_nsm.vsock.driver import VsockDriver

PORT = 7003


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def echo_process(path: Path) -> int:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)
    pid = os.fork()
    if pid == 0:
        try:
            while True:
                conn, _ = srv.accept()
                with conn:
                    while data := conn.recv(64):
                        conn.sendall(data)
        finally:
            os._exit(0)
    srv.close()
    return pid


def measure(src: str, seconds: float) -> tuple[float, float]:
    """Round trips/s and backend CPU µs per round trip with the backend from ``src``."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-vsock-host-"))
    vhost, uds = tmp / "vhost.sock", tmp / "v.sock"
    env = dict(os.environ, PYTHONPATH=src)
    backend = subprocess.Popen(
        [sys.executable, "-m", "virtio_nsm", "vsock", "serve", "-q", "--vhost-user", str(vhost),
         "--guest-cid", "5", "--uds-path", str(uds)],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    echo = 0
    try:
        assert backend.stdout is not None and backend.stdout.readline().startswith("vhost-user vsock")
        echo = echo_process(Path(f"{uds}_{PORT}"))
        with VsockDriver(vhost) as drv:
            transport = drv.transport
            sock = transport.connect(PORT)
            drv.run_until(lambda: sock.state == "established", what="connect")
            got = bytearray()

            def answered() -> bool:
                got.extend(transport.read(sock, 64))
                return bool(got)

            def once() -> None:
                got.clear()
                transport.write(sock, b"p")
                drv.run_until(answered, what="the echo")

            for _ in range(200):
                once()
            n, cpu0, t0 = 0, cpu_seconds(backend.pid), time.monotonic()
            while time.monotonic() - t0 < seconds:
                once()
                n += 1
            wall, cpu = time.monotonic() - t0, cpu_seconds(backend.pid) - cpu0
    finally:
        backend.send_signal(signal.SIGTERM)
        backend.wait(30)
        if echo:
            os.kill(echo, signal.SIGTERM)
            os.waitpid(echo, 0)
    return n / wall, cpu / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="ping-pong per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per backend, alternating")
    parser.add_argument("--backend-src", action="append", default=[], metavar="DIR",
                        help="PYTHONPATH of a backend to measure (default: this tree's src)")
    args = parser.parse_args()
    srcs = args.backend_src or [str(Path(__file__).resolve().parent.parent / "src")]
    rates: dict[str, list[float]] = {s: [] for s in srcs}
    cpus: dict[str, list[float]] = {s: [] for s in srcs}
    for r in range(args.rounds):
        for src in srcs if r % 2 == 0 else srcs[::-1]:
            rate, cpu = measure(src, args.seconds)
            rates[src].append(rate)
            cpus[src].append(cpu)
            print(f"{src}: {rate:7.0f} round trips/s, backend CPU {cpu:5.1f} us per round trip", flush=True)
    for src in srcs:
        print(f"median {src}: {statistics.median(rates[src]):7.0f} round trips/s, "
              f"backend CPU {statistics.median(cpus[src]):5.1f} us per round trip")


if __name__ == "__main__":
    main()
