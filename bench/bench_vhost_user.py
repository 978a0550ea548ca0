"""DescribePCR throughput: ``NsmDevice.handle()`` alone vs. through the vhost-user backend.

The backend is a real ``nsm serve --vhost-user`` process; this process is the
frontend (our Python virtio driver), so every request crosses shared memory,
an eventfd kick and an eventfd interrupt between two processes.

    PYTHONPATH=src python bench/bench_vhost_user.py [--seconds 2] [--pcr 0]

Prints requests/s, wall microseconds per request, the backend process's CPU
microseconds per request ("device time" as the frontend's peer spends it), and
the ratio to ``handle()`` (1.0 would mean the transport costs nothing).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from virtio_nsm.nsm.device import NsmDevice
from virtio_nsm.nsm.protocol import DescribePCR, encode_request
from virtio_nsm.vhost_user.frontend import VhostUserTransport


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(run_batch: Callable[[], int], seconds: float) -> tuple[float, int]:
    """Run ``run_batch`` (returns requests done) for about ``seconds``; give requests/s."""
    run_batch()  # warm up
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        done += run_batch()
    return done / (time.perf_counter() - start), done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per mode")
    parser.add_argument("--pcr", type=int, default=0)
    parser.add_argument("--queue-size", type=int, default=1024)
    args = parser.parse_args()
    request = encode_request(DescribePCR(args.pcr))

    device = NsmDevice()
    expected = device.handle(request)

    def handle_batch() -> int:
        for _ in range(100):
            device.handle(request)
        return 100

    base_rate, _ = measure(handle_batch, args.seconds)
    # (mode, requests/s, backend CPU per request in us or None)
    rows: list[tuple[str, float, float | None]] = [("handle() in-process", base_rate, None)]

    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "nsm.sock"
        server = subprocess.Popen(
            [sys.executable, "-m", "virtio_nsm", "serve", "--vhost-user", str(sock)],
            stdout=subprocess.PIPE, stderr=None, text=True, env=dict(os.environ),
        )
        try:
            assert server.stdout is not None
            server.stdout.readline()  # listening
            with VhostUserTransport(sock, queue_size=args.queue_size, timeout=30) as transport:
                # Same request, a different device instance: compare the shape only.
                assert len(transport.exchange(request)) == len(expected)

                def single() -> int:
                    for _ in range(20):
                        transport.exchange(request)
                    return 20

                def run(name: str, batch: Callable[[], int]) -> None:
                    cpu = cpu_seconds(server.pid)
                    rate, done = measure(batch, args.seconds)
                    device_us = (cpu_seconds(server.pid) - cpu) / done * 1e6
                    rows.append((name, rate, device_us))

                run("vhost-user, one request at a time", single)
                for size in (8, 64, args.queue_size // 2):
                    burst = [request] * size

                    def batched(burst: list[bytes] = burst) -> int:
                        return len(transport.exchange_many(burst))

                    run(f"vhost-user, bursts of {size}", batched)
        finally:
            server.terminate()
            server.wait(10)

    print(f"DescribePCR({args.pcr}), {len(request)}-byte request, {len(expected)}-byte response")
    print("us/req: wall time per request; backend us/req: CPU the backend process spent per")
    print("request (device time incl. vhost-user/virtqueue work; ~includes warm-up, so approx.)")
    print(f"{'mode':<36} {'req/s':>10} {'us/req':>9} {'backend us/req':>15} {'ratio':>7}")
    for name, rate, device_us in rows:
        backend = f"{device_us:.1f}" if device_us is not None else f"{1e6 / base_rate:.1f}"
        print(f"{name:<36} {rate:>10.0f} {1e6 / rate:>9.1f} {backend:>15} {rate / base_rate:>7.2f}")


if __name__ == "__main__":
    main()
