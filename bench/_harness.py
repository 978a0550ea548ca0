"""What the benchmarks share (not a test).

* Importing it puts this tree's ``src`` first on ``sys.path``: the benchmarks
  measure the code beside them, run as ``.venv/bin/python bench/NAME.py``.
* :func:`compare`: a tiny side-by-side rate harness. Each case is measured in
  alternating rounds with its baseline, so drift on a noisy machine hits both;
  the reported rate is the median over rounds.
* :func:`children_cleaned_up`: SIGINT and SIGTERM unwind the benchmark, and
  every process it started (backends, QEMU, in their own sessions) is stopped
  on the way out, whether it finished, failed or was interrupted.
* :func:`start_vsock_serve`: this tree's ``nsm vsock serve``, once it listens
  (bench_vsock.py and the VM tier's vsock test start it the same way).
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO, Any

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))


def src_env() -> dict[str, str]:
    """The environment for a child that runs this tree's code: its ``src`` first."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(":") if p and p != str(SRC)]
    return dict(os.environ, PYTHONPATH=":".join([str(SRC), *paths]))


def child_env(private: Path) -> dict[str, str]:
    """The environment for a child (``nsm serve``): this tree's ``src`` first, and the
    default state directory and CA inside ``private`` (never the user's own)."""
    return dict(src_env(), XDG_STATE_HOME=str(private / "xdg-state"),
                XDG_DATA_HOME=str(private / "xdg-data"))


#: The first line ``nsm vsock serve`` prints (also with ``-q``), once both sockets listen.
VSOCK_LISTENING = "vhost-user vsock backend listening on "


def start_vsock_serve(vhost: Path, cid: int, uds: Path, *extra: str,
                      stderr: int | IO[Any] | None = None) -> subprocess.Popen[str]:
    """Start this tree's ``nsm vsock serve -q`` (vhost-user socket ``vhost``, guest CID
    ``cid``, host side on ``uds``; ``extra`` arguments after those) and return it once it
    listens. Its stdout is a pipe, already read up to that first line. A backend that
    does not get that far is stopped and reaped, and RuntimeError says why."""
    from virtio_nsm._process import stop_process

    argv = [sys.executable, "-m", "virtio_nsm", "vsock", "serve", "-q", "--vhost-user", str(vhost),
            "--guest-cid", str(cid), "--uds-path", str(uds), *extra]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True, env=src_env())
    assert proc.stdout is not None
    first = proc.stdout.readline()
    if first.startswith(VSOCK_LISTENING):
        return proc
    code = stop_process(proc)
    err = ""
    with contextlib.suppress(subprocess.TimeoutExpired, OSError, ValueError):
        err = proc.communicate(timeout=5)[1] or ""
    raise RuntimeError(f"nsm vsock serve did not start (exit {code}): {(first + err).strip()}")


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` (from /proc; children first, then theirs)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_descendants(grace: float = 5.0) -> list[int]:
    """SIGTERM each process (and its process group) below us, SIGKILL what is left after
    ``grace`` s; returns the pids that had to be stopped."""
    pids = descendants(os.getpid())
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        time.sleep(0.05)
    for pid in pids + descendants(os.getpid()):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    return pids


@contextlib.contextmanager
def children_cleaned_up() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C; on the way out no child process is left running."""
    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        # a second signal must not stop the cleanup half-way
        for sig in old:
            signal.signal(sig, signal.SIG_IGN)
        left = stop_descendants()
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if left:
            print(f"(stopped {len(left)} leftover child process(es): {left})", file=sys.stderr)


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``fn`` over about ``seconds``."""
    n = 0
    batch = 1
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(batch):
            fn()
        n += batch
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)
        batch = min(batch * 2, 4096)


def compare(name: str, ours: Callable[[], object], baseline: Callable[[], object],
            baseline_name: str, rounds: int = 5, seconds: float = 0.4,
            target: float | None = None) -> float:
    """Print our rate beside the baseline's and return the ratio of medians."""
    ours_rates, base_rates = [], []
    for _ in range(rounds):
        ours_rates.append(rate(ours, seconds))
        base_rates.append(rate(baseline, seconds))
    o, b = statistics.median(ours_rates), statistics.median(base_rates)
    ratio = o / b
    verdict = "" if target is None else ("  target >= {:.0%}: {}".format(
        target, "met" if ratio >= target else "NOT met"))
    print(f"{name:<14} {o:>11,.0f}/s   {baseline_name:<34} {b:>11,.0f}/s   "
          f"ratio {ratio:6.1%}{verdict}")
    return ratio
