"""A Python virtio-vsock driver: :class:`~.guest.GuestTransport` over real rings of a vhost-user backend.

:class:`VsockDriver` plays the guest for tests and tools: it connects to a vsock
backend as a vhost-user frontend (three queues), reads ``guest_cid`` from the
configuration space, keeps the rx and event queues stocked with buffers (4 KiB rx
buffers, as Linux posts), puts the transport's packets on the tx queue, and hands
what comes back to the transport.  Single-threaded: call :meth:`~VsockDriver.pump`
(or :meth:`~VsockDriver.run_until`) to make progress.
"""

from __future__ import annotations

import contextlib
import os
import select
import struct
import time
from collections.abc import Callable

from ..vhost_user.frontend import VhostUserError, VhostUserFrontend
from ..virtio.queue import Segment
from .constants import (
    EVENT_QUEUE,
    EVENT_SIZE,
    HEADER_SIZE,
    RX_QUEUE,
    TX_QUEUE,
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
    VIRTIO_VSOCK_F_STREAM,
)
from .guest import GuestTransport

__all__ = ["VsockDriver"]

RX_BUFFER = 4096
_EVENT_BUFFERS = 8


class VsockDriver:
    """The guest side of a vsock device served at ``path`` (see the module doc)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        queue_size: int = 128,
        max_packet: int = 16384,
        buf_alloc: int = 256 * 1024,
        timeout: float = 20.0,
        reset_wait: float = 2.0,
    ) -> None:
        self.queue_size = queue_size
        self.tx_slot = HEADER_SIZE + max_packet
        self._rx_base = 0
        self._tx_base = queue_size * RX_BUFFER
        self._ev_base = self._tx_base + queue_size * self.tx_slot
        size = self._ev_base + _EVENT_BUFFERS * EVENT_SIZE
        self.fe = VhostUserFrontend(
            path,
            num_queues=3,
            queue_size=queue_size,
            buffer_size=size,
            device_features=1 << VIRTIO_VSOCK_F_STREAM,
            timeout=timeout,
        )
        try:
            (cid,) = struct.unpack("<Q", self.fe.get_config(0, 8))
            self.transport = GuestTransport(cid, buf_alloc=buf_alloc, max_packet=max_packet)
            #: Event ids received on the event queue.
            self.events: list[int] = []
            self._rx_slots: dict[int, int] = {}  # head -> buffer address
            self._tx_slots: dict[int, int] = {}
            self._free_tx = [self.fe.buffers + self._tx_base + i * self.tx_slot for i in range(queue_size)]
            self._ev_slots: dict[int, int] = {}
            for i in range(queue_size):
                self._post_rx(self.fe.buffers + self._rx_base + i * RX_BUFFER)
            for i in range(_EVENT_BUFFERS):
                self._post_event(self.fe.buffers + self._ev_base + i * EVENT_SIZE)
            for index in (RX_QUEUE, EVENT_QUEUE):
                self._publish(index)
            # A new backend tells a new driver to reset (nothing to reset yet); like
            # Linux at probe time, take that in before any socket exists.
            with contextlib.suppress(TimeoutError):
                self.run_until(lambda: bool(self.events), timeout=reset_wait, what="the reset event")
        except BaseException:
            self.fe.close()
            raise

    @property
    def cid(self) -> int:
        return self.transport.cid

    def close(self) -> None:
        self.fe.close()

    def __enter__(self) -> VsockDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ rings
    def _post_rx(self, addr: int) -> None:
        head = self.fe.queues[RX_QUEUE].add([Segment(addr, RX_BUFFER, True)])
        self._rx_slots[head] = addr

    def _post_event(self, addr: int) -> None:
        head = self.fe.queues[EVENT_QUEUE].add([Segment(addr, EVENT_SIZE, True)])
        self._ev_slots[head] = addr

    def _publish(self, index: int) -> None:
        queue = self.fe.queues[index]
        queue.request_interrupt_after(1)
        if queue.publish():
            self.fe.kick(index)

    def pump(self) -> bool:
        """Move everything that can move now, without waiting; returns whether anything did."""
        fe, memory = self.fe, self.fe.memory
        moved = False
        # rx: deliver, then give the buffers back
        # (every slot is looked up before any is posted again: a freed head is reused)
        used = [(self._rx_slots.pop(head), length) for head, length in fe.queues[RX_QUEUE].collect_used()]
        for addr, length in used:
            self.transport.deliver(memory.read(addr, length))
            self._post_rx(addr)
        if used:
            self._publish(RX_QUEUE)
            moved = True
        # events
        used = [(self._ev_slots.pop(head), length) for head, length in fe.queues[EVENT_QUEUE].collect_used()]
        for addr, length in used:
            if length == EVENT_SIZE:
                (event,) = struct.unpack("<I", memory.read(addr, EVENT_SIZE))
                self.events.append(event)
                if event == VIRTIO_VSOCK_EVENT_TRANSPORT_RESET:
                    self.transport.transport_reset()
            self._post_event(addr)
        if used:
            self._publish(EVENT_QUEUE)
            moved = True
        # tx: reclaim, then send
        for head, _ in fe.queues[TX_QUEUE].collect_used():
            self._free_tx.append(self._tx_slots.pop(head))
            moved = True
        sent = False
        while self._free_tx:
            packet = self.transport.next_tx()
            if packet is None:
                break
            addr = self._free_tx.pop()
            memory.write(addr, packet)
            head = fe.queues[TX_QUEUE].add([Segment(addr, len(packet))])
            self._tx_slots[head] = addr
            sent = True
        if sent:
            self._publish(TX_QUEUE)
            moved = True
        return moved

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for an interrupt (drained); raise if the backend failed."""
        fds = [*self.fe.call_fds, *self.fe.err_fds]
        ready, _, _ = select.select(fds, [], [], timeout)
        for fd in ready:
            if fd in self.fe.err_fds:
                raise VhostUserError(
                    f"the backend reported a vring error (vring {self.fe.err_fds.index(fd)})"
                )
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(fd)

    def run_until(
        self, condition: Callable[[], bool], timeout: float = 20.0, what: str = "the condition"
    ) -> None:
        """Pump until ``condition()`` holds; :class:`TimeoutError` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            moved = self.pump()
            if condition():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            if not moved:
                self.wait(0.01)
