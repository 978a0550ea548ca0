"""What durability costs: ExtendPCR with the state on disk before each answer, or not.

    .venv/bin/python bench/bench_durable.py [--dir DIR] [--seconds 0.5] [--rounds 5] [--no-vhost-user]

All in one run, in alternating rounds (medians), on the disk holding ``--dir``
(default: a temporary directory under the system temp dir; make sure it is a
real disk, not tmpfs):

* the floor: one synchronous write of a journal record's size -- ``pwrite`` of
  one 4 KiB slot into a preallocated file, then ``fdatasync`` -- and, for
  reference, a 200-byte write + ``os.fsync`` and the atomic replace of a state
  file (write + fsync + rename + directory fsync: what a compaction costs);
* ``DurableNsm.handle(ExtendPCR)`` with a durable store (one journal record +
  ``fdatasync``), with ``durable=False`` (same writes, no sync) and in memory
  only (no store);
* the ratio of a durable ExtendPCR to the floor (target: at most 1.5);
* optionally the same ExtendPCR through vhost-user, our frontend against real
  ``nsm serve --state-dir`` and ``nsm serve --ephemeral`` processes.

Not a test: numbers depend on the disk and the load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from _harness import child_env, rate

from virtio_nsm import journal, persist
from virtio_nsm.durable import DurableNsm
from virtio_nsm.nsm.frontend import VhostUserTransport
from virtio_nsm.nsm.protocol import ExtendPCR, encode_request

EXTEND = encode_request(ExtendPCR(16, b"\x01" * 32))


def medians(cases: dict[str, Callable[[], object]], rounds: int, seconds: float) -> dict[str, float]:
    """Alternating rounds over all cases (drift hits each alike); median rate of each."""
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            rates[name].append(rate(fn, seconds))
    return {name: statistics.median(r) for name, r in rates.items()}


def report(title: str, results: dict[str, float]) -> None:
    print(title)
    for name, per_second in results.items():
        print(f"  {name:<34} {per_second:>10,.0f}/s  {1e6 / per_second:>9.1f} us each")


def local(directory: Path, rounds: int, seconds: float) -> None:
    floor = directory / "fdatasync-probe"
    fd = os.open(floor, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, bytes(64 * journal.SLOT))  # preallocated with real blocks, as the journal is
    os.fsync(fd)
    slot = os.urandom(journal.SLOT)
    small = directory / "fsync-probe"
    sfd = os.open(small, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    payload = os.urandom(200)

    def one_record_write() -> None:
        os.pwrite(fd, slot, journal.SLOT)
        os.fdatasync(fd)

    def one_fsync() -> None:
        os.pwrite(sfd, payload, 0)
        os.fsync(sfd)

    state = persist.encode_snapshot(persist.Snapshot(DurableNsm.ephemeral().device.state, 0))
    target = directory / "replace-probe"
    durable = DurableNsm.open(directory / "durable")
    fast = DurableNsm.open(directory / "no-fsync", durable=False)
    memory = DurableNsm.ephemeral()
    floor_name, ours_name = "4 KiB pwrite + fdatasync (floor)", "ExtendPCR, state dir (nsm serve)"
    try:
        results = medians({
            floor_name: one_record_write,
            ours_name: lambda: durable.handle(EXTEND),
            "200-byte write + os.fsync": one_fsync,
            "atomic replace of state.bin": lambda: persist.write_atomic(target, state),
            "ExtendPCR, state dir, durable=False": lambda: fast.handle(EXTEND),
            "ExtendPCR, memory only (--ephemeral)": lambda: memory.handle(EXTEND),
        }, rounds, seconds)
        report("one synchronous write beside DurableNsm.handle(ExtendPCR):", results)
        ratio = results[floor_name] / results[ours_name]
        print(f"  durable ExtendPCR / floor: {ratio:.2f} x  (target <= 1.5: "
              f"{'met' if ratio <= 1.5 else 'NOT met'})")
    finally:
        os.close(fd)
        os.close(sfd)
        floor.unlink()
        small.unlink()
        target.unlink(missing_ok=True)
        durable.close()
        fast.close()


def vhost_user(directory: Path, rounds: int, seconds: float) -> None:
    procs, transports = [], {}
    try:
        for name, args in (
            ("nsm serve --state-dir", ["--state-dir", str(directory / "served")]),
            ("nsm serve --ephemeral", ["--ephemeral"]),
        ):
            sock = directory / f"{len(procs)}.sock"
            proc = subprocess.Popen(
                [sys.executable, "-m", "virtio_nsm", "serve", "-q", "--vhost-user", str(sock), *args],
                stdout=subprocess.PIPE, text=True, env=child_env(directory),
            )
            procs.append(proc)
            assert proc.stdout is not None and proc.stdout.readline()  # listening
            transports[name] = VhostUserTransport(sock, timeout=30)
        results = medians(
            {name: (lambda t=t: t.exchange(EXTEND)) for name, t in transports.items()}, rounds, seconds
        )
        report("ExtendPCR through vhost-user (our frontend, one request at a time):", results)
    finally:
        for t in transports.values():
            t.close()
        for proc in procs:
            proc.terminate()
            proc.communicate(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="Where to put state (a real disk).")
    parser.add_argument("--seconds", type=float, default=0.5, help="Per case and round.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-vhost-user", action="store_true", help="Skip the vhost-user part.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-durable-", dir=args.dir) as tmp:
        directory = Path(tmp)
        fs = subprocess.run(["df", "-T", str(directory)], capture_output=True, text=True).stdout
        print(f"python {sys.version.split()[0]}; {directory} on: {fs.splitlines()[-1] if fs else '?'}")
        local(directory, args.rounds, args.seconds)
        if not args.no_vhost_user:
            vhost_user(directory, args.rounds, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
