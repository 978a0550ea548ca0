"""Instructions per request of ``nsm serve``'s request path, counted by callgrind.

Wall and CPU times on a shared machine swing with what the other users run;
instruction counts do not.  This starts a real ``nsm serve --vhost-user SOCK
--poll-us 0`` under ``valgrind --tool=callgrind`` (the backend then waits for every
kick: the path of issue 17's "backend CPU per request when not polling"), drives it
from this process with our virtio driver, one DescribePCR at a time, and counts the
backend's user-space instructions over ``-n`` requests after a warm-up
(``callgrind_control`` zeroes the counters, then dumps them).  For comparison it
counts, in a second callgrind run, ``NsmDevice.handle()`` alone on the same request:
what the backend does beyond that is the transport's share.

    .venv/bin/python bench/count_backend.py [-n 2000] [--driver-poll-us 0]

``--driver-poll-us 0`` (default): our driver sleeps until the interrupt, so the
backend writes the call eventfd for every request (the worst case for the backend);
``--driver-poll-us N`` makes it spin, so the backend skips that write; the count then
depends on timing (a request that arrives while the backend, slowed down by valgrind,
is still in its pass is served in that pass without a wake-up: 63,700 and 79,000 in
two runs of the same tree), so only the default is comparable between trees.  Kernel work
(system calls, wake-ups) is not counted: callgrind sees user space only.  Needs
valgrind (``apt-get install valgrind``); takes a minute or two.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import SRC, child_env, children_cleaned_up

from virtio_nsm.nsm.frontend import VhostUserTransport
from virtio_nsm.nsm.protocol import DescribePCR, encode_request

_VALGRIND = ["valgrind", "--tool=callgrind", "--vgdb=yes", "--dump-instr=no"]
_HANDLE_ONLY = """
import sys
from virtio_nsm.nsm.device import NsmDevice
from virtio_nsm.nsm.protocol import DescribePCR, encode_request
device = NsmDevice()
request = encode_request(DescribePCR(0))
for _ in range(50):
    device.handle(request)
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.readline()
for _ in range(int(sys.argv[1])):
    device.handle(request)
sys.stdout.write("done\\n"); sys.stdout.flush()
sys.stdin.readline()
"""


def total_instructions(dump: Path) -> int:
    """The ``totals:``/``summary:`` line of a callgrind output file (instructions)."""
    text = dump.read_text()
    match = re.search(r"^(?:totals|summary):\s+(\d+)", text, re.MULTILINE)
    if match is None:
        raise SystemExit(f"no totals in {dump}")
    return int(match.group(1))


def control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def dumped(tmp: Path, before: set[Path]) -> Path:
    """The dump file callgrind_control -d just wrote (the newest new one)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = sorted(set(tmp.glob("cg.out*")) - before, key=lambda p: p.stat().st_mtime)
        if new and new[-1].stat().st_size:
            time.sleep(0.2)
            return new[-1]
        time.sleep(0.1)
    raise SystemExit("callgrind wrote no dump")


def count_backend(tmp: Path, n: int, driver_poll_us: int, keep: Path | None = None) -> int:
    sock = tmp / "nsm.sock"
    server = subprocess.Popen(
        [*_VALGRIND, f"--callgrind-out-file={tmp}/cg.out.%p", sys.executable, "-m", "virtio_nsm",
         "serve", "-q", "--ephemeral", "--poll-us", "0", "--vhost-user", str(sock)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=dict(child_env(tmp), PYTHONHASHSEED="0"),
    )
    try:
        assert server.stdout is not None
        server.stdout.readline()  # listening
        request = encode_request(DescribePCR(0))
        with VhostUserTransport(sock, queue_size=64, timeout=120, poll_us=driver_poll_us) as fe:
            for _ in range(200):  # warm-up: caches, first-use paths
                fe.exchange(request)
            before = set(tmp.glob("cg.out*"))
            control("-z", str(server.pid))
            for _ in range(n):
                fe.exchange(request)
            control("-d", str(server.pid))
            dump = dumped(tmp, before)
            if keep is not None:
                shutil.copyfile(dump, keep)
            return total_instructions(dump)
    finally:
        server.terminate()
        try:
            server.wait(120)  # valgrind's exit takes a while on a busy machine
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def count_handle(tmp: Path, n: int) -> int:
    proc = subprocess.Popen(
        [*_VALGRIND, f"--callgrind-out-file={tmp}/cg.out.%p", sys.executable, "-c", _HANDLE_ONLY, str(n)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=dict(os.environ, PYTHONPATH=str(SRC), PYTHONHASHSEED="0"),
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdout.readline()  # ready
        before = set(tmp.glob("cg.out*"))
        control("-z", str(proc.pid))
        proc.stdin.write("go\n")
        proc.stdin.flush()
        proc.stdout.readline()  # done
        control("-d", str(proc.pid))
        return total_instructions(dumped(tmp, before))
    finally:
        proc.stdin.close()
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="requests counted (after 200 of warm-up)")
    parser.add_argument("--driver-poll-us", type=int, default=0,
                        help="our driver's spin before it sleeps (0: it sleeps at once)")
    parser.add_argument("--keep", type=Path, metavar="FILE",
                        help="keep the backend's callgrind dump here (for callgrind_annotate)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("needs valgrind (apt-get install valgrind)")
    with children_cleaned_up(), tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        backend = count_backend(tmp, args.n, args.driver_poll_us, args.keep)
        handle = count_handle(tmp, args.n)
    per_req, per_handle = backend / args.n, handle / args.n
    print(f"DescribePCR(0), {args.n} requests one at a time, nsm serve --poll-us 0, "
          f"driver spin {args.driver_poll_us} us")
    print(f"backend instructions per request: {per_req:,.0f}")
    print(f"handle() alone per request:       {per_handle:,.0f}")
    print(f"transport share (backend - handle): {per_req - per_handle:,.0f}")


if __name__ == "__main__":
    main()
