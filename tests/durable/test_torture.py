"""Torture: SIGKILL a real ``nsm serve --state-dir`` over and over while our frontend streams PCR changes.

The driver sends ExtendPCR / LockPCR requests, mostly one at a time (as Linux's
nsm.ko does), sometimes in pipelined bursts of up to 8, through :meth:`NsmFrontend.exchange_surviving`, which reconnects to
each restarted backend with the same guest memory, ring and inflight region.  A
killer thread SIGKILLs the backend a random time after it starts listening and
starts the next one on the same state directory.

What must hold, for every request, whatever the kill point (while idle, while
reading the ring, in the middle of the state file's write/fsync/rename, between
the commit and the used ring):

* its answer is exactly the model's: an ExtendPCR answer carries the new PCR
  value, so a request applied twice (or not at all) shows at once;
* after each restart, DescribePCR of every PCR 16..31 equals the model: the hash
  chain of exactly the acknowledged requests; locked PCRs stay locked.

Seeded (``TORTURE_SEED``); ``TORTURE_KILLS`` sets the number of kills (default 500).
Marked ``slow``: ``./run test`` (and CI) runs it, a quick local run skips it with
``-m "not vm and not slow"``.
The kill points are random in time, so which windows are hit varies from run to
run; the invariants do not.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from durable_support import Backend, PcrModel

from virtio_nsm._process import stop_process
from virtio_nsm.nsm.frontend import NsmFrontend
from virtio_nsm.nsm.protocol import DescribePCR, decode_response, encode_request

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("TORTURE_SEED", "20261125"))
KILLS = int(os.environ.get("TORTURE_KILLS", "500"))
#: A backend is killed up to this long after it starts listening.
MAX_LIFE = 0.06


class Killer(threading.Thread):
    """Starts backends and SIGKILLs each one a random time after it listens.

    The backends it starts die with this thread (see :class:`Backend`), so it stays
    alive until :meth:`finish` has stopped the last one.
    """

    def __init__(self, state_dir: Path, sock: Path, log: Path, rng: random.Random, kills: int) -> None:
        super().__init__(daemon=True)
        self.state_dir, self.sock, self.rng, self.kills = state_dir, sock, rng, kills
        self.log = open(log, "ab")  # noqa: SIM115 - closed in finish()
        self.done = threading.Event()
        self._finishing = threading.Event()
        self.error: str | None = None
        self.killed = 0
        self.code: int | None = None
        self.backend = self._start()

    def _start(self) -> Backend:
        backend = Backend(self.state_dir, self.sock, self.log)
        if not backend.wait_listening():
            backend.proc.wait(30)
            self.error = f"backend {self.killed + 1} did not start (exit {backend.proc.returncode}); see the log"
            self.done.set()
        return backend

    def run(self) -> None:
        try:
            while self.killed < self.kills and self.error is None:
                self.done.wait(self.rng.uniform(0, MAX_LIFE))
                if self.done.is_set():
                    return
                self.backend.kill()
                self.killed += 1
                self.backend = self._start()
        finally:
            self.done.set()
            # The last backend serves the final checks; it is stopped from here.
            self._finishing.wait()
            self.code = self.backend.terminate()

    def finish(self) -> int | None:
        """Stop the last backend (SIGTERM); its exit code (None if it could not be stopped)."""
        self.done.set()
        self._finishing.set()
        if self.ident is None:  # never started: the first backend is the main thread's
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.code = self.backend.terminate()
        else:
            self.join(90)
        if self.is_alive() or self.code is None:
            # whatever happened, leave no backend behind (its pipe is the killer thread's)
            stop_process(self.backend.proc, sig=signal.SIGKILL)
        self.log.close()
        return self.code


def test_sigkill_torture(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    state_dir, sock, log = tmp_path / "state", tmp_path / "nsm.sock", tmp_path / "backends.log"
    model = PcrModel()
    killer = Killer(state_dir, sock, log, random.Random(rng.random()), KILLS)
    frontend: NsmFrontend | None = None
    sent = 0
    restarts_seen = 0
    try:
        assert killer.error is None, killer.error
        frontend = NsmFrontend(sock, inflight=True, timeout=30)
        killer.start()
        assert frontend.inflight
        while not killer.done.is_set():
            # Mostly one request at a time (nsm.ko), sometimes a pipelined burst.
            burst = 1 if rng.random() < 0.8 else rng.randint(2, 8)
            whats, requests, expectations = [], [], []
            for _ in range(burst):
                index = rng.randint(model.FIRST, model.LAST)
                if rng.random() < 0.005:
                    whats.append(f"LockPCR({index})")
                    request, expected = model.lock(index)
                else:
                    data = rng.randbytes(rng.randint(0, 64))
                    whats.append(f"ExtendPCR({index}, {data.hex()})")
                    request, expected = model.extend(index, data)
                requests.append(request)
                expectations.append(expected)
            answers = frontend.exchange_surviving(requests, reconnect_timeout=30)
            for what, answer, expected in zip(whats, answers, expectations, strict=True):
                sent += 1
                assert answer == expected, (
                    f"request {sent} {what}: answer {show(answer)}, the acknowledged chain says "
                    f"{show(expected)} (after {frontend.reconnects} reconnects)"
                )
            if frontend.reconnects != restarts_seen:
                restarts_seen = frontend.reconnects
                check_all_pcrs(frontend, model, f"after request {sent} and reconnect {restarts_seen}")
        assert killer.error is None, f"{killer.error}\n{log.read_text(errors='replace')[-3000:]}"
        check_all_pcrs(frontend, model, "at the end")
    finally:
        code = killer.finish()
        if frontend is not None:
            frontend.close()
    assert code == 0
    assert killer.killed >= KILLS
    assert frontend is not None
    backend_log = log.read_text(errors="replace")
    replays = backend_log.count("answered from the record")
    resubmissions = backend_log.count("resubmitting inflight chains")
    print(f"\n{sent} requests, {killer.killed} kills, {frontend.reconnects} reconnects, "
          f"{resubmissions} resubmissions, {replays} answered from the record")


def show(answer: bytes) -> str:
    decoded = decode_response(answer)
    data = getattr(decoded, "data", None)
    return f"{type(decoded).__name__}({data.hex()})" if isinstance(data, bytes) else repr(decoded)


def check_all_pcrs(frontend: NsmFrontend, model: PcrModel, when: str) -> None:
    requests = [encode_request(DescribePCR(i)) for i in model.values]
    answers = frontend.exchange_surviving(requests, reconnect_timeout=30)
    for (index, value), answer in zip(model.values.items(), answers, strict=True):
        described = decode_response(answer)
        assert getattr(described, "data", None) == value, (
            f"{when}: PCR{index} is {described!r}, the acknowledged chain gives {value.hex()}"
        )
        assert described.lock == (index in model.locked), (  # type: ignore[union-attr]
            f"{when}: PCR{index} lock is {described.lock}, expected {index in model.locked}"  # type: ignore[union-attr]
        )
