"""The device interface of the vhost-user backend and daemon.

Theory of operation
-------------------
The vhost-user stack in this package is device-agnostic: the backend
(:class:`~.backend.VhostUserBackend`) runs the protocol (features, memory table,
vrings, inflight tracking, state transfer), the daemon
(:class:`~.daemon.VhostUserDaemon`) runs the event loop, and a *device* says what
the rings mean.  A device is a subclass of :class:`VhostUserDevice` (compare
rust-vmm's ``VhostUserBackend`` trait) and supplies:

* its identity and shape: :attr:`~VhostUserDevice.device_id` (the virtio device
  ID, for QEMU's options), :attr:`~VhostUserDevice.num_queues` and
  :attr:`~VhostUserDevice.max_queue_size`;
* its device feature bits (:attr:`~VhostUserDevice.features`); the transport adds
  its own (``VIRTIO_F_VERSION_1``, ring features, ``VHOST_USER_F_PROTOCOL_FEATURES``)
  and tells the device what the driver accepted (:meth:`~VhostUserDevice.features_acked`);
* its configuration space (:meth:`~VhostUserDevice.get_config`,
  :meth:`~VhostUserDevice.set_config`), served through ``VHOST_USER_GET_CONFIG`` /
  ``SET_CONFIG``; ``VHOST_USER_PROTOCOL_F_CONFIG`` is offered when
  :attr:`~VhostUserDevice.config_size` is not zero;
* one :class:`QueueWorker` per started ring (:meth:`~VhostUserDevice.worker`, given
  the ring's index): it takes chains from the ring, answers them and publishes;
* extra file descriptors to watch (host sockets, timers): the daemon calls
  :meth:`~VhostUserDevice.attach` once with an :class:`EventLoop` on which the
  device registers descriptors and callbacks, and can ask for a ring to be served
  now (data arrived from the host for the guest);
* optionally its state for ``VHOST_USER_PROTOCOL_F_DEVICE_STATE``
  (:attr:`~VhostUserDevice.device_state`, a :class:`DeviceStateHandler`).

Lifetimes: a device outlives every frontend connection and every virtio reset.
When the transport forgets its rings (a disconnect, ``RESET_DEVICE``, a status of
0) the workers are dropped (each is first asked to :meth:`~QueueWorker.rewind`) and
:meth:`~VhostUserDevice.reset` is called; device state the guest must not be able
to reset (the NSM's locked PCRs) simply stays where it is.

Threading: everything is called from the daemon's one thread; a device never
blocks in a callback (its descriptors are non-blocking) and never raises for what
a guest or host peer did (a worker raises :class:`~virtio_nsm.virtio.memory.VirtioError`
for a ring that breaks the rules: the ring is then stopped with ``DEVICE_NEEDS_RESET``).

This interface is stable: the NSM (:mod:`virtio_nsm.nsm.virtio`) and a test device
with two queues and a config space (``tests/vhost_user/test_vhost_device.py``) use
it, and further devices (virtio-vsock) plug in the same way.
"""

from __future__ import annotations

import selectors
from collections.abc import Callable
from typing import Final, Protocol

from ..virtio import spec
from ..virtio.queue import DeviceQueue
from .inflight import InflightQueue

__all__ = [
    "EVENT_READ",
    "EVENT_WRITE",
    "ConfigError",
    "DeviceStateHandler",
    "EventLoop",
    "QueueWorker",
    "VhostUserDevice",
]

#: Readiness bits for :meth:`EventLoop.watch` (those of :mod:`selectors`).
EVENT_READ: Final = selectors.EVENT_READ
EVENT_WRITE: Final = selectors.EVENT_WRITE


class ConfigError(Exception):
    """A configuration space access the device refuses (out of range, read-only field)."""


class QueueWorker(Protocol):
    """Device-specific processing of one started vring.

    Made by :meth:`VhostUserDevice.worker` when a ring becomes ready, with the
    ring (:class:`~virtio_nsm.virtio.queue.DeviceQueue`, every access bounds-checked)
    and ``notify``, a callable that interrupts the driver now if it asked to hear
    about what was published so far (for long passes; the backend interrupts at
    the end of every pass anyway).
    """

    def process(self) -> bool:
        """Handle every available chain; return whether used entries were published."""
        ...

    def rewind(self) -> int:
        """Give back any chain taken but not answered; return the next available index."""
        ...

    def track_inflight(self, tracker: InflightQueue, resubmit: list[int]) -> None:
        """Record taken/returned chains in ``tracker``; first serve the heads in ``resubmit``.

        Called right after the worker is made, only when the frontend gave an
        inflight region (``VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD``).  A device that
        keeps no such record raises :class:`~virtio_nsm.virtio.memory.VirtioError`:
        the ring is then stopped with ``DEVICE_NEEDS_RESET``.
        """
        ...


class DeviceStateHandler(Protocol):
    """The device's side of ``VHOST_USER_PROTOCOL_F_DEVICE_STATE`` (rings stopped)."""

    def save_state(self) -> bytes:
        """The device state to migrate (raise to report a failed save)."""
        ...

    def load_state(self, data: bytes) -> None:
        """Adopt a state produced by :meth:`save_state` (raise to refuse it)."""
        ...


class EventLoop(Protocol):
    """What the daemon offers a device for descriptors of its own (see :meth:`VhostUserDevice.attach`)."""

    def watch(self, fd: int, events: int, callback: Callable[[int], None]) -> None:
        """Call ``callback(ready)`` whenever ``fd`` is ready for ``events``.

        ``events`` is :data:`EVENT_READ`, :data:`EVENT_WRITE` or both; ``ready`` says
        which of them hold.  Watching a watched fd again replaces its events and
        callback.  The fd must stay open until :meth:`unwatch`; readiness reported
        for an fd unwatched earlier in the same pass is not delivered.
        """
        ...

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd`` (before closing it); unknown fds are ignored."""
        ...

    def serve_queue(self, index: int) -> bool:
        """Serve ring ``index`` now, as on a kick; False if it is not running."""
        ...


class VhostUserDevice:
    """A virtio device served over vhost-user; subclass and override what applies.

    The defaults describe a device with one queue, no device features, no
    configuration space, no descriptors of its own and no state transfer.
    """

    #: The virtio device ID (33 for the NSM, 19 for vsock).
    device_id: int = 0
    #: Number of virtqueues.
    num_queues: int = 1
    #: Largest ring size the device accepts (a power of two); also bounds an
    #: inflight region.
    max_queue_size: int = spec.VIRTQ_MAX_SIZE
    #: Device-specific feature bits offered to the driver.
    features: int = 0
    #: Bytes of configuration space (0: none, and no CONFIG protocol feature).
    config_size: int = 0
    #: Handler of VHOST_USER_PROTOCOL_F_DEVICE_STATE, or None not to offer it.
    device_state: DeviceStateHandler | None = None

    def worker(self, index: int, queue: DeviceQueue, notify: Callable[[], None]) -> QueueWorker:
        """The worker for ring ``index``, which has just become ready.

        Raise :class:`~virtio_nsm.virtio.memory.VirtioError` to refuse the ring (it is
        stopped with ``DEVICE_NEEDS_RESET``).
        """
        raise NotImplementedError(f"{type(self).__name__} does not serve queues")

    def features_acked(self, features: int) -> None:
        """The driver accepted ``features`` (transport and device bits; called on every SET_FEATURES)."""

    def get_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of configuration space from ``offset`` (raise :class:`ConfigError`)."""
        if offset < 0 or size < 0 or offset + size > self.config_size:
            raise ConfigError(f"config space read {offset}+{size} outside its {self.config_size} bytes")
        return bytes(size)

    def set_config(self, offset: int, data: bytes) -> None:
        """The driver wrote ``data`` at ``offset`` (raise :class:`ConfigError` to refuse)."""
        raise ConfigError("the configuration space is read-only")

    def attach(self, loop: EventLoop) -> None:
        """The daemon starts: register descriptors to watch on ``loop`` (kept for later)."""

    def detach(self) -> None:
        """The daemon stops: unwatch and close the device's own descriptors."""

    def reset(self) -> None:
        """The transport dropped its rings (disconnect or virtio reset); device state stays."""
