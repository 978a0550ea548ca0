"""Exactly once across a backend crash, at chosen crash points (in-process daemons).

A "crash" is a BaseException raised from the handler: it unwinds through the
worker and the daemon's loop (which only survive ``Exception``) without
publishing anything, like SIGKILL at that instant, except that this process
stays alive to start the successor on the same state directory and socket.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from durable_support import PcrModel

from virtio_nsm.durable import DurableNsm
from virtio_nsm.nsm.frontend import NsmFrontend
from virtio_nsm.nsm.protocol import DescribePCR, decode_response, encode_request
from virtio_nsm.nsm.virtio import NsmVirtioDevice
from virtio_nsm.vhost_user.daemon import VhostUserDaemon


class Crash(BaseException):
    """The backend dies here."""


@dataclass
class Life:
    """One backend life: a DurableNsm on the state dir, a daemon serving it from a thread."""

    nsm: DurableNsm
    daemon: VhostUserDaemon
    thread: threading.Thread
    crashed: threading.Event = field(default_factory=threading.Event)


class Backends:
    def __init__(self, tmp_path: Path) -> None:
        self.state_dir = tmp_path / "state"
        self.sock = tmp_path / "nsm.sock"
        self.crash: Callable[[bytes, bool], None] | None = None
        self.lives: list[Life] = []

    def start(self) -> Life:
        nsm = DurableNsm.open(self.state_dir)

        def handler(request: bytes, token: object = None, *, max_response: int | None = None) -> bytes:
            if self.crash is not None:
                self.crash(request, False)
            response = nsm.handle(request, token, max_response=max_response)  # type: ignore[arg-type]
            if self.crash is not None:
                self.crash(request, True)
            return response

        daemon = VhostUserDaemon(self.sock, NsmVirtioDevice(handler, device_state=nsm), message_timeout=5.0)
        daemon.bind()
        life = Life(nsm, daemon, threading.Thread(target=lambda: None))

        def serve() -> None:
            try:
                daemon.serve_forever()
            except Crash:
                life.crashed.set()

        life.thread = threading.Thread(target=serve, daemon=True)
        life.thread.start()
        self.lives.append(life)
        return life

    def restart_after_crash(self) -> threading.Thread:
        """In the background: once the current life crashed, release it and start the next."""
        dying = self.lives[-1]

        def restart() -> None:
            dying.crashed.wait(30)
            dying.daemon.close()  # the frontend sees the hang-up
            dying.nsm.close()  # the lock, as the kernel drops it for a dead process
            self.crash = None
            self.start()

        thread = threading.Thread(target=restart, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        for life in self.lives:
            if life.crashed.is_set():
                continue  # already released by restart_after_crash
            life.daemon.stop()
            life.thread.join(10)
            life.daemon.close()
            life.nsm.close()


@pytest.fixture
def backends(tmp_path: Path) -> Iterator[Backends]:
    b = Backends(tmp_path)
    b.start()
    yield b
    b.stop()


def crash_on_extend(after_apply: bool) -> Callable[[bytes, bool], None]:
    def crash(request: bytes, applied: bool) -> None:
        if applied == after_apply and b"ExtendPCR" in request:
            raise Crash
    return crash


@pytest.mark.parametrize("after_apply", [True, False], ids=["applied-not-answered", "not-applied"])
def test_request_in_flight_during_a_crash_is_applied_once(backends: Backends, after_apply: bool) -> None:
    model = PcrModel()
    with NsmFrontend(backends.sock, inflight=True, timeout=30) as frontend:
        request, expected = model.extend(16, b"first")
        assert frontend.exchange(request) == expected

        backends.crash = crash_on_extend(after_apply)
        restarter = backends.restart_after_crash()
        request, expected = model.extend(16, b"second")
        assert frontend.exchange_surviving([request]) == [expected]
        restarter.join(30)
        assert frontend.reconnects == 1

        first, second = backends.lives
        assert first.crashed.is_set()
        # Applied by the dead backend: answered from its durable record, not applied again.
        assert second.nsm.replayed == (1 if after_apply else 0)
        (answer,) = frontend.exchange_surviving([encode_request(DescribePCR(16))])
        assert decode_response(answer).data == model.values[16]  # type: ignore[union-attr]
        # And the device goes on from there.
        request, expected = model.extend(16, b"third")
        assert frontend.exchange(request) == expected


def test_new_request_reusing_the_head_is_not_mistaken_for_a_replay(backends: Backends) -> None:
    # Same bytes, same descriptor heads (the driver reuses freed slots): the inflight
    # counter tells them apart, so the second one is applied, not answered from the record.
    model = PcrModel()
    with NsmFrontend(backends.sock, inflight=True, timeout=30) as frontend:
        heads = []
        for _ in range(4):
            request, expected = model.extend(17, b"same")
            assert frontend.exchange(request) == expected
            record = backends.lives[0].nsm.store.snapshot.last  # type: ignore[union-attr]
            assert record is not None
            heads.append(record.token.head)
            # A read in between: the driver's free list brings the same head back next time.
            frontend.exchange(encode_request(DescribePCR(17)))
    assert len(set(heads)) < len(heads)  # the scenario did reuse a head
    assert backends.lives[0].nsm.replayed == 0


def test_new_inflight_region_after_reset_gets_new_tokens(backends: Backends) -> None:
    # A new frontend (a rebooted VM) gets a new region: its counters start elsewhere,
    # so its first request cannot match the record left by the previous one.
    model = PcrModel()
    tokens = []
    for _ in range(2):
        with NsmFrontend(backends.sock, inflight=True, timeout=30) as frontend:
            request, expected = model.extend(18, b"boot measurement")
            assert frontend.exchange(request) == expected
            record = backends.lives[0].nsm.store.snapshot.last  # type: ignore[union-attr]
            assert record is not None
            tokens.append(record.token)
    assert tokens[0] != tokens[1]
    assert backends.lives[0].nsm.replayed == 0


def test_without_inflight_region_no_token_reaches_the_device(backends: Backends) -> None:
    model = PcrModel()
    with NsmFrontend(backends.sock, timeout=30) as frontend:
        assert not frontend.inflight
        request, expected = model.extend(19, b"x")
        assert frontend.exchange(request) == expected
    record = backends.lives[0].nsm.store.snapshot.last  # type: ignore[union-attr]
    assert record is None
