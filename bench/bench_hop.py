"""The floor under vsock round trips: what the extra process hop of any vhost-user backend costs here.

A 1-byte ping-pong between a "guest" process and a host echo program, with nothing but
wake-ups and system calls in between, laid out like the two transports
``bench_vsock.py`` compares (each box a process, each arrow one wake-up):

* user-mode network (``-netdev user``): guest -kick eventfd-> QEMU's main loop -TCP->
  echo -TCP-> QEMU -interrupt eventfd-> guest.  QEMU reads the kick itself and talks
  to the host program over a socket (slirp);
* vhost-user backend: guest -kick eventfd-> backend -Unix socket-> echo -Unix socket->
  backend -call eventfd-> QEMU's main loop -interrupt eventfd-> guest.  Under TCG there
  is no irqfd: the backend's call eventfd wakes QEMU's main loop, which interrupts the
  vCPU, so an out-of-process backend adds one wake-up per round trip however fast it is.

The processes are Python but do no work beyond their system calls, so the ratio is
the best any out-of-process backend could reach against QEMU's own network with the
same per-wake-up cost (``--backend-work-us`` adds work to the backend's two turns, to
see what our Python's processing costs on top).  Rates and each process's CPU per round
trip are printed for both layouts, alternating, ``--rounds`` times.

    .venv/bin/python bench/bench_hop.py [--count 20000] [--rounds 3] [--backend-work-us 0]
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import statistics
import time
from collections.abc import Callable

from bench_wakeup import busy, calibrate


def _child(body: Callable[[], None], *unused: socket.socket) -> int:
    """Run ``body`` in a child process (which closes its copies of ``unused`` first)."""
    pid = os.fork()
    if pid == 0:
        try:
            for sock in unused:
                sock.close()
            body()
        finally:
            os._exit(0)
    return pid


def _relay(kick: int, sock: socket.socket, answer: int, iterations: int) -> None:
    """QEMU's main loop (slirp) or the backend: kick -> socket, socket -> answer eventfd."""
    ep = select.epoll()
    ep.register(kick, select.EPOLLIN)
    ep.register(sock.fileno(), select.EPOLLIN)
    while True:
        events = ep.poll(5.0)
        if not events:
            return  # the guest is gone
        for fd, _ in events:
            if fd == kick:
                os.eventfd_read(kick)
                busy(iterations)
                sock.send(b"p")
            else:
                if not sock.recv(64):
                    return
                busy(iterations)
                os.eventfd_write(answer, 1)


def _forward(call: int, irq: int) -> None:
    """QEMU's main loop for a vhost-user device: the backend's call eventfd -> an interrupt."""
    ep = select.epoll()
    ep.register(call, select.EPOLLIN)
    while ep.poll(5.0):
        os.eventfd_read(call)
        os.eventfd_write(irq, 1)


def _echo(sock: socket.socket) -> None:
    while data := sock.recv(64):
        sock.sendall(data)


def run(layout: str, count: int, iterations: int) -> tuple[float, dict[str, float]]:
    """Round trips/s and CPU µs per round trip of each process, for ``layout``."""
    flags = os.EFD_CLOEXEC
    kick, irq, call = os.eventfd(0, flags), os.eventfd(0, flags), os.eventfd(0, flags)
    if layout == "user-mode network":
        srv = socket.create_server(("127.0.0.1", 0))
        near = socket.create_connection(srv.getsockname())
        far, _ = srv.accept()
        srv.close()
        for s in (near, far):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        near, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pids = {"echo": _child(lambda: _echo(far), near)}
    if layout == "user-mode network":
        pids["QEMU main loop"] = _child(lambda: _relay(kick, near, irq, 0), far)
    else:
        pids["backend"] = _child(lambda: _relay(kick, near, call, iterations), far)
        pids["QEMU main loop"] = _child(lambda: _forward(call, irq), near, far)
    near.close()
    far.close()
    waiter = select.poll()
    waiter.register(irq, select.POLLIN)
    cpu: dict[str, float] = {}
    try:
        for _ in range(200):  # warm up
            os.eventfd_write(kick, 1)
            waiter.poll(5000)
            os.eventfd_read(irq)
        start, own = time.perf_counter(), time.process_time()
        for _ in range(count):
            os.eventfd_write(kick, 1)
            if not waiter.poll(5000):
                raise RuntimeError("the round trip stopped")
            os.eventfd_read(irq)
        wall = time.perf_counter() - start
        cpu["guest"] = (time.process_time() - own) / count * 1e6
    finally:
        for fd in (kick, irq, call):
            os.close(fd)
        for name, pid in pids.items():
            os.kill(pid, signal.SIGTERM)
            usage = os.wait4(pid, 0)[2]
            cpu[name] = (usage.ru_utime + usage.ru_stime) / (count + 200) * 1e6
    return count / wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000, help="round trips per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each layout, alternating")
    parser.add_argument(
        "--backend-work-us", type=float, default=0.0, help="Python work in each of the backend's two turns"
    )
    args = parser.parse_args()
    iterations = calibrate(args.backend_work_us) if args.backend_work_us > 0 else 0
    layouts = ("user-mode network", "vhost-user backend")
    rates: dict[str, list[float]] = {name: [] for name in layouts}
    print(f"1-byte ping-pong through processes that only wake and relay "
          f"(backend work {args.backend_work_us:g} us per turn), {os.cpu_count()} CPUs")
    for r in range(args.rounds):
        for name in layouts if r % 2 == 0 else layouts[::-1]:
            rate, cpu = run(name, args.count, iterations)
            rates[name].append(rate)
            parts = ", ".join(f"{k} {v:.0f}" for k, v in cpu.items())
            print(f"{name:<20} {rate:8.0f} round trips/s {1e6 / rate:6.1f} us each; CPU us/rt: {parts}")
    a, b = (statistics.median(rates[n]) for n in layouts)
    print(f"median: user-mode network {a:.0f}/s, vhost-user backend {b:.0f}/s, ratio {b / a:.2f} "
          f"({1e6 / b - 1e6 / a:+.1f} us per round trip for the extra hop)")


if __name__ == "__main__":
    main()
