"""The NSM as a virtio device: its ring rules and its vhost-user device description.

:class:`NsmVirtioDevice` is what the vhost-user daemon serves for the NSM (virtio
device 33, one queue, no configuration space): a :class:`~virtio_nsm.vhost_user.device.VhostUserDevice`
whose queue worker is :class:`NsmQueueWorker`, answering with a
:class:`~virtio_nsm.request.RequestHandler` (:meth:`NsmDevice.handle
<virtio_nsm.nsm.device.NsmDevice.handle>`, or :class:`~virtio_nsm.durable.DurableNsm`).

Ring rules (facts §3)
---------------------
The Linux driver queues, per request, two chains: one device-readable descriptor
holding the request and one device-writable descriptor of 0x3000 bytes for the
response; it kicks once and expects, in this order, the request chain on the used
ring with length 0, the response chain with the exact CBOR length, then one
interrupt.  :class:`NsmQueueWorker` does exactly that for every pair available (such
pairs are taken, answered and returned by
:meth:`~virtio_nsm.virtio.queue.DeviceQueue.serve_pairs`, one call per batch: the
path of every request from Linux), and also
accepts a single chain holding a readable then a writable part (answered with one
used entry).  A request chain whose response chain has not been made available yet
is held until it is (and given back if the ring is stopped first).  A writable chain
with no request before it, or a readable chain where a response chain is due, breaks
the rules: the ring is stopped with ``DEVICE_NEEDS_RESET``.

Crash recovery: when the ring has inflight tracking (see :mod:`virtio_nsm.vhost_user.inflight`), every
chain taken is marked in the shared region and cleared once its used entry is
published; chains a previous backend left unanswered are served first, and each
request goes to the handler with a :class:`~virtio_nsm.request.RequestToken` (head
and inflight counter of its request chain) that is the same when a restarted
backend serves it again.  With tracking, each answer is published as soon as it
is written, so at most one request at a time has been applied without its answer
being visible.  A handler that
records its last state change with that token (:class:`virtio_nsm.durable.DurableNsm`)
answers the repeated request from the record instead of applying it twice.  The
handler returns only once a state change is durable, and only then is the answer
put on the used ring.

Requests longer than ``MAX_REQUEST_SIZE`` are passed on truncated to one byte more
than the limit, so the device answers ``InputTooLarge`` without us copying
arbitrary amounts of guest memory.  A response chain too small for the answer
gets ``{"Error": "BufferTooSmall"}`` if that fits, otherwise nothing (length 0);
the handler is told the buffer's size first (``max_response``), so such a request
changes nothing.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from ..errors import ErrorCode
from ..request import RequestHandler
from ..vhost_user.device import DeviceStateHandler, QueueWorker, VhostUserDevice
from ..vhost_user.inflight import InflightQueue
from ..virtio.queue import Chain, DeviceQueue, VirtqueueError
from .protocol import MAX_REQUEST_SIZE, MAX_RESPONSE_SIZE, encode_error

__all__ = [
    "BUFFER_TOO_SMALL",
    "INTERNAL_ERROR",
    "NSM_DEVICE_ID",
    "NsmQueueWorker",
    "NsmVirtioDevice",
]

log = logging.getLogger("virtio_nsm.vhost_user")

#: The virtio device ID of the NSM.
NSM_DEVICE_ID = 33

INTERNAL_ERROR = encode_error(ErrorCode.InternalError)
BUFFER_TOO_SMALL = encode_error(ErrorCode.BufferTooSmall)
#: Requests are read up to one byte past the largest one (see the module docstring).
_REQUEST_LIMIT = MAX_REQUEST_SIZE + 1


class NsmVirtioDevice(VhostUserDevice):
    """The NSM for the vhost-user daemon: one queue served by :class:`NsmQueueWorker`.

    ``handler`` answers each request (with its token when the ring has inflight
    tracking); ``device_state``, if given, serves VHOST_USER_PROTOCOL_F_DEVICE_STATE.
    """

    device_id = NSM_DEVICE_ID
    num_queues = 1

    def __init__(self, handler: RequestHandler, *, device_state: DeviceStateHandler | None = None) -> None:
        self.handler = handler
        self.device_state = device_state

    def __repr__(self) -> str:
        return f"<NsmVirtioDevice {self.handler!r}>"

    def worker(self, index: int, queue: DeviceQueue, notify: Callable[[], None]) -> QueueWorker:
        return NsmQueueWorker(queue, self.handler, notify)


class NsmQueueWorker:
    """Serves NSM requests from one started virtqueue (see the module docstring)."""

    #: Pairs answered between two looks at whether the driver wants an interrupt,
    #: so that a pipelining driver hears about finished work while more is served.
    NOTIFY_EVERY = 16

    def __init__(
        self, queue: DeviceQueue, handler: RequestHandler, notify: Callable[[], None] | None = None
    ) -> None:
        self.queue = queue
        self.handler = handler
        self.notify = notify
        self.pending: Chain | None = None
        self.tracker: InflightQueue | None = None
        self.resubmit: deque[int] = deque()

    def track_inflight(self, tracker: InflightQueue, resubmit: list[int]) -> None:
        self.tracker = tracker
        self.resubmit = deque(resubmit)

    def __repr__(self) -> str:
        return f"<NsmQueueWorker {self.queue!r} pending={self.pending and self.pending.head}>"

    def process(self) -> bool:
        queue = self.queue
        answered = 0
        try:
            while self.resubmit:
                # Left unanswered by a previous backend: serve them first, in the order taken.
                if self._take(queue.resubmit(self.resubmit[0]), fresh=False):
                    answered += 1
                    self._publish()
                self.resubmit.popleft()
            if self.tracker is None and self.pending is None:
                answered += self._serve_pairs()
            # Anything else (a chain with both parts, a request whose response chain is
            # not there yet, a broken rule, inflight tracking): one chain at a time.
            while (chain := queue.pop()) is not None:
                if self._take(chain):
                    answered += 1
                    if self.notify is not None and answered % self.NOTIFY_EVERY == 0:
                        self._publish()
                        self.notify()
                    elif self.tracker is not None:
                        # At most one applied-but-unpublished request at any time: the
                        # durable record holds only the last change (see DurableNsm).
                        self._publish()
        finally:
            # Publish what was answered even if a later chain broke the rules.
            if answered:
                if self.tracker is None:
                    queue.publish_used()
                else:
                    self._publish()
        return answered > 0

    def _serve_pairs(self) -> int:
        """Answer pairs as long as the ring holds them (the path of every nsm.ko request).

        :meth:`_take`'s rules for a request chain followed by its response chain, in one
        call per batch: :meth:`~virtio_nsm.virtio.queue.DeviceQueue.serve_pairs` takes
        both only when they are one readable and one writable descriptor.  Returns how
        many were answered (their used entries written, not published).
        """
        queue = self.queue
        serve, answer, notify = queue.serve_pairs, self._answer, self.notify
        batch = self.NOTIFY_EVERY if notify is not None else 1 << 30
        answered = 0
        try:
            while True:
                count = serve(answer, _REQUEST_LIMIT, batch)
                answered += count
                if count < batch or notify is None:
                    return answered
                queue.publish_used()
                notify()
        except BaseException:
            queue.publish_used()  # what was answered is published, whatever happens next
            raise

    def _publish(self) -> None:
        self.queue.publish_used()
        if self.tracker is not None:
            self.tracker.published(self.queue.next_used_idx)

    def _used(self, head: int, length: int) -> None:
        self.queue.add_used(head, length)
        if self.tracker is not None:
            self.tracker.returned(head)

    def _take(self, chain: Chain, fresh: bool = True) -> int:
        memory = self.queue.memory
        if fresh and self.tracker is not None:
            self.tracker.taken(chain.head)
        request = self.pending
        if request is None:
            if chain.readable and chain.writable:
                response = self._serve(chain, chain.writable_len)
                self._used(chain.head, chain.write(memory, response))
                return 1
            if chain.readable:
                self.pending = chain
                return 0
            raise VirtqueueError(f"chain {chain.head} is a response buffer with no request before it")
        if chain.readable or not chain.writable:
            raise VirtqueueError(
                f"request chain {request.head} is followed by chain {chain.head}, "
                "which is not a device-writable response buffer"
            )
        self.pending = None
        written = chain.write(memory, self._serve(request, chain.writable_len))
        # As two _used() calls, inline: this is the path of every nsm.ko request.
        queue, tracker = self.queue, self.tracker
        queue.add_used(request.head, 0)
        if tracker is not None:
            tracker.returned(request.head)
        queue.add_used(chain.head, written)
        if tracker is not None:
            tracker.returned(chain.head)
        return 1

    def rewind(self) -> int:
        if self.pending is not None:
            if self.tracker is None:
                self.queue.unpop(self.pending)
            # else it stays marked inflight and is resubmitted when the ring restarts
            self.pending = None
        return self.queue.last_avail_idx

    def _serve(self, request_chain: Chain, capacity: int) -> bytes:
        request = request_chain.read(self.queue.memory, _REQUEST_LIMIT)
        return self._answer(request, capacity, request_chain.head)

    def _answer(self, request: bytes, capacity: int, head: int) -> bytes:
        """The handler's answer to ``request`` (chain ``head``), made to fit ``capacity`` bytes."""
        try:
            tracker = self.tracker
            response = self.handler(request, None if tracker is None else tracker.token(head),
                                    max_response=capacity)
        except Exception:
            log.exception("NSM handler failed on a %d-byte request", len(request))
            response = INTERNAL_ERROR
        length = len(response)
        if length <= capacity and length <= MAX_RESPONSE_SIZE:
            return response
        if length > MAX_RESPONSE_SIZE:
            log.error("NSM handler returned %d bytes (> 0x3000)", len(response))
            response = INTERNAL_ERROR
        if len(response) > capacity:
            log.warning(
                "response of %d bytes does not fit the %d-byte buffer of chain %d",
                len(response),
                capacity,
                head,
            )
            response = BUFFER_TOO_SMALL if len(BUFFER_TOO_SMALL) <= capacity else b""
        return response
