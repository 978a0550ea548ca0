"""What one cross-process wake-up costs on this machine, by CPU placement.

Two processes hand a token back and forth over two eventfds (one ``epoll``, one
``poll`` waiter, like ``nsm serve`` and our driver), each doing ``--work-us`` of
Python work per turn, with both pinned to one CPU, pinned to two different CPUs,
and left to the scheduler.  Prints round trips/s and each side's CPU µs per round
trip: the floor under ``bench_vhost_user.py``'s one-request-at-a-time figures,
which are two such wake-ups per request.

    .venv/bin/python bench/bench_wakeup.py [--work-us 2] [--count 20000]
"""

from __future__ import annotations

import argparse
import os
import select
import time


def busy(iterations: int) -> int:
    total = 0
    for i in range(iterations):
        total += i
    return total


def calibrate(work_us: float) -> int:
    """Iterations of :func:`busy` that take about ``work_us`` µs here."""
    n = 10_000
    start = time.perf_counter()
    for _ in range(100):
        busy(n)
    per_iteration = (time.perf_counter() - start) / (100 * n)
    return max(0, round(work_us * 1e-6 / per_iteration))


def ping_pong(count: int, iterations: int, cpus: tuple[int, int] | None) -> tuple[float, float, float]:
    """Round trips/s, and the CPU µs per round trip of this side and of the other."""
    to_child = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    to_parent = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the "backend": epoll, read, work, write
        try:
            if cpus is not None:
                os.sched_setaffinity(0, {cpus[1]})
            ep = select.epoll()
            ep.register(to_child, select.EPOLLIN)
            for _ in range(count + 1):
                if not ep.poll(5.0):
                    break  # the parent is gone
                os.eventfd_read(to_child)
                busy(iterations)
                os.eventfd_write(to_parent, 1)
        finally:
            os._exit(0)
    try:
        if cpus is not None:
            os.sched_setaffinity(0, {cpus[0]})
        waiter = select.poll()
        waiter.register(to_parent, select.POLLIN)
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(count):
            busy(iterations)
            os.eventfd_write(to_child, 1)
            if not waiter.poll(5000):
                raise RuntimeError("the other process stopped answering")
            os.eventfd_read(to_parent)
        wall, own = time.perf_counter() - start, time.process_time() - cpu
        os.eventfd_write(to_child, 1)  # its last turn
    finally:
        usage = os.wait4(pid, 0)[2]
        if cpus is not None:
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        os.close(to_child)
        os.close(to_parent)
    other = usage.ru_utime + usage.ru_stime
    return count / wall, own / count * 1e6, other / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-us", type=float, default=2.0, help="Python work per side and turn")
    parser.add_argument("--count", type=int, default=20_000, help="round trips per placement")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    iterations = calibrate(args.work_us)
    cpus = sorted(os.sched_getaffinity(0))
    placements: list[tuple[str, tuple[int, int] | None]] = [("one CPU", (cpus[0], cpus[0]))]
    if len(cpus) > 1:
        placements.append(("two CPUs", (cpus[0], cpus[1])))
    placements.append(("scheduler's choice", None))
    print(f"eventfd ping-pong, ~{args.work_us} us of Python work per side and turn")
    print(f"{'placement':<20} {'round trips/s':>14} {'us/rt':>7} {'CPU us/rt: poll side':>21} "
          f"{'epoll side':>11}")
    for _ in range(args.rounds):
        for name, pair in placements:
            rate, own, other = ping_pong(args.count, iterations, pair)
            print(f"{name:<20} {rate:>14.0f} {1e6 / rate:>7.1f} {own:>21.1f} {other:>11.1f}")


if __name__ == "__main__":
    main()
