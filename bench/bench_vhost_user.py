"""DescribePCR throughput: ``NsmDevice.handle()`` alone vs. through the vhost-user backend.

The backend is a real ``nsm serve --vhost-user`` process; this process is the
frontend (our Python virtio driver), so every request crosses shared memory,
an eventfd kick and an eventfd interrupt between two processes.

    .venv/bin/python bench/bench_vhost_user.py [--seconds 0.5] [--rounds 5] [--pcr 0]

Prints requests/s, wall microseconds per request, the backend process's CPU
microseconds per request ("device time" as the frontend's peer spends it), this
process's (the driver's) CPU microseconds per request, and the ratio to
``handle()`` (1.0 would mean the transport costs nothing).

By default, one request at a time is measured in four configurations, in
alternating rounds, each beside ``handle()`` measured right after it:

* the default one: ``nsm serve``'s adaptive polling and our driver's adaptive spin
  on the used ring (``NsmFrontend()``, up to 100 µs before it sleeps);
* ``--poll-us 0``: the backend does not poll (it waits for every kick), the driver
  spins adaptively;
* ``--driver-poll-us 0``: the backend polls, the driver sleeps until the interrupt;
* both off: every request is a kick and an interrupt, each side sleeping.

then pipelined bursts (no spin involved) in the default configuration.  With
``--poll-us N`` (passed to ``nsm serve``; 0: no polling) or ``--driver-poll-us N``
(our driver spins up to N µs; 0: never) only that one configuration is measured.
The driver's spin statistics (answers found spinning, spins that ran out,
back-offs, trials that kept the spin) are printed for the configurations where it
adapts.
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
from dataclasses import dataclass, field
from pathlib import Path

from _harness import child_env, children_cleaned_up

from virtio_nsm._process import stop_process
from virtio_nsm.nsm.device import NsmDevice
from virtio_nsm.nsm.frontend import VhostUserTransport
from virtio_nsm.nsm.protocol import DescribePCR, encode_request
from virtio_nsm.vhost_user.spin import SpinWindow


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


@dataclass
class Config:
    """One way of running the pair: the backend's --poll-us and our driver's spin."""

    name: str
    backend_poll_us: int | None  # None: nsm serve's default (adaptive polling)
    driver_poll_us: int | None  # None: our driver's default (adaptive spin)
    rates: list[float] = field(default_factory=list)
    bases: list[float] = field(default_factory=list)
    backend_us: list[float] = field(default_factory=list)
    driver_us: list[float] = field(default_factory=list)
    spin: SpinWindow | None = None


def start_backend(tmp: Path, poll_us: int | None) -> tuple[subprocess.Popen[str], Path]:
    sock = tmp / f"nsm-{poll_us}.sock"
    poll = [] if poll_us is None else ["--poll-us", str(poll_us)]
    server = subprocess.Popen(
        [sys.executable, "-m", "virtio_nsm", "serve", "-q", "--ephemeral", *poll,
         "--vhost-user", str(sock)],
        stdout=subprocess.PIPE, stderr=None, text=True, env=child_env(tmp),
    )
    assert server.stdout is not None
    server.stdout.readline()  # listening
    return server, sock


def set_driver_spin(transport: VhostUserTransport, poll_us: int | None) -> SpinWindow | None:
    """Switch the transport's spin: adaptive (a fresh window), fixed, or none."""
    transport.spin = SpinWindow() if poll_us is None else None
    transport.poll_ns = 0 if poll_us is None else poll_us * 1000
    return transport.spin


def row(name: str, rates: list[float], bases: list[float], backend_us: list[float],
        driver_us: list[float]) -> str:
    r, b = statistics.median(rates), statistics.median(bases)
    return (f"{name:<44} {r:>9.0f} {1e6 / r:>7.1f} {statistics.median(backend_us):>15.1f} "
            f"{statistics.median(driver_us):>14.1f} {b:>15.0f} {r / b:>7.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="per round and mode")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pcr", type=int, default=0)
    parser.add_argument("--queue-size", type=int, default=1024)
    parser.add_argument("--poll-us", type=int, default=None,
                        help="only this backend --poll-us (0: no polling); default: the four "
                             "configurations of the module docstring")
    parser.add_argument("--driver-poll-us", type=int, default=None,
                        help="only this driver spin in us (0: none); default: the four "
                             "configurations of the module docstring")
    args = parser.parse_args()
    request = encode_request(DescribePCR(args.pcr))

    device = NsmDevice()
    expected = device.handle(request)

    def handle_batch() -> int:
        for _ in range(100):
            device.handle(request)
        return 100

    if args.poll_us is None and args.driver_poll_us is None:
        configs = [
            Config("default (backend polls, driver spins)", None, None),
            Config("--poll-us 0 (driver spins)", 0, None),
            Config("--driver-poll-us 0 (backend polls)", None, 0),
            Config("--poll-us 0 --driver-poll-us 0", 0, 0),
        ]
    else:
        backend = "default" if args.poll_us is None else args.poll_us
        driver = "adaptive" if args.driver_poll_us is None else args.driver_poll_us
        configs = [Config(f"--poll-us {backend} --driver-poll-us {driver}",
                          args.poll_us, args.driver_poll_us)]

    with children_cleaned_up(), tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        servers: dict[int | None, tuple[subprocess.Popen[str], VhostUserTransport]] = {}
        try:
            for poll in dict.fromkeys(c.backend_poll_us for c in configs):
                server, sock = start_backend(tmp, poll)
                transport = VhostUserTransport(sock, queue_size=args.queue_size, timeout=30)
                servers[poll] = (server, transport)
                # Same request, a different device instance: compare the shape only.
                assert len(transport.exchange(request)) == len(expected)

            print(f"DescribePCR({args.pcr}): {len(request)}-byte request, "
                  f"{len(expected)}-byte response; medians of {args.rounds} alternating rounds")
            print("us/req = wall time per request; backend us/req = CPU time of the backend")
            print("process per request (the device's handle() plus all vhost-user/virtqueue work)")
            print("driver us/req = CPU time of this process (our virtio driver) per request")
            header = (f"{'one request at a time':<44} {'req/s':>9} {'us/req':>7} {'backend us/req':>15} "
                      f"{'driver us/req':>14} {'handle() req/s':>15} {'ratio':>7}")
            print(header)
            for _ in range(args.rounds):
                for config in configs:
                    server, transport = servers[config.backend_poll_us]
                    spin = set_driver_spin(transport, config.driver_poll_us)

                    def single(transport: VhostUserTransport = transport) -> int:
                        for _ in range(20):
                            transport.exchange(request)
                        return 20

                    cpu, own = cpu_seconds(server.pid), time.process_time()
                    rate, done = measure(single, args.seconds)
                    config.backend_us.append((cpu_seconds(server.pid) - cpu) / done * 1e6)
                    config.driver_us.append((time.process_time() - own) / done * 1e6)
                    config.rates.append(rate)
                    config.bases.append(measure(handle_batch, args.seconds / 2)[0])
                    config.spin = spin
            for config in configs:
                print(row(config.name, config.rates, config.bases, config.backend_us, config.driver_us))
            for config in configs:
                if config.spin is not None:
                    s = config.spin
                    print(f"  driver spin, {config.name}, last round: {s.hits} answers found "
                          f"spinning, {s.misses} spins ran out, {s.backoffs} back-offs, "
                          f"window {s.window_ns // 1000} us; trials kept the spin "
                          f"{s.spin_won} of {s.decisions} times")

            first = configs[0]
            server, transport = servers[first.backend_poll_us]
            set_driver_spin(transport, first.driver_poll_us)
            print(f"{'pipelined bursts, ' + first.name:<44}")
            for size in (8, 64, args.queue_size // 2):
                burst = [request] * size
                rates, bases, backend_us, driver_us = [], [], [], []
                for _ in range(args.rounds):
                    cpu, own = cpu_seconds(server.pid), time.process_time()
                    rate, done = measure(lambda burst=burst: len(transport.exchange_many(burst)),
                                         args.seconds)
                    backend_us.append((cpu_seconds(server.pid) - cpu) / done * 1e6)
                    driver_us.append((time.process_time() - own) / done * 1e6)
                    rates.append(rate)
                    bases.append(measure(handle_batch, args.seconds / 2)[0])
                print(row(f"  bursts of {size}", rates, bases, backend_us, driver_us))
            print(f"handle() alone: {1e6 / statistics.median(first.bases):.2f} us/req")
        finally:
            for server, transport in servers.values():
                transport.close()
                stop_process(server, timeout=10)


if __name__ == "__main__":
    main()
