"""When the daemon may poll its rings: the adaptive policy (pure logic, no I/O, no clock).

Polling the available ring after an answer saves the next request the trip through
a kick (a VM exit, an eventfd, a wake-up), but the spinning thread takes a CPU that
the guest's vCPU thread and QEMU's main loop may need to bring that request, which
on a small or shared host can make things slower, not faster.  So whether to poll
is measured, not assumed.  The quantity that polling is meant to shorten is the
*period* of back-to-back traffic: from the end of one answer to the end of the
next (the guest's and QEMU's time, how long we take to notice, and our work; where
in it we lose the CPU does not matter).  :class:`PollPolicy` runs *trials*: blocks
of ``block`` answers with polling allowed, then without, alternating ``rounds``
times; it then keeps the mode whose median period was lower (polling must win by
``margin``: a tie goes to not polling, which costs no CPU) for the next
``exploit`` answers, and runs a new trial.  Answers further apart than
``stream_gap_ns`` are not back-to-back traffic and are not samples.

Independently, a spin that lost the CPU (the caller measures it) backs polling off
for a while, doubling while it keeps happening: that reacts within one window
instead of one trial.
"""

from __future__ import annotations

import logging
import statistics

__all__ = ["PollPolicy"]

log = logging.getLogger("virtio_nsm.vhost_user")


class PollPolicy:
    """Decides whether a polling window may open (see the module docstring)."""

    def __init__(
        self,
        poll_us: int,
        *,
        adaptive: bool = True,
        block: int = 32,
        rounds: int = 3,
        exploit: int = 4096,
        margin: float = 0.9,
        stream_gap_ns: int = 20_000_000,
        backoff_min_ns: int = 1_000_000,
        backoff_max_ns: int = 1_000_000_000,
    ) -> None:
        if poll_us < 0:
            raise ValueError("poll_us must be >= 0")
        self.window_ns = poll_us * 1000
        self.adaptive = adaptive
        self.block, self.rounds, self.exploit = block, rounds, exploit
        self.margin = margin
        self.stream_gap_ns = stream_gap_ns
        self.backoff_min_ns, self.backoff_max_ns = backoff_min_ns, backoff_max_ns
        #: Whether the current trial block or decision allows polling.
        self.allowed = poll_us > 0
        #: Counters: trials decided, trials polling won, back-offs.
        self.trials = 0
        self.polling_won = 0
        self.backoffs = 0
        #: Median periods (ns) of the last trial: {polling allowed: median}.
        self.last_medians: dict[bool, float] = {}
        self._backoff_ns = 0
        self._backoff_until = 0
        self._last_end: int | None = None
        self._samples: dict[bool, list[int]] = {True: [], False: []}
        self._in_trial = False
        self._left = 0  # answers left in the current block, or of the exploit phase
        self._blocks_left = 0
        if self.allowed and adaptive:
            self._start_trial()

    def __repr__(self) -> str:
        phase = "trial" if self._in_trial else "decided"
        return (f"<PollPolicy window={self.window_ns // 1000}us allowed={self.allowed} "
                f"{phase} won={self.polling_won}/{self.trials} backoffs={self.backoffs}>")

    def may_poll(self, now: int) -> bool:
        """Whether a polling window may open (or stay open) at ``now`` (ns)."""
        return self.allowed and now >= self._backoff_until

    def preempted(self, now: int) -> None:
        """The spin lost the CPU: stop polling for a while."""
        self.backoffs += 1
        self._backoff_ns = min(max(2 * self._backoff_ns, self.backoff_min_ns), self.backoff_max_ns)
        self._backoff_until = now + self._backoff_ns

    def undisturbed(self) -> None:
        """A window ended without losing the CPU: forget earlier back-offs."""
        self._backoff_ns = 0

    def answered(self, start: int, end: int) -> None:
        """A pass that started at ``start`` answered requests and ended at ``end`` (ns)."""
        last, self._last_end = self._last_end, end
        if not self.adaptive or self.window_ns == 0 or last is None:
            return
        period = end - last
        if not 0 <= period <= self.stream_gap_ns:
            return
        self._left -= 1
        if not self._in_trial:
            if self._left <= 0:
                self._start_trial()
            return
        self._samples[self.allowed].append(period)
        if self._left > 0:
            return
        self._blocks_left -= 1
        if self._blocks_left > 0:
            self.allowed = not self.allowed
            self._left = self.block
            return
        self._decide()

    def _start_trial(self) -> None:
        self._in_trial = True
        self._samples = {True: [], False: []}
        self.allowed = True
        self._left = self.block
        self._blocks_left = 2 * self.rounds

    def _decide(self) -> None:
        self.trials += 1
        medians = {mode: statistics.median(s) for mode, s in self._samples.items() if s}
        self.last_medians = medians
        poll, wait = medians.get(True), medians.get(False)
        self.allowed = poll is not None and wait is not None and poll < self.margin * wait
        self.polling_won += self.allowed
        log.debug(
            "polling trial %d: median period %s us polling, %s us waiting for kicks: %s",
            self.trials,
            "?" if poll is None else f"{poll / 1000:.1f}",
            "?" if wait is None else f"{wait / 1000:.1f}",
            "poll" if self.allowed else "wait for kicks",
        )
        self._in_trial = False
        self._left = self.exploit
