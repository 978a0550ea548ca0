"""DescribePCR throughput: ``NsmDevice.handle()`` alone vs. through the vhost-user backend.

The backend is a real ``nsm serve --vhost-user`` process; this process is the
frontend (our Python virtio driver), so every request crosses shared memory,
an eventfd kick and an eventfd interrupt between two processes.

    .venv/bin/python bench/bench_vhost_user.py [--seconds 0.5] [--rounds 5] [--pcr 0]

Prints requests/s, wall microseconds per request, the backend process's CPU
microseconds per request ("device time" as the frontend's peer spends it), this
process's (the driver's) CPU microseconds per request, and the ratio to
``handle()`` (1.0 would mean the transport costs nothing).  ``--poll-us 0``
runs the backend without polling (every request waits for its kick);
``--driver-poll-us N`` makes our driver spin on the used ring for up to N µs
before it waits for the interrupt (single requests only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _harness import child_env

from virtio_nsm._process import stop_process
from virtio_nsm.nsm.device import NsmDevice
from virtio_nsm.nsm.frontend import VhostUserTransport
from virtio_nsm.nsm.protocol import DescribePCR, encode_request


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
    parser.add_argument("--seconds", type=float, default=0.5, help="per round and mode")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pcr", type=int, default=0)
    parser.add_argument("--queue-size", type=int, default=1024)
    parser.add_argument("--poll-us", type=int, default=None,
                        help="the backend's --poll-us (default: nsm serve's own, 200); 0: no polling")
    parser.add_argument("--driver-poll-us", type=int, default=0,
                        help="our driver spins on the used ring this long before it waits for "
                             "the interrupt (one request at a time only; default 0: no spinning)")
    args = parser.parse_args()
    request = encode_request(DescribePCR(args.pcr))

    device = NsmDevice()
    expected = device.handle(request)

    def handle_batch() -> int:
        for _ in range(100):
            device.handle(request)
        return 100

    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "nsm.sock"
        poll = [] if args.poll_us is None else ["--poll-us", str(args.poll_us)]
        server = subprocess.Popen(
            [sys.executable, "-m", "virtio_nsm", "serve", "-q", "--ephemeral", *poll,
             "--vhost-user", str(sock)],
            stdout=subprocess.PIPE, stderr=None, text=True, env=child_env(Path(tmp)),
        )
        try:
            assert server.stdout is not None
            server.stdout.readline()  # listening
            with VhostUserTransport(sock, queue_size=args.queue_size, timeout=30,
                                    poll_us=args.driver_poll_us) as transport:
                # Same request, a different device instance: compare the shape only.
                assert len(transport.exchange(request)) == len(expected)

                def single() -> int:
                    for _ in range(20):
                        transport.exchange(request)
                    return 20

                modes: list[tuple[str, Callable[[], int]]] = [
                    ("vhost-user, one request at a time", single)
                ]
                for size in (8, 64, args.queue_size // 2):
                    burst = [request] * size

                    def batched(burst: list[bytes] = burst) -> int:
                        return len(transport.exchange_many(burst))

                    modes.append((f"vhost-user, bursts of {size}", batched))

                print(f"DescribePCR({args.pcr}): {len(request)}-byte request, "
                      f"{len(expected)}-byte response; medians of {args.rounds} alternating rounds")
                print("us/req = wall time per request; backend us/req = CPU time of the backend")
                print("process per request (the device's handle() plus all vhost-user/virtqueue work)")
                print("driver us/req = CPU time of this process (our virtio driver) per request")
                print(f"{'mode':<36} {'req/s':>9} {'us/req':>7} {'backend us/req':>15} "
                      f"{'driver us/req':>14} {'handle() req/s':>15} {'ratio':>7}")
                for name, fn in modes:
                    rates, bases, device_us, driver_us = [], [], [], []
                    for _ in range(args.rounds):
                        cpu, own = cpu_seconds(server.pid), time.process_time()
                        rate, done = measure(fn, args.seconds)
                        device_us.append((cpu_seconds(server.pid) - cpu) / done * 1e6)
                        driver_us.append((time.process_time() - own) / done * 1e6)
                        rates.append(rate)
                        bases.append(measure(handle_batch, args.seconds / 2)[0])
                    r, b = statistics.median(rates), statistics.median(bases)
                    print(f"{name:<36} {r:>9.0f} {1e6 / r:>7.1f} "
                          f"{statistics.median(device_us):>15.1f} {statistics.median(driver_us):>14.1f} "
                          f"{b:>15.0f} {r / b:>7.1%}")
                polling = "default polling" if args.poll_us is None else f"--poll-us {args.poll_us}"
                print(f"handle() alone: {1e6 / b:.2f} us/req (backend: nsm serve, {polling}; "
                      f"driver spin {args.driver_poll_us} us)")
        finally:
            stop_process(server, timeout=10)


if __name__ == "__main__":
    main()
