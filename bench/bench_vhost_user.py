"""DescribePCR throughput: ``NsmDevice.handle()`` alone vs. through the vhost-user backend.

The backend is a real ``nsm serve --vhost-user`` process; this process is the
frontend (our Python virtio driver), so every request crosses shared memory,
an eventfd kick and an eventfd interrupt between two processes.

    PYTHONPATH=src python bench/bench_vhost_user.py [--seconds 2] [--pcr 0]

Prints requests/s and microseconds per request for each mode and the ratio
to ``handle()`` (1.0 would mean the transport costs nothing).
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
    rows = [("handle() in-process", base_rate)]

    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "nsm.sock"
        server = subprocess.Popen(
            [sys.executable, "-m", "virtio_nsm", "serve", "--vhost-user", str(sock)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=dict(os.environ),
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

                rows.append(("vhost-user, one request at a time", measure(single, args.seconds)[0]))
                for batch in (8, 64, args.queue_size // 2):
                    burst = [request] * batch

                    def batched(burst: list[bytes] = burst) -> int:
                        return len(transport.exchange_many(burst))

                    rows.append(
                        (f"vhost-user, bursts of {batch}", measure(batched, args.seconds)[0])
                    )
        finally:
            server.terminate()
            server.wait(10)

    print(f"DescribePCR({args.pcr}), {len(request)}-byte request, {len(expected)}-byte response")
    print(f"{'mode':<36} {'req/s':>10} {'us/req':>9} {'ratio':>7}")
    for name, rate in rows:
        print(f"{name:<36} {rate:>10.0f} {1e6 / rate:>9.1f} {rate / base_rate:>7.2f}")


if __name__ == "__main__":
    main()
