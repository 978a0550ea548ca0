"""The NSM over vhost-user from the driver's side: Linux's ``nsm.ko`` in Python.

:class:`NsmFrontend` is a :class:`~virtio_nsm.vhost_user.frontend.VhostUserFrontend`
(the generic vhost-user driver control plane: negotiation, guest memory, rings,
reconnects, inflight region, device state) that sends NSM requests on queue 0
as Linux's ``nsm.ko`` does: the request in one device-readable descriptor of its
real length (at most 0x1000 bytes), a separate device-writable chain of exactly
0x3000 bytes, one kick.  The used ring is validated: each request chain must
come back with length 0 before its response chain, whose length must fit the
buffer.  :meth:`NsmFrontend.exchange_many` pipelines a burst: rounds of
requests, each queued before one kick, several rounds in flight so that driver
and device work at the same time (with EVENT_IDX the driver asks for one
interrupt per round).

Surviving a backend crash (``inflight=True``): :meth:`NsmFrontend.exchange_surviving`
reconnects to a restarted backend (:meth:`~virtio_nsm.vhost_user.frontend.VhostUserFrontend.reconnect`),
which finds the requests in flight in the inflight region and serves them; their
answers are collected as if nothing had happened.

:class:`VhostUserTransport` is the client transport (``--device vhost-user:SOCK``).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import ErrorCode, NsmError
from ..vhost_user.frontend import BackendDisconnected, VhostUserError, VhostUserFrontend
from ..vhost_user.spin import SpinWindow
from ..virtio.memory import VirtioError
from .protocol import MAX_REQUEST_SIZE, MAX_RESPONSE_SIZE

__all__ = ["RESPONSE_BUFFER_SIZE", "NsmFrontend", "VhostUserTransport"]

#: Linux's nsm.ko always offers a response buffer of exactly this size.
RESPONSE_BUFFER_SIZE = MAX_RESPONSE_SIZE

_SLOT = MAX_REQUEST_SIZE + RESPONSE_BUFFER_SIZE
#: Rounds of a burst kept in flight at once (each at most 1/(2*_ROUNDS) of the ring).
_ROUNDS = 4


@dataclass(frozen=True, slots=True)
class _Pair:
    req_head: int
    resp_head: int
    resp_addr: int
    slot: int


class NsmFrontend(VhostUserFrontend):
    """Drive a vhost-user NSM backend through a real split virtqueue.

    Options as for :class:`~virtio_nsm.vhost_user.frontend.VhostUserFrontend`; one
    queue, and one request/response buffer pair per two descriptors.  ``poll_us``:
    how long :meth:`exchange` spins on the used ring before it sleeps until the
    interrupt (default None: an adaptive window of at most 100 µs; N: N µs; 0: no spin).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        queue_size: int = 64,
        timeout: float = 120.0,
        event_idx: bool = True,
        indirect: bool = True,
        status: bool = True,
        inflight: bool = False,
        start: bool = True,
        poll_us: int | None = None,
    ) -> None:
        if poll_us is not None and poll_us < 0:
            raise ValueError(f"poll_us must be >= 0, not {poll_us}")
        #: The adaptive spin of :meth:`exchange` (``poll_us=None``, the default), else None.
        self.spin: SpinWindow | None = SpinWindow() if poll_us is None else None
        #: A fixed spin of :meth:`exchange` in nanoseconds (``poll_us=N``; 0: none).
        self.poll_ns = 0 if poll_us is None else poll_us * 1000
        #: The clock of the spin (nanoseconds; replaceable for tests).
        self.clock: Callable[[], int] = time.perf_counter_ns
        self._init_slots(queue_size)
        super().__init__(
            path,
            num_queues=1,
            queue_size=queue_size,
            buffer_size=(queue_size // 2) * _SLOT,
            timeout=timeout,
            event_idx=event_idx,
            indirect=indirect,
            status=status,
            inflight=inflight,
            start=start,
        )

    def _init_slots(self, queue_size: int) -> None:
        self._free_slots = list(range(queue_size // 2 - 1, -1, -1))
        # head -> (arrival order, used length) of each use of that head not yet
        # consumed, oldest first. A head is freed for reuse as soon as its used
        # entry is collected, which can be before the batch that owns it is
        # completed, so a later batch's entry for the same head may arrive first.
        self._done: dict[int, deque[tuple[int, int]]] = {}
        self._seq = 0

    def exchange(self, request: bytes) -> bytes:
        """Send one NSM request and return the device's CBOR response.

        With nothing else in flight (the usual case) this takes a short path: one
        pair on the ring, one kick, the same checks on the used ring as
        :meth:`exchange_many` (which serves the other cases).

        Before it sleeps until the interrupt, it spins on the used ring for a while,
        the interrupt not asked for meanwhile: a backend that answers in time then
        makes no system call for it, nor do we, and neither side pays a wake-up
        (~20 µs of CPU each on a VM whose idle CPUs halt).  By default
        (``poll_us=None``) the window adapts (:class:`~virtio_nsm.vhost_user.spin.SpinWindow`:
        at most 100 µs, it grows while answers come just after it and shrinks to
        nothing for slow answers, e.g. a durable ExtendPCR, and backs off when the
        spin loses the CPU or keeps missing), and short trials keep the spin only
        while it shortens the time from one request to the next by 10 % or more
        (it does not when both sides share one CPU); ``poll_us=N`` spins up to N µs
        every time, ``poll_us=0`` never.  The spin burns this process's CPU: see
        README, Benchmarks.

        When the spin ends without the answer, the interrupt is asked for and the used
        ring looked at once more before we sleep (an answer published in between,
        which saw no request for an interrupt, is found there), so no answer is ever
        waited for in vain.
        """
        queue = self.queue
        if self._done or queue.in_flight or not self._free_slots:
            return self.exchange_many([request])[0]
        if len(request) > MAX_REQUEST_SIZE:
            raise NsmError(
                ErrorCode.InputTooLarge,
                f"request of {len(request)} bytes exceeds {MAX_REQUEST_SIZE:#x} bytes",
            )
        slot = self._free_slots.pop()
        base = self.buffers + slot * _SLOT
        memory = self.memory
        memory.write(base, request)
        resp_addr = base + MAX_REQUEST_SIZE
        req_head, _ = queue.add_pair(base, len(request), resp_addr, RESPONSE_BUFFER_SIZE)
        adaptive, clock = self.spin, self.clock
        start = 0
        if adaptive is not None:
            start = clock()
            spin = adaptive.window(start)
        else:
            spin = self.poll_ns
        if spin:
            queue.suppress_interrupts()
        else:
            # Ask for the interrupt before the chains are visible: a device that sees
            # them sees this too, so the first wait needs no look at the used ring first.
            queue.request_interrupt_after(2)
        if queue.publish():
            self.kick()
        # Only our two chains are in flight, so collect_used can return nothing else.
        used: list[tuple[int, int]] = []
        wait, timeout, call_fd = self._poller.poll, self.timeout, self.call_fds[0]
        found = lost = False
        try:
            if spin:
                now = clock()  # after the kick, which may lose us the CPU (not spinning)
                deadline = now + spin
                moved = queue.used_moved
                gap = adaptive.preempt_ns if adaptive is not None else 1 << 62
                while True:
                    if moved():
                        used += queue.collect_used()
                        if len(used) >= 2:
                            found = True
                            break
                    before, now = now, clock()
                    if now >= deadline or now - before > gap:
                        lost = now - before > gap
                        # Ask for the interrupt, then look again: an answer published
                        # before the device could see the request is found here.
                        queue.request_interrupt_after(2 - len(used))
                        used += queue.collect_used()
                        break
            while len(used) < 2:
                events = wait(timeout)  # wait_interrupt(), short of its calls when all is well
                if len(events) != 1 or events[0][0] != call_fd:
                    self._interrupted(events)
                used += queue.collect_used()
                if len(used) < 2:
                    # A wake-up for less (a stale interrupt, a device that publishes one
                    # at a time): ask again, look again, then wait.
                    queue.request_interrupt_after(2 - len(used))
                    used += queue.collect_used()
        except VirtioError as exc:
            raise VhostUserError(f"invalid used ring: {exc}") from exc
        if adaptive is not None:
            if found:
                adaptive.hit()
            else:
                end = clock()
                if lost:
                    adaptive.preempted(end)
                elif spin:
                    adaptive.miss(end, end - start)
                else:
                    adaptive.slept(end - start)
        (first, req_len), (_, resp_len) = used
        if first != req_head:
            raise VhostUserError("backend returned the response chain before the request")
        if req_len != 0:
            raise VhostUserError(f"request chain returned with length {req_len} (0 expected)")
        response = memory.read(resp_addr, resp_len)
        self._free_slots.append(slot)
        return response

    def exchange_many(self, requests: Sequence[bytes]) -> list[bytes]:
        """Send a burst of requests; responses come back in the same order.

        Requests go out in rounds of up to a quarter of the ring's descriptors, each
        round queued before a single kick, and a second round is queued while the
        device works on the first, so both sides run at once.

        A request longer than 0x1000 bytes is refused before anything is sent, as
        Linux refuses it with EMSGSIZE: :class:`NsmError` ``InputTooLarge``.
        """
        for request in requests:
            if len(request) > MAX_REQUEST_SIZE:
                raise NsmError(
                    ErrorCode.InputTooLarge,
                    f"request of {len(request)} bytes exceeds {MAX_REQUEST_SIZE:#x} bytes",
                )
        responses: list[bytes] = []
        step = max(1, self.queue_size // (2 * _ROUNDS))
        in_flight: deque[list[_Pair]] = deque()
        start = 0
        while start < len(requests) or in_flight:
            while start < len(requests) and len(in_flight) < _ROUNDS:
                in_flight.append(self._submit(requests[start : start + step]))
                start += step
            responses += self._complete(in_flight.popleft())
        return responses

    def exchange_surviving(
        self, requests: Sequence[bytes], *, reconnect_timeout: float = 30.0
    ) -> list[bytes]:
        """Send requests (at most one ring's worth) and get every answer, even across crashes.

        Whenever the backend hangs up before all answers are in, :meth:`reconnect`
        to its successor and keep waiting: with an inflight region the successor
        serves what was in flight, each request exactly once if its device keeps a
        durable record (``nsm serve --state-dir``).
        """
        if len(requests) > len(self._free_slots):
            raise ValueError(f"{len(requests)} requests, room for {len(self._free_slots)}")
        for request in requests:
            if len(request) > MAX_REQUEST_SIZE:
                raise NsmError(
                    ErrorCode.InputTooLarge,
                    f"request of {len(request)} bytes exceeds {MAX_REQUEST_SIZE:#x} bytes",
                )
        pairs = self._submit(requests)  # memory and an eventfd: no backend needed
        while True:
            try:
                return self._complete(pairs)
            except BackendDisconnected:
                self.reconnect(reconnect_timeout)

    def _submit(self, requests: Sequence[bytes]) -> list[_Pair]:
        pairs: list[_Pair] = []
        for request in requests:
            slot = self._free_slots.pop()
            base = self.buffers + slot * _SLOT
            self.memory.write(base, request)
            resp_addr = base + MAX_REQUEST_SIZE
            req_head, resp_head = self.queue.add_pair(base, len(request), resp_addr, RESPONSE_BUFFER_SIZE)
            pairs.append(_Pair(req_head, resp_head, resp_addr, slot))
        if self.queue.publish():
            self.kick()
        return pairs

    def _complete(self, pairs: list[_Pair]) -> list[bytes]:
        """Wait until the device has returned both chains of every pair; read responses."""
        done = self._done
        heads = {p.req_head for p in pairs} | {p.resp_head for p in pairs}
        # The oldest unconsumed use of each of our heads is ours: a head cannot be
        # reused before our use of it has been collected.
        missing = sum(1 for head in heads if not done.get(head))
        while missing > 0:
            # The device completes in order: these are the next `missing` used entries.
            self.queue.request_interrupt_after(missing)
            if not self._collect(block=False):
                self._collect(block=True)
            missing = sum(1 for head in heads if not done.get(head))
        responses: list[bytes] = []
        for pair in pairs:
            req_seq, req_len = self._take_done(pair.req_head)
            resp_seq, resp_len = self._take_done(pair.resp_head)
            if req_len != 0:
                raise VhostUserError(f"request chain returned with length {req_len} (0 expected)")
            if req_seq > resp_seq:
                raise VhostUserError("backend returned the response chain before the request")
            responses.append(self.memory.read(pair.resp_addr, resp_len))
            self._free_slots.append(pair.slot)
        return responses

    def _collect(self, *, block: bool) -> list[int]:
        """Record new used entries (waiting for an interrupt first if ``block``)."""
        if block:
            self.wait_interrupt()
        try:
            used = self.queue.collect_used()
        except VirtioError as exc:
            raise VhostUserError(f"invalid used ring: {exc}") from exc
        for head, length in used:
            self._done.setdefault(head, deque()).append((self._seq, length))
            self._seq += 1
        return [head for head, _ in used]

    def _take_done(self, head: int) -> tuple[int, int]:
        uses = self._done[head]
        entry = uses.popleft()
        if not uses:
            del self._done[head]
        return entry


class VhostUserTransport(NsmFrontend):
    """The client-side transport (``exchange``/``close``) over a vhost-user socket.

    ``--device vhost-user:SOCK`` maps to ``VhostUserTransport(SOCK)``.
    """
