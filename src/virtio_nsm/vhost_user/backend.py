"""vhost-user backend state: feature negotiation, memory table, vrings, dispatch.

Theory of operation
-------------------
:class:`VhostUserBackend` consumes parsed frontend messages (:meth:`handle`) and
kick notifications (:meth:`kick`) and keeps everything a vhost-user device needs:
negotiated features, protocol features, the mapped memory table, and per vring its
size, addresses, base, kick/call/err descriptors and enabled/started state.  It is
device-agnostic: the device (a :class:`~.device.VhostUserDevice`) supplies its
queue count, device features and configuration space (``GET_CONFIG`` /
``SET_CONFIG``), and a :class:`~.device.QueueWorker` per ready vring, made from
the ring's index, the queue and a callback that interrupts the driver mid-pass
if it asked for it (for the NSM see :mod:`virtio_nsm.nsm.virtio`).  It does no socket I/O (the event loop owns
the socket), but it does map memory and write to call/err eventfds.

Dispatch is a table from request code to method; payload syntax was already
checked by :func:`~.message.parse_payload`.  A well-formed request that cannot be
honoured raises :class:`BackendError`: with ``need_reply`` (REPLY_ACK) the frontend
gets a non-zero ack and the connection stays up; otherwise the caller drops the
connection, which is what the spec suggests for unrecoverable situations.

A ring is *ready* once it has a size, addresses, memory to translate them, a kick
descriptor (spec: the ring starts on the first kick; the descriptor arriving is
when we start looking), and is enabled (rings start disabled when
``VHOST_USER_F_PROTOCOL_FEATURES`` is negotiated).  Whenever a ring becomes ready
we look at it at once, so kicks that arrived early are never lost.  A call fd that
arrives late gets the interrupt that could not be delivered before.  A ring whose
contents break the rules is marked broken, ``VIRTIO_CONFIG_S_NEEDS_RESET`` is set in
the status, the err fd is signalled and the reason is logged; the ring stays dead
until the frontend resets or reprograms it.

Descriptors from the frontend are checked before use: guest memory and inflight
regions must be memfds sealed against shrinking (a file shrunk under our mapping
means SIGBUS; ``allow_file_memory`` waives this for memory), and kick, call and err
eventfds are made non-blocking, so a saturated call counter never blocks the event
loop (the daemon never reads kick fds: it watches them edge-triggered).  An
inflight region may cover at most the device's queues at its largest ring size.

The device object behind the workers is not owned here: :meth:`disconnect` and
virtio resets drop transport state only, never device state (PCRs, locks).

Crash recovery and migration
----------------------------
With ``VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`` the backend hands out a shared
inflight region (``GET_INFLIGHT_FD``) that the frontend keeps and gives back to a
restarted backend (``SET_INFLIGHT_FD``); see :mod:`.inflight`.  When a ring starts
with a region, the heads the previous backend took but never returned are
handed to the worker for resubmission, and the ring continues at ``used->idx``
plus their number (whatever ``SET_VRING_BASE`` said, as libvhost-user does).

When the device has a ``device_state`` handler the backend also offers
``VHOST_USER_PROTOCOL_F_DEVICE_STATE``: ``SET_DEVICE_STATE_FD`` (only while every
ring is stopped, phase "stopped") writes the saved state into the given fd, or
remembers the fd to load from; ``CHECK_DEVICE_STATE`` reads a load to its end,
applies it and reports whether all went well.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..virtio import spec
from ..virtio.memory import (
    NOT_A_FILE,
    GuestMemory,
    GuestMemoryError,
    MemoryRegion,
    VirtioError,
    shrink_hazard,
)
from ..virtio.queue import DeviceQueue, RingLayout
from .connection import SLICE
from .device import ConfigError, QueueWorker, VhostUserDevice
from .inflight import InflightError, InflightRegion
from .message import (
    U64,
    VHOST_TRANSFER_STATE_DIRECTION_LOAD,
    VHOST_TRANSFER_STATE_DIRECTION_SAVE,
    VHOST_TRANSFER_STATE_PHASE_STOPPED,
    VHOST_USER_DEVICE_STATE_NOFD,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_MAX_CONFIG_SIZE,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    DeviceConfig,
    DeviceStateTransfer,
    FrontendRequest,
    Inflight,
    MemoryRegionDescription,
    MemoryTable,
    Message,
    Payload,
    ProtocolFeature,
    SingleMemoryRegion,
    VringAddr,
    VringFd,
    VringState,
    parse_payload,
)

__all__ = [
    "MAX_MEM_SLOTS",
    "OFFERED_PROTOCOL_FEATURES",
    "TRANSPORT_FEATURES",
    "BackendError",
    "VhostUserBackend",
    "Vring",
]

log = logging.getLogger("virtio_nsm.vhost_user")

#: The feature bits of the transport (the device adds its own, see ``VhostUserDevice.features``).
TRANSPORT_FEATURES = (
    1 << spec.VIRTIO_F_VERSION_1
    | 1 << VHOST_USER_F_PROTOCOL_FEATURES
    | 1 << spec.VIRTIO_RING_F_INDIRECT_DESC
    | 1 << spec.VIRTIO_RING_F_EVENT_IDX
)

_PF = ProtocolFeature
OFFERED_PROTOCOL_FEATURES = (
    1 << _PF.VHOST_USER_PROTOCOL_F_MQ
    | 1 << _PF.VHOST_USER_PROTOCOL_F_REPLY_ACK
    | 1 << _PF.VHOST_USER_PROTOCOL_F_RESET_DEVICE
    | 1 << _PF.VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS
    | 1 << _PF.VHOST_USER_PROTOCOL_F_STATUS
    | 1 << _PF.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD
)

#: Memory slots we accept through ADD_MEM_REG (QEMU requires at least 8 if it asks).
MAX_MEM_SLOTS = 32

_EVENTFD_ONE = (1).to_bytes(8, "little")
_write, _monotonic_ns = os.write, time.monotonic_ns  # bound once: the per-request path
#: How long CHECK_DEVICE_STATE waits for the frontend's end of a load to close.
STATE_LOAD_TIMEOUT = 5.0
#: A device state larger than this is refused on load.
MAX_DEVICE_STATE = 1 << 20


class BackendError(Exception):
    """A well-formed request that this backend cannot honour in its current state."""


@dataclass(eq=False)
class Vring:
    """Transport state of one virtqueue."""

    index: int
    num: int = 0
    addr: VringAddr | None = None
    base: int = 0
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    started: bool = False
    broken: str | None = None
    signal_pending: bool = False
    queue: DeviceQueue | None = None
    worker: QueueWorker | None = None

    def drop_queue(self) -> None:
        """Forget the ring views (they are rebuilt on demand), keeping the position."""
        if self.queue is not None:
            if self.worker is not None:
                self.base = self.worker.rewind()
            if not self.queue.kicks_wanted:
                # Leave the ring asking for kicks: whoever serves it next may not poll.
                self.queue.kicks_wanted = True
                with contextlib.suppress(VirtioError, ValueError, IndexError):
                    self.queue.publish_avail_event()
            self.queue.release()
        self.queue = None
        self.worker = None

    def close_fds(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(self, name)
            if fd is not None:
                _close(fd)
                setattr(self, name, None)


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _nonblocking(fd: int) -> int:
    """Make a frontend's eventfd non-blocking (its open file is shared with the frontend).

    The frontend can drain a kick fd between our readiness check and our read, or
    leave a call fd's counter at its maximum: a blocking read or write would then
    stop the whole backend (and its signal handling) indefinitely.
    """
    with contextlib.suppress(OSError):  # not our business if it is no fd at all
        os.set_blocking(fd, False)
    return fd


class VhostUserBackend:
    """Protocol state of one vhost-user device, across connections."""

    def __init__(self, device: VhostUserDevice, *, allow_file_memory: bool = False) -> None:
        self.device = device
        num_queues = device.num_queues
        if not 1 <= num_queues <= 0x100:
            raise ValueError(f"a vhost-user device has 1..256 queues, not {num_queues}")
        self.num_queues = num_queues
        #: Largest ring the device accepts (also bounds an inflight region).
        size = self.max_queue_size = device.max_queue_size
        if not 1 <= size <= spec.VIRTQ_MAX_SIZE or size & (size - 1):
            raise ValueError(f"maximum queue size {size} is not a power of two up to 32768")
        if device.features & TRANSPORT_FEATURES:
            raise ValueError(f"device features {device.features:#x} overlap the transport's")
        if not 0 <= device.config_size <= VHOST_USER_MAX_CONFIG_SIZE:
            raise ValueError(
                f"config space of {device.config_size} bytes (at most {VHOST_USER_MAX_CONFIG_SIZE})"
            )
        #: Feature bits offered: the transport's and the device's.
        self.offered_features = TRANSPORT_FEATURES | device.features
        #: Map guest memory that could shrink under us (see :meth:`_map`).
        self.allow_file_memory = allow_file_memory
        #: Set by the event loop: true once the backend is shutting down, which ends
        #: any wait for the frontend (a device state load) early.
        self.interrupted: Callable[[], bool] = lambda: False
        #: Called with a kick fd just before the backend closes it, so that the event
        #: loop stops watching it while it can: once closed here, epoll still watches
        #: the frontend's copy of the eventfd and could no longer be told to stop.
        self.kick_closing: Callable[[int], None] = lambda fd: None
        self.device_state = device.device_state
        self.offered_protocol_features = OFFERED_PROTOCOL_FEATURES
        if self.device_state is not None:
            self.offered_protocol_features |= 1 << _PF.VHOST_USER_PROTOCOL_F_DEVICE_STATE
        if device.config_size:
            self.offered_protocol_features |= 1 << _PF.VHOST_USER_PROTOCOL_F_CONFIG
        self.inflight: InflightRegion | None = None
        self._reply_fds: list[int] = []
        self._state_load_fd: int | None = None
        self._state_error: str | None = None
        self.memory = GuestMemory()
        self.vrings = [Vring(i) for i in range(num_queues)]
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.status = 0
        #: The event loop is polling the available rings (see :meth:`set_polling`).
        self.polling = False
        #: Interrupts sent (call eventfd writes), for statistics, and when the last one was.
        self.interrupts = 0
        self.last_interrupt_ns: int | None = None
        R = FrontendRequest
        self._dispatch: dict[int, Callable[[Message, Payload], Payload | None]] = {
            R.VHOST_USER_GET_FEATURES: self._get_features,
            R.VHOST_USER_SET_FEATURES: self._set_features,
            R.VHOST_USER_SET_OWNER: self._set_owner,
            R.VHOST_USER_RESET_OWNER: self._reset_owner,
            R.VHOST_USER_SET_MEM_TABLE: self._set_mem_table,
            R.VHOST_USER_SET_VRING_NUM: self._set_vring_num,
            R.VHOST_USER_SET_VRING_ADDR: self._set_vring_addr,
            R.VHOST_USER_SET_VRING_BASE: self._set_vring_base,
            R.VHOST_USER_GET_VRING_BASE: self._get_vring_base,
            R.VHOST_USER_SET_VRING_KICK: self._set_vring_kick,
            R.VHOST_USER_SET_VRING_CALL: self._set_vring_call,
            R.VHOST_USER_SET_VRING_ERR: self._set_vring_err,
            R.VHOST_USER_GET_PROTOCOL_FEATURES: self._get_protocol_features,
            R.VHOST_USER_SET_PROTOCOL_FEATURES: self._set_protocol_features,
            R.VHOST_USER_GET_QUEUE_NUM: self._get_queue_num,
            R.VHOST_USER_SET_VRING_ENABLE: self._set_vring_enable,
            R.VHOST_USER_RESET_DEVICE: self._reset_device,
            R.VHOST_USER_GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            R.VHOST_USER_ADD_MEM_REG: self._add_mem_reg,
            R.VHOST_USER_REM_MEM_REG: self._rem_mem_reg,
            R.VHOST_USER_SET_STATUS: self._set_status,
            R.VHOST_USER_GET_STATUS: self._get_status,
            R.VHOST_USER_GET_INFLIGHT_FD: self._get_inflight_fd,
            R.VHOST_USER_SET_INFLIGHT_FD: self._set_inflight_fd,
            R.VHOST_USER_SET_DEVICE_STATE_FD: self._set_device_state_fd,
            R.VHOST_USER_CHECK_DEVICE_STATE: self._check_device_state,
            R.VHOST_USER_GET_CONFIG: self._get_config,
            R.VHOST_USER_SET_CONFIG: self._set_config,
        }

    def __repr__(self) -> str:
        return (
            f"<VhostUserBackend features={self.features:#x} "
            f"protocol={self.protocol_features:#x} status={self.status:#x} {self.memory!r}>"
        )

    # -- entry points -------------------------------------------------------------

    def handle(self, message: Message) -> Message | None:
        """Apply one frontend message; return the reply to send, if any.

        Raises :class:`~.message.MessageError` (malformed) or :class:`BackendError`
        (cannot honour, no way to say so): the caller should drop the connection.
        The message's fds are consumed (kept or closed) in every case.
        """
        try:
            payload = parse_payload(message)
            method = self._dispatch[message.request]
            log.debug("<- %s %s fds=%s", message.name, payload, message.fds)
            try:
                result = method(message, payload)
            except BackendError as exc:
                if message.need_reply and self._reply_ack and not _has_reply(message.request):
                    log.error("%s refused: %s", message.name, exc)
                    return self._reply(message, U64(1))
                raise
        finally:
            # Handlers take ownership of the fds they keep by clearing the list.
            for fd in message.fds:
                _close(fd)
            message.fds.clear()
        if result is not None:
            reply = self._reply(message, result)
            reply.fds, self._reply_fds = self._reply_fds, []  # still ours: not closed by sending
            return reply
        if message.need_reply and self._reply_ack:
            return self._reply(message, U64(0))
        return None

    def kick(self, index: int) -> bool:
        """The kick eventfd of vring ``index`` fired (already drained by the caller).

        Returns whether any chain was answered.
        """
        if 0 <= index < self.num_queues:
            return self.process(self.vrings[index])
        return False

    # -- polling (the event loop's hot path) -------------------------------------------

    def poll(self) -> bool:
        """Serve every started ring the driver added to, without a kick; True if any."""
        served = False
        for vring in self.vrings:
            queue = vring.queue
            if queue is not None and queue.avail_moved():
                served |= self.process(vring)
        return served

    def set_polling(self, polling: bool) -> bool:
        """Start or stop telling drivers not to kick because :meth:`poll` is being called.

        Stopping asks for kicks again and then looks at every ring once more, since a
        driver may have added chains without kicking just before; returns whether
        that served anything (the caller may want to keep polling then).
        """
        self.polling = polling
        served = False
        for vring in self.vrings:
            queue = vring.queue
            if queue is not None:
                queue.kicks_wanted = not polling
                if polling:
                    queue.publish_avail_event()
                else:
                    served |= self.process(vring)
        return served

    def drop_kick(self, index: int) -> None:
        """The kick fd of vring ``index`` is unusable: close it and stop the ring."""
        vring = self.vrings[index]
        self._close_kick(vring)
        vring.drop_queue()
        vring.started = False

    def kick_fds(self) -> dict[int, int]:
        """Kick descriptors to watch, mapped to their vring index."""
        return {v.kick_fd: v.index for v in self.vrings if v.kick_fd is not None}

    def disconnect(self) -> None:
        """The frontend went away: drop all transport state (not device state)."""
        for vring in self.vrings:
            vring.drop_queue()
            self._close_kick(vring)
            vring.close_fds()
        self.vrings = [Vring(i) for i in range(self.num_queues)]
        self.memory.close()
        self.memory = GuestMemory()
        self.device.reset()
        self.features = self.protocol_features = self.status = 0
        self.owner = False
        self._drop_inflight()
        self._end_state_transfer()
        self.polling = False

    # -- ring processing ----------------------------------------------------------

    def process(self, vring: Vring) -> bool:
        """Serve a ring if it is ready; never raises for what the guest did.

        Returns whether any chain was answered.
        """
        queue = vring.queue
        if queue is None:
            queue = self._ready_queue(vring)
            if queue is None:
                return False
        worker = vring.worker
        if worker is None:
            return False
        published = False
        try:
            while True:
                seen = queue.avail_idx
                published |= worker.process()
                # A chain made available while we published avail_event must not wait
                # for a kick that the driver may have decided not to send (when we poll,
                # the next look at the ring finds it anyway).  Chains the worker left
                # on the ring on purpose (a receive queue with nothing to deliver) do
                # not count: only the driver moving the index again does.
                if queue.publish_avail_event() == seen or not queue.kicks_wanted:
                    break
            # With kicks wanted, publish_avail_event ended with a barrier after every
            # store of this pass (used elements, used index, avail_event): the load of
            # the driver's used_event needs no second one.
            if published and queue.needs_notify(barrier=not queue.kicks_wanted):
                self._signal(vring)
        except VirtioError as exc:
            self._break(vring, str(exc))
        return published

    def _ready_queue(self, vring: Vring) -> DeviceQueue | None:
        if vring.queue is not None:
            return vring.queue
        enabled = vring.enabled or not self.features & (1 << VHOST_USER_F_PROTOCOL_FEATURES)
        if (
            vring.broken is not None
            or not vring.started
            or not enabled
            or vring.num == 0
            or vring.addr is None
            or not len(self.memory)
        ):
            return None
        addr = vring.addr
        try:
            layout = RingLayout(
                vring.num,
                self.memory.user_to_guest(addr.desc_user_addr, spec.desc_table_size(vring.num)),
                self.memory.user_to_guest(addr.avail_user_addr, spec.avail_ring_size(vring.num)),
                self.memory.user_to_guest(addr.used_user_addr, spec.used_ring_size(vring.num)),
            )
            vring.queue = DeviceQueue(
                self.memory,
                layout,
                event_idx=bool(self.features & (1 << spec.VIRTIO_RING_F_EVENT_IDX)),
                indirect=bool(self.features & (1 << spec.VIRTIO_RING_F_INDIRECT_DESC)),
                last_avail_idx=vring.base,
            )
            vring.queue.kicks_wanted = not self.polling
        except VirtioError as exc:
            self._break(vring, f"cannot set up the rings: {exc}")
            return None
        if self.inflight is not None and vring.index < self.inflight.num_queues:
            if not self._track(vring, layout):
                return None
        else:
            try:
                vring.worker = self.device.worker(vring.index, vring.queue, lambda: self._interrupt(vring))
            except VirtioError as exc:
                self._break(vring, f"the device refused the ring: {exc}")
                return None
        log.info(
            "vring %d started: size %d, avail index %d, desc %#x avail %#x used %#x",
            vring.index,
            vring.num,
            vring.base,
            layout.desc,
            layout.avail,
            layout.used,
        )
        return vring.queue

    def _track(self, vring: Vring, layout: RingLayout) -> bool:
        """Attach inflight tracking to a ring being started; resume where the last backend was."""
        assert self.inflight is not None and vring.queue is not None
        queue = vring.queue
        try:
            if vring.num != self.inflight.queue_size:
                raise InflightError(
                    f"inflight region is for queue size {self.inflight.queue_size}, ring has {vring.num}"
                )
            tracker = self.inflight.queue(vring.index)
            fresh = tracker.fresh
            resubmit = tracker.recover(queue.used_idx)
        except InflightError as exc:
            self._break(vring, str(exc))
            return False
        if fresh:
            log.info("vring %d: new inflight region, initialised at used index %d",
                     vring.index, queue.used_idx)
        base = (queue.used_idx + len(resubmit)) & 0xFFFF
        if base != queue.last_avail_idx:
            log.info(
                "vring %d: inflight region says avail index %d (frontend said %d)",
                vring.index,
                base,
                queue.last_avail_idx,
            )
            queue.release()
            queue = vring.queue = DeviceQueue(
                self.memory,
                layout,
                event_idx=queue.event_idx,
                indirect=queue.indirect,
                last_avail_idx=base,
            )
        if resubmit:
            log.warning("vring %d: resubmitting inflight chains %s", vring.index, resubmit)
        try:
            vring.worker = self.device.worker(vring.index, queue, lambda: self._interrupt(vring))
            vring.worker.track_inflight(tracker, resubmit)
        except VirtioError as exc:  # e.g. a device that keeps no inflight record
            self._break(vring, f"inflight tracking refused: {exc}")
            return False
        return True

    def _interrupt(self, vring: Vring) -> None:
        """Mid-pass: interrupt now if the driver asked to hear about what is published."""
        if vring.queue is not None and vring.queue.needs_notify(barrier=False):
            self._signal(vring)

    def _signal(self, vring: Vring) -> None:
        if vring.call_fd is None:
            vring.signal_pending = True
            return
        vring.signal_pending = False
        self.interrupts += 1
        try:
            _write(vring.call_fd, _EVENTFD_ONE)
        except BlockingIOError:
            # The counter is at its maximum: the frontend has an interrupt pending
            # already, which is all this write would have said.
            pass
        except OSError as exc:
            log.warning("vring %d: cannot signal the call fd: %s", vring.index, exc)
        self.last_interrupt_ns = _monotonic_ns()

    def _break(self, vring: Vring, reason: str) -> None:
        log.error(
            "vring %d: %s; device needs reset (DEVICE_NEEDS_RESET set, ring stopped)",
            vring.index,
            reason,
        )
        vring.broken = reason
        if vring.queue is not None:
            vring.queue.release()
        vring.queue = None
        vring.worker = None
        self.status |= spec.VIRTIO_CONFIG_S_NEEDS_RESET
        if vring.err_fd is not None:
            with contextlib.suppress(OSError):
                os.write(vring.err_fd, _EVENTFD_ONE)

    def _close_kick(self, vring: Vring) -> None:
        """Close a ring's kick fd, telling the event loop first (see ``kick_closing``)."""
        fd = vring.kick_fd
        if fd is not None:
            vring.kick_fd = None
            self.kick_closing(fd)
            _close(fd)

    def _invalidate(self, vring: Vring) -> None:
        vring.drop_queue()
        vring.broken = None

    def _reset_vrings(self) -> None:
        for vring in self.vrings:
            vring.drop_queue()
            self._close_kick(vring)
            vring.close_fds()
        self.vrings = [Vring(i) for i in range(self.num_queues)]
        self.device.reset()
        self.status &= ~spec.VIRTIO_CONFIG_S_NEEDS_RESET
        # What was in flight belongs to the rings just reset: the frontend brings
        # a new (or reset) region with SET_INFLIGHT_FD before starting them again.
        self._drop_inflight()

    def _drop_inflight(self) -> None:
        if self.inflight is not None:
            self._drop_all_queues()
            self.inflight.close()
            self.inflight = None

    def _end_state_transfer(self) -> None:
        if self._state_load_fd is not None:
            _close(self._state_load_fd)
            self._state_load_fd = None

    # -- helpers --------------------------------------------------------------------

    @property
    def _reply_ack(self) -> bool:
        return bool(self.protocol_features & (1 << _PF.VHOST_USER_PROTOCOL_F_REPLY_ACK))

    def _reply(self, message: Message, payload: Payload) -> Message:
        return Message(message.request, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, payload.encode())

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < self.num_queues:
            raise BackendError(f"vring index {index} out of range (device has {self.num_queues})")
        return self.vrings[index]

    def _map(self, desc: MemoryRegionDescription, fd: int) -> MemoryRegion:
        # A file the frontend can shrink under our mapping turns our next access into
        # SIGBUS, which kills the process: only memfds sealed against shrinking are
        # mapped unless the operator accepted that risk (nsm serve --allow-file-memory).
        hazard = shrink_hazard(fd)
        if hazard == NOT_A_FILE:
            raise BackendError(f"guest memory fd is {hazard}")
        if hazard is not None:
            if not self.allow_file_memory:
                raise BackendError(
                    f"guest memory is {hazard}: the frontend could shrink it and kill this "
                    "backend (SIGBUS); use QEMU's -object memory-backend-memfd,...,share=on "
                    "(sealed by default), or accept the risk with --allow-file-memory"
                )
            log.warning("guest memory is %s: mapped anyway (--allow-file-memory)", hazard)
        try:
            return MemoryRegion.from_fd(
                fd,
                guest_addr=desc.guest_phys_addr,
                size=desc.memory_size,
                user_addr=desc.userspace_addr,
                mmap_offset=desc.mmap_offset,
            )
        except GuestMemoryError as exc:
            raise BackendError(str(exc)) from exc

    def _drop_all_queues(self) -> None:
        for vring in self.vrings:
            vring.drop_queue()

    def _process_all(self) -> None:
        for vring in self.vrings:
            self.process(vring)

    # -- request handlers -------------------------------------------------------------

    def _get_features(self, message: Message, payload: Payload) -> Payload:
        return U64(self.offered_features)

    def _set_features(self, message: Message, payload: Payload) -> None:
        assert isinstance(payload, U64)
        if payload.value & ~self.offered_features:
            raise BackendError(f"features {payload.value & ~self.offered_features:#x} were not offered")
        if not payload.value & (1 << spec.VIRTIO_F_VERSION_1):
            log.warning("frontend did not accept VIRTIO_F_VERSION_1 (legacy is not supported)")
        self.features = payload.value
        self.device.features_acked(payload.value)
        self._drop_all_queues()
        self._process_all()

    def _set_owner(self, message: Message, payload: Payload) -> None:
        self.owner = True

    def _reset_owner(self, message: Message, payload: Payload) -> None:
        # Deprecated; the spec recommends treating it as "disable all rings".
        for vring in self.vrings:
            vring.enabled = False
            vring.drop_queue()

    def _set_mem_table(self, message: Message, payload: Payload) -> None:
        assert isinstance(payload, MemoryTable)
        regions: list[MemoryRegion] = []
        try:
            for desc, fd in zip(payload.regions, message.fds, strict=True):
                regions.append(self._map(desc, fd))
            memory = GuestMemory(regions)
        except (BackendError, GuestMemoryError) as exc:
            for region in regions:
                region.close()
            raise BackendError(f"memory table refused: {exc}") from exc
        self._drop_all_queues()
        self.memory.close()
        self.memory = memory
        log.info("memory table: %s", memory)
        self._process_all()

    def _add_mem_reg(self, message: Message, payload: Payload) -> None:
        assert isinstance(payload, SingleMemoryRegion)
        if len(self.memory) >= MAX_MEM_SLOTS:
            raise BackendError(f"all {MAX_MEM_SLOTS} memory slots are in use")
        region = self._map(payload.region, message.fds[0])
        try:
            self.memory.add(region)
        except GuestMemoryError as exc:
            region.close()
            raise BackendError(str(exc)) from exc
        log.info("memory region added: %s", self.memory)
        self._process_all()

    def _rem_mem_reg(self, message: Message, payload: Payload) -> None:
        assert isinstance(payload, SingleMemoryRegion)
        r = payload.region
        self._drop_all_queues()
        try:
            region = self.memory.remove(r.guest_phys_addr, r.memory_size, r.userspace_addr)
        except GuestMemoryError as exc:
            raise BackendError(str(exc)) from exc
        region.close()
        log.info("memory region removed: %s", self.memory)
        self._process_all()

    def _set_vring_num(self, message: Message, payload: Payload) -> None:
        assert isinstance(payload, VringState)
        vring = self._vring(payload.index)
        num = payload.num
        if not 1 <= num <= self.max_queue_size or num & (num - 1):
            raise BackendError(f"vring size {num} is not a power of two in 1..{self.max_queue_size}")
        self._invalidate(vring)
        vring.num = num

    def _set_vring_addr(self, message: Message, payload: Payload) -> None:
        assert isinstance(payload, VringAddr)
        vring = self._vring(payload.index)
        self._invalidate(vring)
        vring.addr = payload
        self.process(vring)

    def _set_vring_base(self, message: Message, payload: Payload) -> None:
        assert isinstance(payload, VringState)
        vring = self._vring(payload.index)
        if payload.num > 0xFFFF:
            raise BackendError(f"vring base {payload.num} does not fit a split ring index")
        self._invalidate(vring)
        vring.base = payload.num

    def _get_vring_base(self, message: Message, payload: Payload) -> Payload:
        assert isinstance(payload, VringState)
        vring = self._vring(payload.index)
        vring.drop_queue()
        vring.started = False
        self._close_kick(vring)
        log.info("vring %d stopped at avail index %d", vring.index, vring.base)
        return VringState(vring.index, vring.base)

    def _set_vring_kick(self, message: Message, payload: Payload) -> None:
        assert isinstance(payload, VringFd)
        vring = self._vring(payload.index)
        if payload.nofd:
            raise BackendError("polling (no kick fd) is not supported")
        self._close_kick(vring)
        vring.kick_fd = _nonblocking(message.fds.pop())
        vring.started = True
        self.process(vring)

    def _set_vring_call(self, message: Message, payload: Payload) -> None:
        assert isinstance(payload, VringFd)
        vring = self._vring(payload.index)
        if vring.call_fd is not None:
            _close(vring.call_fd)
        vring.call_fd = None if payload.nofd else _nonblocking(message.fds.pop())
        if vring.signal_pending and vring.call_fd is not None:
            self._signal(vring)

    def _set_vring_err(self, message: Message, payload: Payload) -> None:
        assert isinstance(payload, VringFd)
        vring = self._vring(payload.index)
        if vring.err_fd is not None:
            _close(vring.err_fd)
        vring.err_fd = None if payload.nofd else _nonblocking(message.fds.pop())

    def _get_protocol_features(self, message: Message, payload: Payload) -> Payload:
        return U64(self.offered_protocol_features)

    def _set_protocol_features(self, message: Message, payload: Payload) -> None:
        assert isinstance(payload, U64)
        if payload.value & ~self.offered_protocol_features:
            raise BackendError(
                f"protocol features {payload.value & ~self.offered_protocol_features:#x} were not offered"
            )
        self.protocol_features = payload.value

    def _get_queue_num(self, message: Message, payload: Payload) -> Payload:
        return U64(self.num_queues)

    def _set_vring_enable(self, message: Message, payload: Payload) -> None:
        assert isinstance(payload, VringState)
        vring = self._vring(payload.index)
        if payload.num not in (0, 1):
            raise BackendError(f"SET_VRING_ENABLE with {payload.num} (0 or 1 expected)")
        vring.enabled = bool(payload.num)
        if vring.enabled:
            self.process(vring)
        else:
            vring.drop_queue()

    def _reset_device(self, message: Message, payload: Payload) -> None:
        self._reset_vrings()
        self.features = 0
        self.status = 0
        log.info("device reset (transport state only; device state kept)")

    def _get_max_mem_slots(self, message: Message, payload: Payload) -> Payload:
        return U64(MAX_MEM_SLOTS)

    def _set_status(self, message: Message, payload: Payload) -> None:
        assert isinstance(payload, U64)
        if payload.value > 0xFF:
            raise BackendError(f"device status {payload.value:#x} does not fit 8 bits")
        if payload.value == 0:
            self._reset_vrings()
            self.status = 0
            log.info("virtio reset through SET_STATUS (device state kept)")
            return
        self.status = payload.value | (self.status & spec.VIRTIO_CONFIG_S_NEEDS_RESET)
        self._process_all()

    def _get_status(self, message: Message, payload: Payload) -> Payload:
        return U64(self.status)

    def _require(self, feature: ProtocolFeature, message: Message) -> None:
        if not self.protocol_features & (1 << feature):
            raise BackendError(f"{message.name} without {feature.name}")

    def _get_inflight_fd(self, message: Message, payload: Payload) -> Payload:
        assert isinstance(payload, Inflight)
        self._require(_PF.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, message)
        self._check_inflight_geometry(payload)
        try:
            region = InflightRegion.create(payload.num_queues, payload.queue_size)
        except (InflightError, OSError) as exc:
            raise BackendError(f"cannot create an inflight region: {exc}") from exc
        self._drop_inflight()
        self.inflight = region
        self._reply_fds = [region.fd]
        log.info("inflight region created: %r", region)
        return Inflight(region.mmap_size, 0, region.num_queues, region.queue_size)

    def _set_inflight_fd(self, message: Message, payload: Payload) -> None:
        assert isinstance(payload, Inflight)
        self._require(_PF.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, message)
        self._check_inflight_geometry(payload)
        hazard = shrink_hazard(message.fds[0])
        if hazard is not None:
            # Ours (GET_INFLIGHT_FD) are sealed; a region that can shrink could kill us.
            raise BackendError(f"inflight region refused: it is {hazard}")
        fd = message.fds.pop()
        try:
            region = InflightRegion.from_fd(
                fd, payload.mmap_size, payload.mmap_offset, payload.num_queues, payload.queue_size
            )
        except InflightError as exc:
            raise BackendError(f"inflight region refused: {exc}") from exc
        self._drop_inflight()
        self.inflight = region
        log.info("inflight region set: %r", region)
        self._process_all()

    def _get_config(self, message: Message, payload: Payload) -> Payload:
        assert isinstance(payload, DeviceConfig)
        self._require(_PF.VHOST_USER_PROTOCOL_F_CONFIG, message)
        try:
            data = self.device.get_config(payload.offset, payload.size)
            if len(data) != payload.size:
                raise ConfigError(f"device returned {len(data)} bytes of config for {payload.size}")
        except ConfigError as exc:
            log.error("GET_CONFIG %d+%d refused: %s", payload.offset, payload.size, exc)
            return DeviceConfig(payload.offset, 0, payload.flags, b"")  # size 0: failed
        return DeviceConfig(payload.offset, payload.size, payload.flags, bytes(data))

    def _set_config(self, message: Message, payload: Payload) -> None:
        assert isinstance(payload, DeviceConfig)
        self._require(_PF.VHOST_USER_PROTOCOL_F_CONFIG, message)
        try:
            self.device.set_config(payload.offset, payload.data)
        except ConfigError as exc:
            raise BackendError(f"SET_CONFIG {payload.offset}+{payload.size} refused: {exc}") from exc

    def _check_inflight_geometry(self, payload: Inflight) -> None:
        """An inflight region covers at most the device's queues, at its largest ring size."""
        if not 1 <= payload.num_queues <= self.num_queues:
            raise BackendError(
                f"inflight region for {payload.num_queues} queues (device has {self.num_queues})"
            )
        size = payload.queue_size
        if not 1 <= size <= self.max_queue_size or size & (size - 1):
            raise BackendError(
                f"inflight region for queue size {size} (a power of two up to {self.max_queue_size})"
            )

    def _set_device_state_fd(self, message: Message, payload: Payload) -> Payload:
        assert isinstance(payload, DeviceStateTransfer)
        self._require(_PF.VHOST_USER_PROTOCOL_F_DEVICE_STATE, message)
        assert self.device_state is not None
        self._end_state_transfer()
        fd = message.fds.pop()
        self._state_error = None
        try:
            if payload.phase != VHOST_TRANSFER_STATE_PHASE_STOPPED:
                raise BackendError(f"migration phase {payload.phase} is not supported")
            if any(v.started for v in self.vrings):
                raise BackendError("device state transfer while a ring is started (device not suspended)")
            if payload.direction == VHOST_TRANSFER_STATE_DIRECTION_SAVE:
                self._save_state(fd)
            elif payload.direction == VHOST_TRANSFER_STATE_DIRECTION_LOAD:
                self._state_load_fd, fd = _nonblocking(fd), -1
                self._state_error = "no CHECK_DEVICE_STATE yet"
            else:
                raise BackendError(f"transfer direction {payload.direction} is unknown")
        except BackendError as exc:
            log.error("SET_DEVICE_STATE_FD refused: %s", exc)
            return U64(VHOST_USER_DEVICE_STATE_NOFD | 1)
        finally:
            if fd >= 0:
                _close(fd)
        return U64(VHOST_USER_DEVICE_STATE_NOFD)

    def _save_state(self, fd: int) -> None:
        assert self.device_state is not None
        try:
            data = self.device_state.save_state()
        except Exception as exc:
            self._state_error = f"saving the device state failed: {exc}"
            log.error("%s", self._state_error)
            return  # closing the fd ends the (empty) transfer; CHECK reports the failure
        # The frontend reads only after our reply: the state must fit in the channel
        # now (a pipe holds 64 KiB; ours is a few KiB), the event loop cannot wait.
        try:
            os.set_blocking(fd, False)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError as exc:
            self._state_error = f"writing the device state failed: {exc}"
            log.error("%s", self._state_error)
        else:
            log.info("device state saved (%d bytes)", len(data))

    def _check_device_state(self, message: Message, payload: Payload) -> Payload:
        self._require(_PF.VHOST_USER_PROTOCOL_F_DEVICE_STATE, message)
        if self._state_load_fd is not None:
            self._state_error = self._load_state(self._state_load_fd)
            self._end_state_transfer()
        error, self._state_error = self._state_error, None
        if error is not None:
            log.error("device state transfer failed: %s", error)
            return U64(1)
        return U64(0)

    def _load_state(self, fd: int) -> str | None:
        """Read a state to its end and apply it; the reason it failed, or None."""
        assert self.device_state is not None
        chunks: list[bytes] = []
        total = 0
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + STATE_LOAD_TIMEOUT
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return f"the frontend did not finish sending the state within {STATE_LOAD_TIMEOUT} s"
                if not poller.poll(min(left, SLICE) * 1000):
                    if self.interrupted():
                        return "the backend is stopping"
                    continue
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue  # the frontend holds the pipe too and drained it meanwhile
                if not chunk:
                    break
                total += len(chunk)
                if total > MAX_DEVICE_STATE:
                    return f"device state larger than {MAX_DEVICE_STATE} bytes"
                chunks.append(chunk)
        except OSError as exc:
            return f"reading the device state failed: {exc}"
        if any(v.started for v in self.vrings):  # started since SET_DEVICE_STATE_FD
            return "a ring was started during the transfer; load refused"
        try:
            self.device_state.load_state(b"".join(chunks))
        except Exception as exc:
            return f"device state refused: {exc}"
        log.info("device state loaded (%d bytes)", total)
        return None


def _has_reply(request: int) -> bool:
    return request in _REPLYING


_REPLYING = frozenset(
    {
        FrontendRequest.VHOST_USER_GET_FEATURES,
        FrontendRequest.VHOST_USER_GET_PROTOCOL_FEATURES,
        FrontendRequest.VHOST_USER_GET_VRING_BASE,
        FrontendRequest.VHOST_USER_GET_QUEUE_NUM,
        FrontendRequest.VHOST_USER_GET_MAX_MEM_SLOTS,
        FrontendRequest.VHOST_USER_GET_STATUS,
        FrontendRequest.VHOST_USER_GET_INFLIGHT_FD,
        FrontendRequest.VHOST_USER_SET_DEVICE_STATE_FD,
        FrontendRequest.VHOST_USER_CHECK_DEVICE_STATE,
        FrontendRequest.VHOST_USER_GET_CONFIG,
    }
)
