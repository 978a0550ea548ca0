"""A Python virtio driver for NSM, speaking vhost-user to a backend (our frontend).

Theory of operation
-------------------
:class:`VhostUserFrontend` plays the part QEMU and the guest kernel play together:
it connects to a vhost-user backend, negotiates features like QEMU does
(``GET_FEATURES``, ``GET/SET_PROTOCOL_FEATURES``, ``GET_QUEUE_NUM``, ``SET_OWNER``,
``SET_FEATURES``), shares one memfd as "guest RAM" (``SET_MEM_TABLE``), programs
vring 0 (``SET_VRING_NUM/BASE/ADDR/CALL/ERR/KICK``, ``SET_VRING_ENABLE``), and
sets ``DRIVER_OK`` when the STATUS protocol feature is there.  With REPLY_ACK every
setting is acknowledged before the next one goes out.

Each request is then sent as Linux's ``nsm.ko`` sends it: the request in one
device-readable descriptor of its real length (at most 0x1000 bytes), a separate
device-writable chain of exactly 0x3000 bytes, one kick.  The used ring is
validated: each request chain must come back with length 0 before its response
chain, whose length must fit the buffer.  :meth:`exchange_many` pipelines a
burst: rounds of requests, each queued before one kick, several rounds in flight
so that driver and device work at the same time (with EVENT_IDX the driver asks
for one interrupt per round).

While waiting, the call eventfd, the err eventfd and the socket are watched: an
err signal (the backend found the ring broken) or the backend hanging up turns
into :class:`VhostUserError` instead of a hang.

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
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import DeviceNotFoundError, ErrorCode, NsmError, TransportError
from ..nsm.protocol import MAX_REQUEST_SIZE, MAX_RESPONSE_SIZE
from ..virtio import spec
from ..virtio.memory import GuestMemory, MemoryRegion, VirtioError
from ..virtio.queue import DriverQueue, RingLayout
from .connection import Connection, ConnectionClosed
from .message import (
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    FrontendRequest,
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
    "MAX_REQUEST_SIZE",
    "RESPONSE_BUFFER_SIZE",
    "USER_BASE",
    "VhostUserError",
    "VhostUserFrontend",
    "VhostUserTransport",
]

#: Linux's nsm.ko always offers a response buffer of exactly this size.
RESPONSE_BUFFER_SIZE = MAX_RESPONSE_SIZE
GUEST_BASE = 0x4000_0000
USER_BASE = 0x7F12_3400_0000

_SLOT = MAX_REQUEST_SIZE + RESPONSE_BUFFER_SIZE
#: Rounds of a burst kept in flight at once (each at most 1/(2*_ROUNDS) of the ring).
_ROUNDS = 4
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


@dataclass(frozen=True, slots=True)
class _Pair:
    req_head: int
    resp_head: int
    resp_addr: int
    slot: int


class VhostUserFrontend:
    """Drive a vhost-user NSM backend through a real split virtqueue."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        queue_size: int = 64,
        timeout: float = 120.0,
        event_idx: bool = True,
        indirect: bool = True,
        status: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.queue_size = queue_size
        self._fds: list[int] = []
        self._memory: GuestMemory | None = None
        self._conn: Connection | None = None
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
        self._conn = Connection(sock, timeout=timeout)
        try:
            self._setup(event_idx=event_idx, indirect=indirect, status=status)
        except BaseException:
            self.close()
            raise

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
            raise VhostUserError(f"{message.name}: backend connection failed: {exc}") from exc
        for fd in reply.fds:
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

    def _setup(self, *, event_idx: bool, indirect: bool, status: bool) -> None:
        self.reply_ack = False
        features = self._get_u64(_R.VHOST_USER_GET_FEATURES)
        if not features & (1 << spec.VIRTIO_F_VERSION_1):
            raise VhostUserError("backend does not offer VIRTIO_F_VERSION_1")
        self.protocol_features = 0
        if features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            offered = self._get_u64(_R.VHOST_USER_GET_PROTOCOL_FEATURES)
            self.protocol_features = offered & _WANTED_PROTOCOL
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
                if queues < 1:
                    raise VhostUserError(f"backend supports {queues} queues")
        self._set(_R.VHOST_USER_SET_OWNER, b"")
        acked = features & (
            1 << spec.VIRTIO_F_VERSION_1
            | 1 << VHOST_USER_F_PROTOCOL_FEATURES
            | (1 << spec.VIRTIO_RING_F_EVENT_IDX if event_idx else 0)
            | (1 << spec.VIRTIO_RING_F_INDIRECT_DESC if indirect else 0)
        )
        self.features = acked
        self._set(_R.VHOST_USER_SET_FEATURES, U64(acked).encode())

        # Guest RAM: one sealed memfd holding the rings and one buffer pair per request.
        slots = self.queue_size // 2
        layout = RingLayout.contiguous(self.queue_size, GUEST_BASE)
        self._buffers = GUEST_BASE + -(-(layout.end - GUEST_BASE) // 0x1000) * 0x1000
        size = self._buffers - GUEST_BASE + slots * _SLOT
        memfd = os.memfd_create("virtio-nsm-frontend", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self._fds.append(memfd)
        os.ftruncate(memfd, size)
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        region = MemoryRegion.from_fd(
            memfd, guest_addr=GUEST_BASE, size=size, user_addr=USER_BASE, mmap_offset=0
        )
        self._memory = GuestMemory([region])
        table = MemoryTable((MemoryRegionDescription(GUEST_BASE, size, USER_BASE, 0),))
        self._set(_R.VHOST_USER_SET_MEM_TABLE, table.encode(), [memfd])

        self.queue = DriverQueue(
            self._memory,
            layout,
            event_idx=bool(acked & (1 << spec.VIRTIO_RING_F_EVENT_IDX)),
            indirect=bool(acked & (1 << spec.VIRTIO_RING_F_INDIRECT_DESC)),
        )
        self._free_slots = list(range(slots - 1, -1, -1))
        # head -> completions not consumed yet, oldest first: (arrival order, used length).
        # A head is freed (and may be reused by a later round) as soon as it is collected,
        # which can be before the round that owns it is consumed, so one head can have
        # several completions waiting; rounds are consumed in order, so each takes the
        # oldest.
        self._done: dict[int, deque[tuple[int, int]]] = {}
        self._seq = 0

        def uva(gpa: int) -> int:
            return gpa - GUEST_BASE + USER_BASE

        self._set(_R.VHOST_USER_SET_VRING_NUM, VringState(0, self.queue_size).encode())
        self._set(_R.VHOST_USER_SET_VRING_BASE, VringState(0, 0).encode())
        self._set(
            _R.VHOST_USER_SET_VRING_ADDR,
            VringAddr(0, 0, uva(layout.desc), uva(layout.used), uva(layout.avail), 0).encode(),
        )
        self.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.err_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._fds += [self.call_fd, self.err_fd, self.kick_fd]
        self._set(_R.VHOST_USER_SET_VRING_CALL, VringFd(0, False).encode(), [self.call_fd])
        self._set(_R.VHOST_USER_SET_VRING_ERR, VringFd(0, False).encode(), [self.err_fd])
        self._set(_R.VHOST_USER_SET_VRING_KICK, VringFd(0, False).encode(), [self.kick_fd])
        self._poller = select.poll()
        for fd in (self.call_fd, self.err_fd, self._connection().sock.fileno()):
            self._poller.register(fd, select.POLLIN)
        if features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            self._set(_R.VHOST_USER_SET_VRING_ENABLE, VringState(0, 1).encode())
        if self.protocol_features & (1 << _PF.VHOST_USER_PROTOCOL_F_STATUS):
            self._set(_R.VHOST_USER_SET_STATUS, U64(_DRIVER_OK).encode())

    def get_status(self) -> int:
        """The backend's device status (needs the STATUS protocol feature)."""
        if not self.protocol_features & (1 << _PF.VHOST_USER_PROTOCOL_F_STATUS):
            raise VhostUserError("the STATUS protocol feature was not negotiated")
        return self._get_u64(_R.VHOST_USER_GET_STATUS)

    def get_vring_base(self) -> int:
        """Stop vring 0 (``GET_VRING_BASE``) and return the backend's next avail index."""
        reply = self.request(Message(_R.VHOST_USER_GET_VRING_BASE, payload=VringState(0, 0).encode()))
        assert reply is not None
        return VringState.decode(reply.payload).num

    def close(self) -> None:
        """Hang up and release the shared memory and eventfds.  Safe to call twice."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if getattr(self, "queue", None) is not None:
            self.queue.release()
        if self._memory is not None:
            self._memory.close()
            self._memory = None
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def _connection(self) -> Connection:
        if self._conn is None:
            raise VhostUserError("the frontend is closed")
        return self._conn

    @property
    def memory(self) -> GuestMemory:
        if self._memory is None:
            raise VhostUserError("the frontend is closed")
        return self._memory

    # -- data plane -------------------------------------------------------------------

    def exchange(self, request: bytes) -> bytes:
        """Send one NSM request and return the device's CBOR response."""
        return self.exchange_many([request])[0]

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

    def _submit(self, requests: Sequence[bytes]) -> list[_Pair]:
        pairs: list[_Pair] = []
        for request in requests:
            slot = self._free_slots.pop()
            base = self._buffers + slot * _SLOT
            self.memory.write(base, request)
            req_head = self.queue.add_buffer(base, len(request), False)
            resp_addr = base + MAX_REQUEST_SIZE
            resp_head = self.queue.add_buffer(resp_addr, RESPONSE_BUFFER_SIZE, True)
            pairs.append(_Pair(req_head, resp_head, resp_addr, slot))
        if self.queue.publish():
            self.kick()
        return pairs

    def _complete(self, pairs: list[_Pair]) -> list[bytes]:
        """Wait until the device has returned both chains of every pair; read responses."""
        done = self._done
        heads = {p.req_head for p in pairs} | {p.resp_head for p in pairs}
        missing = sum(1 for head in heads if not done.get(head))
        while missing > 0:
            # The device completes in order: these are the next `missing` used entries.
            self.queue.request_interrupt_after(missing)
            self._collect(block=False) or self._collect(block=True)
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
            self._wait_interrupt()
        try:
            used = self.queue.collect_used()
        except VirtioError as exc:
            raise VhostUserError(f"invalid used ring: {exc}") from exc
        for head, length in used:
            self._done.setdefault(head, deque()).append((self._seq, length))
            self._seq += 1
        return [head for head, _ in used]

    def _take_done(self, head: int) -> tuple[int, int]:
        entries = self._done[head]
        entry = entries.popleft()
        if not entries:
            del self._done[head]
        return entry

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    def _wait_interrupt(self) -> None:
        events = self._poller.poll(self.timeout * 1000)
        if not events:
            raise VhostUserError(f"no response from the device within {self.timeout} s")
        for fd, _ in events:
            if fd == self.err_fd:
                raise VhostUserError("the backend reported a vring error (device needs reset)")
            if fd == self._connection().sock.fileno():
                raise VhostUserError("the backend closed the connection")
            if fd == self.call_fd:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self.call_fd)

    def wait_used(self, count: int) -> list[tuple[int, int]]:
        """Collect ``count`` used elements as they are, waiting for interrupts as needed.

        For driving the ring by hand (tests); :meth:`exchange_many` does its own waiting.
        """
        used: list[tuple[int, int]] = []
        while True:
            try:
                used += self.queue.collect_used()
            except VirtioError as exc:
                raise VhostUserError(f"invalid used ring: {exc}") from exc
            if len(used) >= count:
                return used
            self._wait_interrupt()


class VhostUserTransport(VhostUserFrontend):
    """The client-side transport (``exchange``/``close``) over a vhost-user socket.

    ``--device vhost-user:SOCK`` maps to ``VhostUserTransport(SOCK)``.
    """


_EXPLICIT_REPLY = frozenset(
    {
        _R.VHOST_USER_GET_FEATURES,
        _R.VHOST_USER_GET_PROTOCOL_FEATURES,
        _R.VHOST_USER_GET_VRING_BASE,
        _R.VHOST_USER_GET_QUEUE_NUM,
        _R.VHOST_USER_GET_MAX_MEM_SLOTS,
        _R.VHOST_USER_GET_STATUS,
    }
)
