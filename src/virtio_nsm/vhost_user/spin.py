"""How long our driver spins on the used ring before it sleeps (pure logic: no I/O, no clock).

A driver that sleeps on the call eventfd after each request must be woken by the
backend's interrupt: an eventfd write, a trip through the scheduler and, on a VM whose
idle CPUs halt, an inter-processor interrupt and an exit to the hypervisor, ~20 µs of
CPU on each side here.  A driver that spins on the used ring instead finds a fast
answer by itself, and the backend need not write the call eventfd at all.  Spinning
costs this process's CPU, though, and is wasted on answers that take long (a durable
ExtendPCR waits for an ``fdatasync``) or that cannot come while we hold the CPU.

:class:`SpinWindow` sizes the spin as Linux's cpuidle *haltpoll* governor sizes its
poll before halting: one window, in nanoseconds, up to ``max_ns``:

* an answer found while spinning (a *hit*) keeps the window;
* an answer that came after the window (a *miss*) but within ``max_ns`` of the request
  grows it (doubling, from at least ``start_ns``): a longer spin would have caught it;
* an answer later than ``max_ns`` shrinks it by ``shrink`` (to 0 below ``start_ns``):
  no spin this side of the cap would have helped, so a slow request type (a durable
  ExtendPCR) stops the spinning within one or two requests;
* without a spin (window 0) an answer within ``max_ns`` opens the window again at
  ``start_ns``;
* ``max_misses`` misses in a row (the answer keeps coming only after we gave up, e.g.
  because the backend needs the CPU we spin on), or a spin that lost the CPU (the
  caller sees a gap in its clock), stop spinning for a back-off that doubles while it
  keeps happening (``backoff_min_ns`` to ``backoff_max_ns``) and is forgotten at the
  next hit.

Whether spinning pays at all depends on where the scheduler puts the two processes:
with a CPU each, a spinning driver saves both sides a wake-up; on one shared CPU (or
a busy machine) the spin only delays the backend it waits for.  So, as the backend's
own polling (:mod:`.polling`), spinning is measured, not assumed: *trials* alternate
blocks of ``block`` requests with the spin allowed and without, ``rounds`` times (in
the order with, without, without, with, with, ...: a drift during the trial favours
neither; and 24 requests a block, not the backend's 32, so that the backend's own
polling trials do not line up with ours), and compare the median *period* (from one
request to the next: what the caller sees);
the spin is kept for the next ``exploit`` requests only if it shortened the period
by ``1 - margin`` or more (a tie goes to sleeping, which costs no CPU), then a new
trial runs.  Requests further apart than ``stream_gap_ns`` are not back-to-back
traffic and are not samples.

The caller owns the clock and passes its readings in; tests drive a fake one.
"""

from __future__ import annotations

import statistics

__all__ = ["SpinWindow"]


class SpinWindow:
    """The adaptive spin window of a driver (see the module docstring); times in ns."""

    def __init__(
        self,
        *,
        max_ns: int = 100_000,
        start_ns: int = 25_000,
        shrink: int = 4,
        max_misses: int = 4,
        preempt_ns: int = 50_000,
        backoff_min_ns: int = 1_000_000,
        backoff_max_ns: int = 1_000_000_000,
        trials: bool = True,
        block: int = 24,
        rounds: int = 3,
        exploit: int = 4096,
        margin: float = 0.9,
        stream_gap_ns: int = 20_000_000,
    ) -> None:
        if not 0 < start_ns <= max_ns:
            raise ValueError(f"need 0 < start_ns <= max_ns, not {start_ns} and {max_ns}")
        if shrink < 2 or max_misses < 1 or preempt_ns <= 0 or not 0 < backoff_min_ns <= backoff_max_ns:
            raise ValueError("shrink >= 2, max_misses >= 1, preempt_ns > 0, 0 < backoff_min <= backoff_max")
        if block < 1 or rounds < 1 or exploit < 1 or not 0 < margin <= 1:
            raise ValueError("block, rounds and exploit >= 1, 0 < margin <= 1")
        self.max_ns, self.start_ns, self.shrink = max_ns, start_ns, shrink
        self.max_misses = max_misses
        #: A gap this long between two looks at the clock while spinning means the CPU
        #: was taken from us (the caller checks; see :meth:`preempted`).
        self.preempt_ns = preempt_ns
        self.backoff_min_ns, self.backoff_max_ns = backoff_min_ns, backoff_max_ns
        #: The current window (0: sleep at once).
        self.window_ns = start_ns
        #: Counters: answers found spinning, spins that ran out, back-offs.
        self.hits = 0
        self.misses = 0
        self.backoffs = 0
        self._misses_in_row = 0
        self._backoff_ns = 0
        self._backoff_until = 0
        self.trials = trials
        self.block, self.rounds, self.exploit, self.margin = block, rounds, exploit, margin
        self.stream_gap_ns = stream_gap_ns
        #: Whether the current trial block or decision allows spinning.
        self.allowed = True
        #: Trials decided, and how many kept the spin; median periods (ns) of the last.
        self.decisions = 0
        self.spin_won = 0
        self.last_medians: dict[bool, float] = {}
        self._last_start: int | None = None
        self._last_allowed = True
        self._samples: dict[bool, list[int]] = {True: [], False: []}
        self._in_trial = trials
        self._left = block
        self._block_index = 0

    def __repr__(self) -> str:
        return (f"<SpinWindow {self.window_ns // 1000}us allowed={self.allowed} hits={self.hits} "
                f"misses={self.misses} backoffs={self.backoffs} won={self.spin_won}/{self.decisions}>")

    def window(self, now: int) -> int:
        """How long to spin for a request published at ``now`` (0: sleep at once).

        Call it once per request: ``now`` also ends the previous request's period.
        """
        if self.trials:
            last, self._last_start = self._last_start, now
            if last is not None and 0 <= now - last <= self.stream_gap_ns:
                self._period(now - last)
            self._last_allowed = allowed = self.allowed
            if not allowed:
                return 0
        return self.window_ns if now >= self._backoff_until else 0

    def hit(self) -> None:
        """The spin found the answer (and kept the CPU)."""
        self.hits += 1
        self._misses_in_row = 0
        self._backoff_ns = 0

    def miss(self, now: int, waited_ns: int) -> None:
        """The spin ran out; the answer came ``waited_ns`` after the request (at ``now``)."""
        self.misses += 1
        if waited_ns <= self.max_ns:
            self.window_ns = min(self.max_ns, max(self.start_ns, 2 * self.window_ns))
        else:
            self._shrink()
        self._misses_in_row += 1
        if self._misses_in_row >= self.max_misses:
            self._back_off(now)

    def slept(self, waited_ns: int) -> None:
        """No spin (window 0 or backing off); the answer came ``waited_ns`` after the request."""
        if self.window_ns == 0 and waited_ns <= self.max_ns:
            self.window_ns = self.start_ns

    def preempted(self, now: int) -> None:
        """The spin lost the CPU (the caller stopped it and slept)."""
        self._back_off(now)

    def _period(self, period: int) -> None:
        """One period of back-to-back traffic, of a request sent with ``_last_allowed``."""
        self._left -= 1
        if not self._in_trial:
            if self._left <= 0:  # a new trial, starting with the spin allowed
                self._in_trial, self.allowed = True, True
                self._samples = {True: [], False: []}
                self._left, self._block_index = self.block, 0
            return
        self._samples[self._last_allowed].append(period)
        if self._left > 0:
            return
        index = self._block_index = self._block_index + 1
        if index < 2 * self.rounds:
            # Blocks 0, 1, 2, 3, ...: with, without, without, with, with, without, ...
            self.allowed = (index % 2 == 0) != (index // 2 % 2 == 1)
            self._left = self.block
            return
        self.decisions += 1
        medians = {mode: statistics.median(s) for mode, s in self._samples.items() if s}
        self.last_medians = medians
        spin, sleep = medians.get(True), medians.get(False)
        self.allowed = spin is not None and sleep is not None and spin < self.margin * sleep
        self.spin_won += self.allowed
        self._in_trial = False
        self._left = self.exploit

    def _shrink(self) -> None:
        window = self.window_ns // self.shrink
        self.window_ns = window if window >= self.start_ns else 0

    def _back_off(self, now: int) -> None:
        self.backoffs += 1
        self._misses_in_row = 0
        self._backoff_ns = min(max(2 * self._backoff_ns, self.backoff_min_ns), self.backoff_max_ns)
        self._backoff_until = now + self._backoff_ns
