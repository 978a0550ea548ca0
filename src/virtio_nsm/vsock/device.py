"""The virtio-vsock device (ID 19) on the vhost-user backend: rings ↔ bridge ↔ Unix sockets.

:class:`VsockDevice` is a :class:`~virtio_nsm.vhost_user.device.VhostUserDevice`:
three queues (rx 0, tx 1, event 2), the feature ``VIRTIO_VSOCK_F_STREAM``, and an
8-byte configuration space holding ``guest_cid`` (read by QEMU with
``VHOST_USER_GET_CONFIG``).  Its workers only move packets:

* tx: each chain's readable part (header and payload) goes to
  :meth:`~.bridge.VsockBridge.guest_packet` and the chain is returned with length 0.
  The used entries are published (and the guest interrupted, if it asked) in
  batches: once a quarter of the ring is held, after 1-2 ms without tx traffic, or
  when the frontend stops the ring (at once while the daemon polls the rings).
  Linux needs its tx buffers back only to free them (it never waits on one to send
  more while the ring has room), and an interrupt per packet costs a wake-up of QEMU
  and of the guest per packet: a 1-byte round trip made two (the data and the
  guest's credit update);
* rx: while the bridge has packets and the guest has posted buffers, one packet per
  buffer (a buffer smaller than a header is returned empty and counted), published
  once at the end of the pass;
* event: ``VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`` when the bridge owes one.

The host side is :class:`~.host.UnixHost`, registered on the daemon's event loop
in :meth:`VsockDevice.attach`.  A new device owes the guest a TRANSPORT_RESET (a
guest that outlived an earlier backend still holds connections nobody knows), and
so does every transport reset (a frontend that went away, a virtio reset): its
connections are gone, and their host sockets are closed.  The event reaches the
guest only if the frontend hands us the event queue; QEMU's ``vhost-user-vsock``
keeps that queue to itself (and sends the event itself after a migration).
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from pathlib import Path

from ..vhost_user.device import EVENT_READ, ConfigError, EventLoop, QueueWorker, VhostUserDevice
from ..vhost_user.inflight import InflightQueue
from ..virtio.queue import DeviceQueue, VirtqueueError
from .bridge import BridgeLimits, VsockBridge
from .constants import (
    CONFIG_SIZE,
    EVENT_QUEUE,
    HEADER_SIZE,
    MAX_PKT_PAYLOAD,
    NUM_QUEUES,
    RX_QUEUE,
    TX_QUEUE,
    VIRTIO_ID_VSOCK,
    VIRTIO_VSOCK_F_STREAM,
)
from .host import UnixHost
from .timer import Timer

__all__ = ["VsockDevice"]

log = logging.getLogger(__name__)

#: Tx buffers are given back once a quarter of the ring is held ...
TX_BATCH_DIVISOR = 4
#: ... or after this long without tx traffic.
TX_QUIET_NS = 2_000_000


class _Worker:
    def __init__(self, device: VsockDevice, queue: DeviceQueue, notify: Callable[[], None]) -> None:
        self.device = device
        self.queue = queue
        self.notify = notify

    def rewind(self) -> int:
        return self.queue.last_avail_idx

    def track_inflight(self, tracker: InflightQueue, resubmit: list[int]) -> None:
        # Connections do not survive a backend anyway (TRANSPORT_RESET), so there is
        # nothing to resume; a frontend that insists gets a stopped ring.
        raise VirtqueueError("virtio-vsock keeps no inflight record")


class _TxWorker(_Worker):
    """Takes the guest's packets; returns their buffers in batches (see the module doc)."""

    def __init__(self, device: VsockDevice, queue: DeviceQueue, notify: Callable[[], None]) -> None:
        super().__init__(device, queue, notify)
        #: Heads of the chains read but not yet given back.  Their used elements are
        #: written only when they are published: the ring's used index and the
        #: interrupt decision (EVENT_IDX) must never count elements the driver cannot see.
        self.held: list[int] = []
        #: Give back what is held at the next pass (the quiet timer expired).
        self.flush_due = False
        self.batch = max(1, queue.size // TX_BATCH_DIVISOR)

    def process(self) -> bool:
        queue, memory, bridge, held = self.queue, self.queue.memory, self.device.bridge, self.held
        taken = len(held)
        while (chain := queue.pop()) is not None:
            data = chain.read(memory, HEADER_SIZE + MAX_PKT_PAYLOAD)
            held.append(chain.head)
            bridge.guest_packet(data)
        taken = len(held) - taken
        # While the daemon polls (no kicks) nothing is held: it counts a pass that
        # published nothing as no traffic and would stop polling.
        # The packets' effects first (bytes to the host programs: the round trip's
        # critical path), the buffers' bookkeeping (a timer system call) after.
        if taken:
            self.device.host.pump()
        flush = bool(held) and (len(held) >= self.batch or self.flush_due or not queue.kicks_wanted)
        self.flush_due = False
        if flush:
            self._give_back()
            self.device.tx_quiet()
        elif taken:
            self.device.tx_held(time.monotonic_ns())
        return flush

    def _give_back(self) -> None:
        queue = self.queue
        for head in self.held:
            queue.add_used(head, 0)
        self.held.clear()
        queue.publish_used()

    def rewind(self) -> int:
        # The frontend takes the ring over: it must find every chain we read used.
        if self.held:
            self._give_back()
            self.notify()
        return self.queue.last_avail_idx


class _RxWorker(_Worker):
    def process(self) -> bool:
        device = self.device
        device.rx_busy = True
        try:
            return self._fill()
        finally:
            device.rx_busy = False

    def _fill(self) -> bool:
        queue, memory, bridge = self.queue, self.queue.memory, self.device.bridge
        filled = 0
        while bridge.has_rx():
            chain = queue.pop()
            if chain is None:
                break
            if chain.writable_len < HEADER_SIZE:
                bridge.stats["bad_rx_buffer"] += 1
                if bridge.stats["bad_rx_buffer"] <= 5:
                    log.warning("vsock: rx buffer of %d bytes cannot hold a header", chain.writable_len)
                queue.add_used(chain.head, 0)
                filled += 1
                continue
            packet = bridge.next_rx(chain.writable_len)
            if packet is None:
                queue.unpop(chain)
                break
            queue.add_used(chain.head, chain.write(memory, packet))
            filled += 1
        # One publication and at most one interrupt per pass, however long: Linux's
        # rx work then takes the whole batch at once instead of waking its reader for
        # the first few packets while the rest arrive (measured: +15-25 % host -> guest).
        if filled:
            queue.publish_used()
            # Interrupt before anything else (the backend's checked decision after the
            # pass does not interrupt twice), then read more from the host sockets,
            # which the packets just sent made room for.
            self.notify()
            self.device.host.pump()
        return filled > 0


class _EventWorker(_Worker):
    def process(self) -> bool:
        bridge = self.device.bridge
        if not bridge.event_pending:
            return False
        chain = self.queue.pop()
        if chain is None:
            return False
        event = bridge.take_event()
        assert event is not None
        if chain.writable_len < len(event):
            log.warning("vsock: event buffer of %d bytes is too small", chain.writable_len)
            self.queue.add_used(chain.head, 0)
        else:
            self.queue.add_used(chain.head, chain.write(self.queue.memory, event))
            log.info("vsock: TRANSPORT_RESET sent to the guest")
        self.queue.publish_used()
        return True


class VsockDevice(VhostUserDevice):
    """virtio-vsock for the guest ``guest_cid``, bridged to Unix sockets at ``uds_path``."""

    device_id = VIRTIO_ID_VSOCK
    num_queues = NUM_QUEUES
    max_queue_size = 1024
    features = 1 << VIRTIO_VSOCK_F_STREAM
    config_size = CONFIG_SIZE

    def __init__(self, guest_cid: int, uds_path: str | Path, *, limits: BridgeLimits | None = None) -> None:
        self.bridge = VsockBridge(guest_cid, limits=limits)
        self.bridge.transport_reset()
        self.host = UnixHost(self.bridge, Path(uds_path), self._guest_work)
        self.rx_busy = False
        #: The event queue was served since the bridge came to owe the event: until a
        #: new one is owed, the backend serves that queue when the guest kicks it or it
        #: starts (QEMU keeps it to itself, so the event may stay owed for good).
        self._event_served = False
        self._loop: EventLoop | None = None
        self._tx: _TxWorker | None = None
        self._timer: Timer | None = None
        self._tx_deadline = 0  # time.monotonic_ns() at which the armed timer expires

    def __repr__(self) -> str:
        return f"<VsockDevice cid={self.bridge.guest_cid} {self.host.path}>"

    @property
    def guest_cid(self) -> int:
        return self.bridge.guest_cid

    def worker(self, index: int, queue: DeviceQueue, notify: Callable[[], None]) -> QueueWorker:
        if index == RX_QUEUE:
            return _RxWorker(self, queue, notify)
        if index == TX_QUEUE:
            self._tx = _TxWorker(self, queue, notify)
            return self._tx
        if index == EVENT_QUEUE:
            return _EventWorker(self, queue, notify)
        raise VirtqueueError(f"virtio-vsock has no queue {index}")

    def get_config(self, offset: int, size: int) -> bytes:
        space = struct.pack("<Q", self.bridge.guest_cid)
        if offset < 0 or size < 0 or offset + size > len(space):
            raise ConfigError(f"config space read {offset}+{size} outside its {len(space)} bytes")
        return space[offset : offset + size]

    def attach(self, loop: EventLoop) -> None:
        self._loop = loop
        self._timer = Timer()
        loop.watch(self._timer.fileno(), EVENT_READ, self._on_timer)
        self.host.open(loop)

    def detach(self) -> None:
        self.host.close()
        if self._timer is not None:
            if self._loop is not None:
                self._loop.unwatch(self._timer.fileno())
            self._timer.close()
            self._timer = None
        self._loop = None

    def tx_held(self, now: int) -> None:
        """The tx worker holds chains: give them back after half to all of ``TX_QUIET_NS``
        without tx traffic.

        The timer is pushed back only once half of its time has passed: one system call
        per millisecond of traffic, and no expiry (a wake-up) while traffic goes on.
        """
        timer = self._timer
        if timer is not None and (not timer.armed or self._tx_deadline - now < TX_QUIET_NS // 2):
            timer.arm(TX_QUIET_NS)
            self._tx_deadline = now + TX_QUIET_NS

    def tx_quiet(self) -> None:
        """The tx worker holds nothing any more."""
        if self._timer is not None:
            self._timer.disarm()

    def _on_timer(self, ready: int) -> None:
        timer, tx, loop = self._timer, self._tx, self._loop
        if timer is None or not timer.expired() or tx is None or loop is None or not tx.held:
            return
        tx.flush_due = True
        loop.serve_queue(TX_QUEUE)

    def reset(self) -> None:
        self._tx = None
        self.tx_quiet()
        if self.bridge.connection_count or self.bridge.stream_count:
            log.info("vsock: transport reset: %d connections dropped", self.bridge.connection_count)
        self.bridge.transport_reset()
        self._event_served = False
        self.host.pump()

    def _guest_work(self) -> None:
        loop = self._loop
        if loop is None:
            return
        if self.bridge.has_rx() and not self.rx_busy:
            loop.serve_queue(RX_QUEUE)
        if self.bridge.event_pending and not self._event_served:
            self._event_served = True
            loop.serve_queue(EVENT_QUEUE)
