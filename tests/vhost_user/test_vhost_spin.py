"""Our driver's adaptive spin on the used ring (``NsmFrontend``, ``SpinWindow``).

The adaptation is pure logic driven by a fake clock; the driver's handling of the
races around the end of a spin is checked against a real daemon (in a thread) with
a clock that ends the window exactly when the test wants: an answer published just
after the driver's last look must be found without an interrupt, and a slow backend
must be waited for, not lost.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from vhost_support import serve_in_thread, wait_for

from virtio_nsm.nsm.device import NsmDevice
from virtio_nsm.nsm.frontend import NsmFrontend
from virtio_nsm.nsm.protocol import DescribePCR, encode_request
from virtio_nsm.nsm.virtio import NsmVirtioDevice
from virtio_nsm.request import RequestToken
from virtio_nsm.vhost_user.spin import SpinWindow

REQUEST = encode_request(DescribePCR(0))
US = 1000


# -- the adaptation, with a fake clock ------------------------------------------------


def test_a_hit_keeps_the_window_and_misses_just_after_it_grow_it_to_the_cap() -> None:
    spin = SpinWindow(max_ns=100 * US, start_ns=25 * US, trials=False)
    assert spin.window(0) == 25 * US
    spin.hit()
    assert spin.window(1) == 25 * US
    spin.miss(2, 40 * US)  # the answer came 15 us after the spin gave up
    assert spin.window(3) == 50 * US
    spin.miss(4, 90 * US)
    assert spin.window(5) == 100 * US
    spin.miss(6, 100 * US)  # at the cap: no further
    assert spin.window(7) == 100 * US
    assert (spin.hits, spin.misses) == (1, 3)


def test_answers_slower_than_the_cap_stop_the_spinning_within_two_requests() -> None:
    # A durable ExtendPCR (an fdatasync, ~150 us and more) after fast requests.
    spin = SpinWindow(max_ns=100 * US, start_ns=25 * US, max_misses=10, trials=False)
    spin.miss(0, 60 * US)
    spin.miss(1, 90 * US)
    assert spin.window(2) == 100 * US
    spin.miss(3, 250 * US)
    assert spin.window(4) == 25 * US
    spin.miss(5, 180 * US)
    assert spin.window(6) == 0
    spin.slept(300 * US)  # still slow: no spin comes back
    assert spin.window(7) == 0
    spin.slept(30 * US)  # a fast answer again (a DescribePCR): spin again, from the start
    assert spin.window(8) == 25 * US


def test_misses_in_a_row_back_off_doubling_and_a_hit_forgets_the_back_offs() -> None:
    spin = SpinWindow(max_ns=100 * US, start_ns=25 * US, max_misses=3, trials=False,
                      backoff_min_ns=1_000 * US, backoff_max_ns=4_000 * US)
    now = 0
    for backoff in (1_000, 2_000, 4_000, 4_000):  # doubling up to the longest
        for _ in range(3):  # the answer always comes just after the window, never in it
            assert spin.window(now)
            spin.miss(now, 40 * US)
        assert spin.window(now + (backoff - 1) * US) == 0
        now += backoff * US
        assert spin.window(now) == 100 * US
    assert spin.backoffs == 4
    spin.miss(now, 40 * US)
    spin.hit()  # a hit forgets both the misses in a row and the back-offs
    for _ in range(2):
        spin.miss(now, 40 * US)
    assert spin.window(now) == 100 * US and spin.backoffs == 4
    spin.miss(now, 40 * US)
    assert spin.window(now + 999 * US) == 0 and spin.window(now + 1_000 * US) == 100 * US


def test_a_spin_that_lost_the_cpu_backs_off() -> None:
    spin = SpinWindow(backoff_min_ns=1_000 * US, trials=False)
    spin.preempted(10 * US)
    assert spin.window(500 * US) == 0 and spin.window(1_010 * US) == spin.start_ns
    assert spin.backoffs == 1
    spin.preempted(1_010 * US)
    assert spin.window(3_000 * US) == 0 and spin.window(3_010 * US) > 0


def _run(spin: SpinWindow, now: int, requests: int, period: Callable[[bool], int]) -> tuple[int, int]:
    """Send ``requests`` back to back, each taking ``period(spun)`` ns; the time at the end
    and how many were allowed to spin."""
    spun = 0
    for _ in range(requests):
        window = spin.window(now)
        spun += window > 0
        if window:
            spin.hit()
        now += period(window > 0)
    return now, spun


def test_trials_keep_the_spin_where_it_shortens_the_period() -> None:
    # A CPU each: a spinning driver is answered in 15 us, a sleeping one in 40 us.
    spin = SpinWindow(block=4, rounds=2, exploit=100)
    # The trial: blocks of 4 with, without, without, with; the 17th request ends the
    # last period (and spins: the trial's decision).
    modes = []
    now = 0
    for _ in range(17):
        modes.append(spin.window(now) > 0)
        now += 15 * US if modes[-1] else 40 * US
    assert modes == [True] * 4 + [False] * 8 + [True] * 4 + [True]
    assert spin.decisions == 1 and spin.spin_won == 1 and spin.allowed
    assert spin.last_medians == {True: 15 * US, False: 40 * US}
    _now, spun = _run(spin, now, 99, lambda spun: 15 * US if spun else 40 * US)
    assert spun == 99  # kept for the exploit phase


def test_trials_stop_a_spin_that_does_not_pay_and_try_again_later() -> None:
    # One CPU for both: the spin only delays the backend (30 us against 22).
    spin = SpinWindow(block=4, rounds=2, exploit=50)
    now, spun = _run(spin, 0, 17, lambda spun: 30 * US if spun else 22 * US)
    assert spun == 8 and spin.decisions == 1 and spin.spin_won == 0 and not spin.allowed
    now, spun = _run(spin, now, 49, lambda spun: 30 * US if spun else 22 * US)
    assert spun == 0  # the exploit phase sleeps at once
    # Then a new trial; meanwhile the scheduler gave each its own CPU: spinning wins.
    now, spun = _run(spin, now, 17, lambda spun: 12 * US if spun else 40 * US)
    assert spin.decisions == 2 and spin.spin_won == 1 and spin.allowed
    # A spin that wins by less than 10 % is not worth its CPU either.
    _run(spin, now, 50 + 16, lambda spun: 19 * US if spun else 20 * US)
    assert spin.decisions == 3 and spin.spin_won == 1 and not spin.allowed


def test_requests_far_apart_are_not_samples_of_a_trial() -> None:
    spin = SpinWindow(block=2, rounds=1, stream_gap_ns=1_000 * US)
    _run(spin, 0, 20, lambda spun: 5_000 * US)  # one every 5 ms: not back-to-back
    assert spin.decisions == 0 and spin.allowed


@pytest.mark.parametrize("kwargs", [
    {"start_ns": 0}, {"start_ns": 200_000, "max_ns": 100_000}, {"shrink": 1}, {"max_misses": 0},
    {"preempt_ns": 0}, {"backoff_min_ns": 2, "backoff_max_ns": 1}, {"block": 0}, {"margin": 0},
])
def test_nonsense_settings_are_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        SpinWindow(**kwargs)


# -- the driver against a real daemon ---------------------------------------------------


class _Handler:
    """The NSM's answers, optionally slowed down, with a count of requests."""

    def __init__(self, delay: float = 0.0) -> None:
        self.device = NsmDevice()
        self.delay = delay
        self.calls = 0
        #: If set, each request waits for this event (then clears it).
        self.gate: threading.Event | None = None

    def __call__(self, request: bytes, token: RequestToken | None = None, **kw: Any) -> bytes:
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if self.gate is not None:
            assert self.gate.wait(20), "the test never opened the gate"
            self.gate.clear()
        return self.device.handle(request, **kw)


@contextmanager
def _backend(tmp_path: Path, handler: _Handler) -> Iterator[Any]:
    with serve_in_thread(tmp_path / "nsm.sock", NsmVirtioDevice(handler), poll_us=0) as running:
        yield running


class _WindowEndsAfterTheAnswer:
    """A clock for the driver's spin: its readings advance 1 us per call, except that
    the call on which the spin has looked ``looks`` times lets the backend answer
    (``gate``), waits until it has published the answer and finished its pass, then
    jumps past any window: the answer lands just after the driver's last look at the
    used ring.  ``jump``: 40 us (past the 25 us window, a gap too short to mean that
    the CPU was lost) or 1 s (a spin that lost the CPU)."""

    def __init__(self, gate: threading.Event, published: Callable[[], bool], looks: int, jump: int) -> None:
        self.gate, self.published, self.looks, self.jump = gate, published, looks, jump
        self.now = time.perf_counter_ns()
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        # Call 1 is the request's timestamp, call 2 starts the spin (after the kick),
        # call 2 + k ends the spin's k-th look.
        if self.calls == 2 + self.looks:
            assert not self.published()
            self.gate.set()
            wait_for(self.published, "the backend's answer")
            time.sleep(0.05)  # the rest of its pass: the interrupt decision
            self.now += self.jump
        self.now += US
        return self.now


@pytest.mark.parametrize("event_idx", [True, False])
@pytest.mark.parametrize("looks", [1, 3])
@pytest.mark.parametrize("jump", [40 * US, 10**9])
def test_an_answer_right_at_the_end_of_the_window_is_found_without_an_interrupt(
    tmp_path: Path, event_idx: bool, looks: int, jump: int
) -> None:
    handler = _Handler()
    with _backend(tmp_path, handler) as running, NsmFrontend(
        running.path, timeout=5, event_idx=event_idx
    ) as fe:
        expected = NsmDevice().handle(REQUEST)
        fe.spin = None  # no spin: this exchange waits for (and consumes) its interrupt
        assert fe.exchange(REQUEST) == expected
        backend = running.daemon.backend
        time.sleep(0.05)  # the end of the backend's pass
        interrupts = backend.interrupts
        assert interrupts == 1
        used_before = fe.queue.used_idx
        handler.gate = threading.Event()
        clock = _WindowEndsAfterTheAnswer(
            handler.gate, lambda: fe.queue.used_idx == (used_before + 2) & 0xFFFF, looks, jump
        )
        fe.clock = clock
        # The backend answers while the driver spins but asked for no interrupt, after
        # its last look: the driver asks for one, looks again and finds the answer.
        # Without that second look it would wait for an interrupt that never comes.
        fe.spin = spin = SpinWindow()  # the first request's spin may have closed the window
        assert fe.exchange(REQUEST) == expected
        assert clock.calls >= 2 + looks
        assert backend.interrupts == interrupts  # no interrupt was sent for it
        # The window ran out (a miss), or the spin lost the CPU (a back-off).
        assert (spin.hits, spin.misses, spin.backoffs) == ((0, 1, 0) if jump < 50 * US else (0, 0, 1))
        fe.clock, handler.gate = time.perf_counter_ns, None
        for _ in range(20):  # and the ring goes on as before
            assert fe.exchange(REQUEST) == expected
        assert handler.calls == 22


@pytest.mark.parametrize("event_idx", [True, False])
def test_a_slow_backend_is_waited_for_and_stops_the_spinning(tmp_path: Path, event_idx: bool) -> None:
    handler = _Handler(delay=0.003)  # far beyond the 100 us cap
    with _backend(tmp_path, handler) as running, NsmFrontend(
        running.path, timeout=5, event_idx=event_idx
    ) as fe:
        assert fe.spin is not None
        expected = NsmDevice().handle(REQUEST)
        for _ in range(10):
            assert fe.exchange(REQUEST) == expected
        # The first spin (25 us) missed by milliseconds: the window closed for good.
        assert fe.spin.window_ns == 0, fe.spin
        assert fe.spin.misses == 1 and fe.spin.hits == 0, fe.spin
        assert running.daemon.backend.interrupts >= 10, running.daemon.backend.interrupts


def test_a_spin_that_loses_the_cpu_sleeps_at_once_and_backs_off(tmp_path: Path) -> None:
    handler = _Handler(delay=0.002)  # no answer while the driver spins
    with _backend(tmp_path, handler) as running, NsmFrontend(running.path, timeout=5) as fe:
        assert fe.spin is not None
        readings = iter([0, 1 * US, 2 * US, 3 * US, 900 * US])  # a 897 us gap on the third look
        fe.clock = lambda: next(readings, 1_000 * US)
        assert fe.exchange(REQUEST)
        assert fe.spin.backoffs == 1 and fe.spin.misses == 0
        assert fe.spin.window(1_000 * US) == 0  # backing off: the next request sleeps at once
        fe.clock = lambda: 1_000 * US
        assert fe.exchange(REQUEST)
        assert (fe.spin.hits, fe.spin.misses, fe.spin.backoffs) == (0, 0, 1)


def test_poll_us_zero_never_spins_and_a_fixed_spin_stays_fixed(tmp_path: Path) -> None:
    handler = _Handler()
    with _backend(tmp_path, handler) as running:
        with NsmFrontend(running.path, timeout=5, poll_us=0) as fe:
            assert fe.spin is None and fe.poll_ns == 0
            fe.clock = lambda: pytest.fail("a driver that never spins reads no clock")  # type: ignore[assignment,return-value]
            for _ in range(5):
                assert fe.exchange(REQUEST)
            # Every answer was an interrupt, the last one still pending on the call fd.
            assert os.eventfd_read(fe.call_fd) >= 1
        with NsmFrontend(running.path, timeout=5, poll_us=7) as fe:
            assert fe.spin is None and fe.poll_ns == 7_000
            for _ in range(5):
                assert fe.exchange(REQUEST)


def test_spinning_exchanges_leave_no_interrupt_suppressed_for_a_hand_driven_ring(tmp_path: Path) -> None:
    handler = _Handler()
    with _backend(tmp_path, handler) as running, NsmFrontend(
        running.path, timeout=5, event_idx=False, poll_us=2_000_000
    ) as fe:
        assert fe.exchange(REQUEST)  # leaves VIRTQ_AVAIL_F_NO_INTERRUPT set
        queue = fe.queue
        req, resp = queue.add_pair(fe.buffers, len(REQUEST), fe.buffers + 0x1000, 0x3000)
        fe.memory.write(fe.buffers, REQUEST)
        handler.delay = 0.05  # answered after wait_used() has gone to sleep
        if queue.publish():
            fe.kick()
        used = fe.wait_used(2)
        assert [head for head, _ in used] == [req, resp]
