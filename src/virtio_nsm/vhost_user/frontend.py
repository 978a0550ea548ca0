"""A Python virtio driver's control plane, speaking vhost-user to a backend (our frontend).

Theory of operation
-------------------
:class:`VhostUserFrontend` plays the part QEMU and the guest kernel play together,
for any device: it connects to a vhost-user backend, negotiates features like
QEMU does (``GET_FEATURES``, ``GET/SET_PROTOCOL_FEATURES``, ``GET_QUEUE_NUM``,
``SET_OWNER``, ``SET_FEATURES``), shares one memfd as "guest RAM"
(``SET_MEM_TABLE``: the rings of every queue, then a buffer area of
``buffer_size`` bytes at :attr:`~VhostUserFrontend.buffers` for the device's
protocol to use), programs the vrings (``SET_VRING_NUM/BASE/ADDR/CALL/ERR/KICK``,
``SET_VRING_ENABLE``), and sets ``DRIVER_OK`` when the STATUS protocol feature is
there.  With REPLY_ACK every setting is acknowledged before the next one goes
out.  The configuration space is read and written with ``GET_CONFIG`` /
``SET_CONFIG`` (:meth:`~VhostUserFrontend.get_config`, :meth:`~VhostUserFrontend.set_config`).

What goes on the rings is the device protocol's business: a subclass (the NSM's:
:class:`virtio_nsm.nsm.frontend.NsmFrontend`) adds chains to :attr:`queues`,
:meth:`~VhostUserFrontend.kick` s and collects used entries, waiting with
:meth:`~VhostUserFrontend.wait_interrupt`.  While waiting, the call eventfds, the
err eventfds and the socket are watched: an err signal (the backend found a ring
broken) or the backend hanging up turns into :class:`VhostUserError`
(:class:`BackendDisconnected` for a hang-up) instead of a hang.  The call eventfds
are watched edge-triggered and never read: each interrupt (eventfd write) wakes one
wait, and a wake-up costs one system call instead of two.

Surviving a backend crash (``inflight=True``): like QEMU with a reconnecting
chardev, the frontend asks the backend for an inflight region
(``VHOST_USER_GET_INFLIGHT_FD``), keeps it, and hands it to every backend it
connects to (``SET_INFLIGHT_FD``).  :meth:`~VhostUserFrontend.reconnect` connects
again (waiting for a restarted backend to listen), negotiates again and programs
the *same* guest memory, rings and eventfds, so chains in flight stay in flight:
the new backend finds them in the inflight region and serves them.

Migration (``VHOST_USER_PROTOCOL_F_DEVICE_STATE``): :meth:`~VhostUserFrontend.save_device_state`
and :meth:`~VhostUserFrontend.load_device_state` move the backend's state through a
pipe while the rings are stopped (:meth:`~VhostUserFrontend.get_vring_base`;
:meth:`~VhostUserFrontend.start_ring` starts them again).

"Guest physical" and "user" addresses are deliberately different here
(:data:`GUEST_BASE`, :data:`USER_BASE`) so that a backend that confuses them fails.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import socket
import time
from collections.abc import Sequence

from ..errors import DeviceNotFoundError, TransportError
from ..virtio import spec
from ..virtio.memory import GuestMemory, MemoryRegion, VirtioError
from ..virtio.queue import DriverQueue, RingLayout
from .connection import Connection, ConnectionClosed
from .message import (
    U64,
    VHOST_TRANSFER_STATE_DIRECTION_LOAD,
    VHOST_TRANSFER_STATE_DIRECTION_SAVE,
    VHOST_TRANSFER_STATE_PHASE_STOPPED,
    VHOST_USER_DEVICE_STATE_NOFD,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    DeviceConfig,
    DeviceStateTransfer,
    FrontendRequest,
    Inflight,
    MemoryRegionDescription,
    MemoryTable,
    Message,
    MessageError,
    ProtocolFeature,
    VringAddr,
    VringFd,
    VringState,
)

__all__ = [
    "GUEST_BASE",
    "USER_BASE",
    "BackendDisconnected",
    "VhostUserError",
    "VhostUserFrontend",
]

GUEST_BASE = 0x4000_0000
USER_BASE = 0x7F12_3400_0000
_PAGE = 0x1000

_R = FrontendRequest
_PF = ProtocolFeature
_WANTED_PROTOCOL = (
    1 << _PF.VHOST_USER_PROTOCOL_F_MQ
    | 1 << _PF.VHOST_USER_PROTOCOL_F_REPLY_ACK
    | 1 << _PF.VHOST_USER_PROTOCOL_F_STATUS
    | 1 << _PF.VHOST_USER_PROTOCOL_F_RESET_DEVICE
)
_DRIVER_OK = (
    spec.VIRTIO_CONFIG_S_ACKNOWLEDGE
    | spec.VIRTIO_CONFIG_S_DRIVER
    | spec.VIRTIO_CONFIG_S_FEATURES_OK
    | spec.VIRTIO_CONFIG_S_DRIVER_OK
)


class VhostUserError(TransportError):
    """The backend failed, hung up, or broke the protocol or the ring rules."""


class BackendDisconnected(VhostUserError):
    """The backend closed the connection (or died): :meth:`VhostUserFrontend.reconnect` may help."""


class VhostUserFrontend:
    """Drive a vhost-user backend through real split virtqueues (the control plane).

    ``num_queues`` rings of ``queue_size`` descriptors and ``buffer_size`` bytes of
    buffer space at :attr:`buffers`; ``device_features``: the device feature bits
    to accept if offered.  ``inflight=True`` asks for the backend's inflight region
    and keeps it, so that :meth:`reconnect` can hand a restarted backend the chains
    still in flight; ``start=False`` sets everything up but the rings (see
    :meth:`start_ring`), as a migration destination does before :meth:`load_device_state`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        num_queues: int = 1,
        queue_size: int = 64,
        buffer_size: int = 0,
        device_features: int = 0,
        timeout: float = 120.0,
        event_idx: bool = True,
        indirect: bool = True,
        status: bool = True,
        inflight: bool = False,
        start: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.buffer_size = buffer_size
        self.device_features = device_features
        self._options = {"event_idx": event_idx, "indirect": indirect, "status": status}
        self._want_inflight = inflight
        #: The inflight region (fd, size) the backend gave us, kept across reconnects.
        self.inflight_fd: int | None = None
        self._inflight_size = 0
        self.reconnects = 0
        self._fds: list[int] = []
        self._memory: GuestMemory | None = None
        self._conn: Connection | None = None
        self._conn = self._connect()
        try:
            self._setup(start=start)
        except BaseException:
            self.close()
            raise

    def _connect(self) -> Connection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise DeviceNotFoundError(
                errno.ENOENT,
                f"no vhost-user backend listening at {self.path} "
                f"(start one with `nsm serve --vhost-user {self.path}`)",
            ) from exc
        except OSError as exc:
            sock.close()
            raise VhostUserError(f"cannot connect to {self.path}: {exc}") from exc
        return Connection(sock, timeout=self.timeout)

    def __repr__(self) -> str:
        return f"<VhostUserFrontend {self.path!r} {'open' if self._conn else 'closed'}>"

    def __enter__(self) -> VhostUserFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- control plane ----------------------------------------------------------------

    def request(self, message: Message) -> Message | None:
        """Send one message; return its reply (explicit, or the REPLY_ACK u64)."""
        conn = self._connection()
        expects = message.request in _EXPLICIT_REPLY or message.need_reply
        try:
            conn.send_message(message)
            if not expects:
                return None
            reply = conn.recv_message()
        except (OSError, MessageError, ConnectionClosed) as exc:
            raise BackendDisconnected(f"{message.name}: backend connection failed: {exc}") from exc
        for fd in reply.fds:
            if message.request == _R.VHOST_USER_GET_INFLIGHT_FD and self.inflight_fd is None:
                self.inflight_fd = fd  # the one descriptor we keep (see _set_inflight)
                self._fds.append(fd)
            else:
                os.close(fd)
        if reply.request != message.request or reply.flags != (VHOST_USER_VERSION | VHOST_USER_REPLY_MASK):
            raise VhostUserError(
                f"{message.name}: unexpected reply (request {reply.request}, flags {reply.flags:#x})"
            )
        if message.request not in _EXPLICIT_REPLY:
            if len(reply.payload) != 8:
                raise VhostUserError(f"{message.name}: malformed acknowledgement")
            if U64.decode(reply.payload).value != 0:
                raise VhostUserError(f"{message.name}: refused by the backend")
        return reply

    def _get_u64(self, request: FrontendRequest) -> int:
        reply = self.request(Message(request))
        assert reply is not None
        if len(reply.payload) != 8:
            raise VhostUserError(f"{request.name}: reply of {len(reply.payload)} bytes")
        return U64.decode(reply.payload).value

    def _set(self, request: FrontendRequest, payload: bytes, fds: Sequence[int] = ()) -> None:
        flags = VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY_MASK if self.reply_ack else 0)
        self.request(Message(request, flags, payload, list(fds)))

    def _setup(self, *, start: bool) -> None:
        self._negotiate()
        self._create_memory()
        if start:
            self.start_ring()

    def _negotiate(self) -> int:
        """Features, protocol features, owner, inflight region; returns the acked features."""
        event_idx, indirect, status = (self._options[k] for k in ("event_idx", "indirect", "status"))
        self.reply_ack = False
        features = self._get_u64(_R.VHOST_USER_GET_FEATURES)
        if not features & (1 << spec.VIRTIO_F_VERSION_1):
            raise VhostUserError("backend does not offer VIRTIO_F_VERSION_1")
        self.protocol_features = 0
        if features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            offered = self._get_u64(_R.VHOST_USER_GET_PROTOCOL_FEATURES)
            wanted = (
                _WANTED_PROTOCOL
                | 1 << _PF.VHOST_USER_PROTOCOL_F_DEVICE_STATE
                | 1 << _PF.VHOST_USER_PROTOCOL_F_CONFIG
            )
            if self._want_inflight:
                wanted |= 1 << _PF.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD
            self.protocol_features = offered & wanted
            if not status:
                self.protocol_features &= ~(1 << _PF.VHOST_USER_PROTOCOL_F_STATUS)
            self.request(
                Message(
                    _R.VHOST_USER_SET_PROTOCOL_FEATURES,
                    payload=U64(self.protocol_features).encode(),
                )
            )
            self.reply_ack = bool(self.protocol_features & (1 << _PF.VHOST_USER_PROTOCOL_F_REPLY_ACK))
            if self.protocol_features & (1 << _PF.VHOST_USER_PROTOCOL_F_MQ):
                queues = self._get_u64(_R.VHOST_USER_GET_QUEUE_NUM)
                if queues < self.num_queues:
                    raise VhostUserError(f"backend supports {queues} queues ({self.num_queues} wanted)")
        self._set(_R.VHOST_USER_SET_OWNER, b"")
        acked = features & (
            1 << spec.VIRTIO_F_VERSION_1
            | 1 << VHOST_USER_F_PROTOCOL_FEATURES
            | (1 << spec.VIRTIO_RING_F_EVENT_IDX if event_idx else 0)
            | (1 << spec.VIRTIO_RING_F_INDIRECT_DESC if indirect else 0)
            | self.device_features
        )
        self.features = acked
        self._set(_R.VHOST_USER_SET_FEATURES, U64(acked).encode())
        if self._want_inflight:
            self._set_inflight()
        return features

    @property
    def inflight(self) -> bool:
        """Whether the backend tracks inflight chains in a region we keep."""
        return bool(self.protocol_features & (1 << _PF.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD))

    def _set_inflight(self) -> None:
        if not self.inflight:
            raise VhostUserError("the backend does not offer VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD")
        if self.inflight_fd is None:
            # First connection: the backend makes the region, we keep it for its successors.
            reply = self.request(
                Message(
                    _R.VHOST_USER_GET_INFLIGHT_FD,
                    payload=Inflight(0, 0, self.num_queues, self.queue_size).encode(),
                )
            )
            assert reply is not None
            try:
                region = Inflight.decode(reply.payload)
            except MessageError as exc:
                raise VhostUserError(f"GET_INFLIGHT_FD: {exc}") from exc
            if self.inflight_fd is None or region.mmap_size == 0:
                raise VhostUserError("GET_INFLIGHT_FD: the backend returned no region")
            self._inflight_size = region.mmap_size
        payload = Inflight(self._inflight_size, 0, self.num_queues, self.queue_size).encode()
        self._set(_R.VHOST_USER_SET_INFLIGHT_FD, payload, [self.inflight_fd])

    def _create_memory(self) -> None:
        acked = self.features
        # Guest RAM: one sealed memfd holding every ring (each page-aligned), then the buffers.
        layouts: list[RingLayout] = []
        addr = GUEST_BASE
        for _ in range(self.num_queues):
            layout = RingLayout.contiguous(self.queue_size, addr)
            layouts.append(layout)
            addr = -(-layout.end // _PAGE) * _PAGE
        #: Guest address of the buffer area (``buffer_size`` bytes) after the rings.
        self.buffers = addr
        size = max(_PAGE, addr - GUEST_BASE + -(-self.buffer_size // _PAGE) * _PAGE)
        memfd = os.memfd_create("virtio-nsm-frontend", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self._fds.append(memfd)
        os.ftruncate(memfd, size)
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        region = MemoryRegion.from_fd(
            memfd, guest_addr=GUEST_BASE, size=size, user_addr=USER_BASE, mmap_offset=0
        )
        self._memory = GuestMemory([region])
        self._memfd, self._memsize = memfd, size
        self._send_mem_table()
        self._layouts = layouts
        self.queues = [
            DriverQueue(
                self._memory,
                layout,
                event_idx=bool(acked & (1 << spec.VIRTIO_RING_F_EVENT_IDX)),
                indirect=bool(acked & (1 << spec.VIRTIO_RING_F_INDIRECT_DESC)),
            )
            for layout in layouts
        ]
        flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK
        self.call_fds = [os.eventfd(0, flags) for _ in layouts]
        self.err_fds = [os.eventfd(0, flags) for _ in layouts]
        self.kick_fds = [os.eventfd(0, flags) for _ in layouts]
        self._fds += self.call_fds + self.err_fds + self.kick_fds
        self._poller = select.epoll()
        for fd in self.call_fds:
            self._poller.register(fd, select.EPOLLIN | select.EPOLLET)
        for fd in (*self.err_fds, self._connection().sock.fileno()):
            self._poller.register(fd, select.EPOLLIN)

    @property
    def queue(self) -> DriverQueue:
        """Queue 0."""
        return self.queues[0]

    @property
    def kick_fd(self) -> int:
        return self.kick_fds[0]

    @property
    def call_fd(self) -> int:
        return self.call_fds[0]

    @property
    def err_fd(self) -> int:
        return self.err_fds[0]

    def _send_mem_table(self) -> None:
        table = MemoryTable((MemoryRegionDescription(GUEST_BASE, self._memsize, USER_BASE, 0),))
        self._set(_R.VHOST_USER_SET_MEM_TABLE, table.encode(), [self._memfd])

    def start_ring(self) -> None:
        """Program and start every vring (again, after :meth:`get_vring_base` or a reconnect).

        Each ring resumes where the driver sees it: at ``used->idx``, so whatever the
        backend took and never returned is made available to it again (with an
        inflight region, the backend knows better and resubmits it from there).
        """

        def uva(gpa: int) -> int:
            return gpa - GUEST_BASE + USER_BASE

        for index, layout in enumerate(self._layouts):
            queue = self.queues[index]
            self._set(_R.VHOST_USER_SET_VRING_NUM, VringState(index, self.queue_size).encode())
            self._set(_R.VHOST_USER_SET_VRING_BASE, VringState(index, queue.used_idx).encode())
            self._set(
                _R.VHOST_USER_SET_VRING_ADDR,
                VringAddr(index, 0, uva(layout.desc), uva(layout.used), uva(layout.avail), 0).encode(),
            )
            self._set(_R.VHOST_USER_SET_VRING_CALL, VringFd(index, False).encode(), [self.call_fds[index]])
            self._set(_R.VHOST_USER_SET_VRING_ERR, VringFd(index, False).encode(), [self.err_fds[index]])
            self._set(_R.VHOST_USER_SET_VRING_KICK, VringFd(index, False).encode(), [self.kick_fds[index]])
            if self.features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
                self._set(_R.VHOST_USER_SET_VRING_ENABLE, VringState(index, 1).encode())
        if self.protocol_features & (1 << _PF.VHOST_USER_PROTOCOL_F_STATUS):
            self._set(_R.VHOST_USER_SET_STATUS, U64(_DRIVER_OK).encode())

    def reconnect(self, timeout: float = 30.0) -> None:
        """Connect to a (restarted) backend and hand it the same memory, ring and region.

        Waits up to ``timeout`` seconds for a backend to listen and complete the set-up
        (a backend that dies during it is waited for again).  Requests in flight stay
        in flight; collect them as usual.
        """
        deadline = time.monotonic() + timeout
        self._hang_up()
        while True:
            try:
                self._conn = self._connect()
                self._poller.register(self._conn.sock.fileno(), select.EPOLLIN)
                self._negotiate()
                self._send_mem_table()
                self.start_ring()
            except (DeviceNotFoundError, VhostUserError) as exc:
                self._hang_up()
                if time.monotonic() > deadline:
                    raise VhostUserError(f"no backend to reconnect to at {self.path}: {exc}") from exc
                time.sleep(0.01)
                continue
            self.reconnects += 1
            for index in range(self.num_queues):
                self.kick(index)
            return

    def _hang_up(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._poller.unregister(self._conn.sock.fileno())
            self._conn.close()
            self._conn = None

    # -- migration --------------------------------------------------------------------

    def _device_state_fd(self, direction: int, fd: int) -> int | None:
        if not self.protocol_features & (1 << _PF.VHOST_USER_PROTOCOL_F_DEVICE_STATE):
            raise VhostUserError("the backend does not offer VHOST_USER_PROTOCOL_F_DEVICE_STATE")
        conn = self._connection()
        payload = DeviceStateTransfer(direction, VHOST_TRANSFER_STATE_PHASE_STOPPED).encode()
        message = Message(_R.VHOST_USER_SET_DEVICE_STATE_FD, payload=payload, fds=[fd])
        try:
            conn.send_message(message)
            reply = conn.recv_message()
        except (OSError, MessageError, ConnectionClosed) as exc:
            raise BackendDisconnected(f"SET_DEVICE_STATE_FD: backend connection failed: {exc}") from exc
        if reply.request != message.request or len(reply.payload) != 8:
            for extra in reply.fds:
                os.close(extra)
            raise VhostUserError("SET_DEVICE_STATE_FD: malformed reply")
        value = U64.decode(reply.payload).value
        if value & 0xFF:
            for extra in reply.fds:
                os.close(extra)
            raise VhostUserError(f"SET_DEVICE_STATE_FD refused by the backend (error {value & 0xFF})")
        if value & VHOST_USER_DEVICE_STATE_NOFD:
            for extra in reply.fds:
                os.close(extra)
            return None
        if len(reply.fds) != 1:
            raise VhostUserError("SET_DEVICE_STATE_FD: backend channel announced but not sent")
        return reply.fds[0]

    def _check_device_state(self) -> None:
        if self._get_u64(_R.VHOST_USER_CHECK_DEVICE_STATE) != 0:
            raise VhostUserError("CHECK_DEVICE_STATE: the backend reports a failed transfer")

    def save_device_state(self) -> bytes:
        """The backend's device state (the ring must be stopped: :meth:`get_vring_base`)."""
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            theirs = self._device_state_fd(VHOST_TRANSFER_STATE_DIRECTION_SAVE, w)
            os.close(w)
            w = -1
            if theirs is not None:
                os.close(r)
                r = theirs
            chunks = []
            while True:
                if not select.select([r], [], [], self.timeout)[0]:
                    raise VhostUserError(f"device state not sent within {self.timeout} s")
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            for fd in (r, w):
                if fd >= 0:
                    os.close(fd)
        self._check_device_state()
        return b"".join(chunks)

    def load_device_state(self, data: bytes) -> None:
        """Give the backend a saved state (the ring must be stopped, or not yet started)."""
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            # The backend reads only when asked to check, after we closed our end.
            if len(data) > 65536:
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, len(data))
            theirs = self._device_state_fd(VHOST_TRANSFER_STATE_DIRECTION_LOAD, r)
            os.close(r)
            r = -1
            if theirs is not None:
                os.close(w)
                w = theirs
            view = memoryview(data)
            while view:
                view = view[os.write(w, view) :]
        finally:
            for fd in (r, w):
                if fd >= 0:
                    os.close(fd)
        self._check_device_state()

    def get_status(self) -> int:
        """The backend's device status (needs the STATUS protocol feature)."""
        if not self.protocol_features & (1 << _PF.VHOST_USER_PROTOCOL_F_STATUS):
            raise VhostUserError("the STATUS protocol feature was not negotiated")
        return self._get_u64(_R.VHOST_USER_GET_STATUS)

    def get_vring_base(self, index: int = 0) -> int:
        """Stop vring ``index`` (``GET_VRING_BASE``) and return the backend's next avail index."""
        payload = VringState(index, 0).encode()
        reply = self.request(Message(_R.VHOST_USER_GET_VRING_BASE, payload=payload))
        assert reply is not None
        return VringState.decode(reply.payload).num

    def close(self) -> None:
        """Hang up and release the shared memory and eventfds.  Safe to call twice."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        for queue in getattr(self, "queues", ()):
            queue.release()
        if self._memory is not None:
            self._memory.close()
            self._memory = None
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        poller = getattr(self, "_poller", None)
        if poller is not None:
            poller.close()

    def _connection(self) -> Connection:
        if self._conn is None:
            raise VhostUserError("the frontend is closed")
        return self._conn

    @property
    def memory(self) -> GuestMemory:
        if self._memory is None:
            raise VhostUserError("the frontend is closed")
        return self._memory

    # -- configuration space ------------------------------------------------------------

    def get_config(self, offset: int, size: int) -> bytes:
        """Read ``size`` bytes of the device's configuration space (``GET_CONFIG``)."""
        if not self.protocol_features & (1 << _PF.VHOST_USER_PROTOCOL_F_CONFIG):
            raise VhostUserError("the backend does not offer VHOST_USER_PROTOCOL_F_CONFIG")
        payload = DeviceConfig(offset, size, 0, bytes(size)).encode()
        reply = self.request(Message(_R.VHOST_USER_GET_CONFIG, payload=payload))
        assert reply is not None
        try:
            config = DeviceConfig.decode(reply.payload)
        except MessageError as exc:
            raise VhostUserError(f"GET_CONFIG: {exc}") from exc
        if config.size != size:
            raise VhostUserError(f"GET_CONFIG {offset}+{size}: refused by the backend")
        return config.data

    def set_config(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` of the device's configuration space (``SET_CONFIG``)."""
        if not self.protocol_features & (1 << _PF.VHOST_USER_PROTOCOL_F_CONFIG):
            raise VhostUserError("the backend does not offer VHOST_USER_PROTOCOL_F_CONFIG")
        self._set(_R.VHOST_USER_SET_CONFIG, DeviceConfig(offset, len(data), 0, data).encode())

    # -- data plane -------------------------------------------------------------------

    def kick(self, index: int = 0) -> None:
        """Notify the backend that queue ``index`` has new chains."""
        os.eventfd_write(self.kick_fds[index], 1)

    def wait_interrupt(self) -> list[int]:
        """Wait for an interrupt; return the queues that were interrupted.

        Each interrupt (a write to a call eventfd) ends one wait; the eventfds are not
        drained (edge-triggered, see the module docstring), so look at the used ring
        before waiting again.  Raises :class:`VhostUserError` on an err signal or after
        ``timeout`` seconds, :class:`BackendDisconnected` if the backend hangs up.
        """
        if self._conn is None:
            raise VhostUserError("the frontend is closed")
        return self._interrupted(self._poller.poll(self.timeout))

    def _interrupted(self, events: list[tuple[int, int]]) -> list[int]:
        """The queues interrupted according to ``events`` (one wait's report); raises as
        :meth:`wait_interrupt` does.  For a subclass that waits on ``_poller`` itself."""
        if not events:
            raise VhostUserError(f"no response from the device within {self.timeout} s")
        interrupted: list[int] = []
        call_fds = self.call_fds
        for fd, _ in events:
            if fd in call_fds:
                interrupted.append(call_fds.index(fd))
            elif fd in self.err_fds:
                raise VhostUserError(
                    f"the backend reported a vring error (vring {self.err_fds.index(fd)}; device needs reset)"
                )
            elif fd == self._connection().sock.fileno():
                raise BackendDisconnected("the backend closed the connection")
        return interrupted

    def wait_used(self, count: int, index: int = 0) -> list[tuple[int, int]]:
        """Collect ``count`` used elements of queue ``index``, waiting for interrupts as needed.

        For driving a ring by hand (tests, simple devices).
        """
        used: list[tuple[int, int]] = []
        queue = self.queues[index]
        while True:
            try:
                used += queue.collect_used()
                if len(used) >= count:
                    return used
                # Ask for the interrupt (a spinning exchange may have suppressed it), look again.
                queue.request_interrupt_after(count - len(used))
                used += queue.collect_used()
            except VirtioError as exc:
                raise VhostUserError(f"invalid used ring: {exc}") from exc
            if len(used) >= count:
                return used
            self.wait_interrupt()


_EXPLICIT_REPLY = frozenset(
    {
        _R.VHOST_USER_GET_FEATURES,
        _R.VHOST_USER_GET_PROTOCOL_FEATURES,
        _R.VHOST_USER_GET_VRING_BASE,
        _R.VHOST_USER_GET_QUEUE_NUM,
        _R.VHOST_USER_GET_MAX_MEM_SLOTS,
        _R.VHOST_USER_GET_STATUS,
        _R.VHOST_USER_GET_INFLIGHT_FD,
        _R.VHOST_USER_SET_DEVICE_STATE_FD,
        _R.VHOST_USER_CHECK_DEVICE_STATE,
        _R.VHOST_USER_GET_CONFIG,
    }
)
