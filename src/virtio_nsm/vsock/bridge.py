"""The sans-IO vsock bridge: guest stream connections ↔ host byte streams.

Theory of operation
-------------------
:class:`VsockBridge` is the device's whole stream logic and does no I/O.  It is
fed with the packets the guest puts on the tx queue (:meth:`~VsockBridge.guest_packet`)
and with what happens on the host side (a client accepted on the hybrid socket,
bytes read, end of file, an error, the outcome of a connect); it hands out packets
for the guest's rx buffers (:meth:`~VsockBridge.next_rx`), the bytes to write to each
host stream (:meth:`~VsockBridge.host_output` / :meth:`~VsockBridge.host_sent`) and
host-side actions (:class:`ConnectHost`, :class:`ShutdownHost`, :class:`CloseHost`).
Every host byte stream has an integer ``host_id`` chosen by the bridge.

Host side (the Firecracker / vhost-device-vsock hybrid convention):

* a host program connects to the backend's Unix socket ``PATH`` and writes
  ``CONNECT <port>\\n``; the bridge sends the guest a REQUEST from a fresh local port
  (``2**30`` and up) and, once the guest answers RESPONSE, writes ``OK <local port>\\n``
  to the host program and bridges the streams; a RST (nothing listens) closes the
  host stream without a word;
* a guest connecting to port ``P`` of CID 2, or of CID 3 (the Nitro parent address;
  unless the guest itself is CID 3), is bridged to the Unix socket ``PATH_P``
  (:class:`ConnectHost`); if that fails the guest gets RST (``ECONNRESET``).

Flow control and memory: the guest may send at most ``buf_alloc`` bytes beyond what
has been written to the host stream (the credit we advertise, with the forwarded
count, in every header); its data waits in the connection until the host program
reads it, so a slow host reader stops the guest writer.  Bytes from the host are
read only while the connection holds fewer than ``host_buffer`` of them
(:meth:`~VsockBridge.read_budget`; once full, reading resumes when a quarter is
free) and are sent to the guest only within the credit the guest advertises, so a
guest that stops reading stops the host writer.  The table holds at most
``max_streams`` host streams and ``max_pending_resets`` queued RST replies: memory
is bounded whatever either side does.  Credit is announced to the guest when it may
be running short (more than half of ``buf_alloc`` looks in flight from its side) or
when it asks (CREDIT_REQUEST); when we run out of the guest's credit with data
waiting we send one CREDIT_REQUEST.

Close: the guest's SHUTDOWN with "no more send" becomes ``shutdown(SHUT_WR)`` on the
host stream once everything before it is written; "no more receive" becomes
``shutdown(SHUT_RD)`` (the host writer then gets ``EPIPE``) and drops what was
waiting for the guest.  End of file from the host becomes SHUTDOWN "no more send"
after the data before it.  When neither side will send any more, the guest gets a
RST (Linux's way of completing a close; it keeps unread data readable) and the host
stream is closed once what it is owed is written.  A guest RST closes the host
stream the same way; a host error resets the connection.

Hostile guest: a packet from another CID than the guest's is dropped; a malformed
packet (short, ``len`` past the buffer, unknown op or type or flags, payload on a
control op) is dropped, or resets the connection it names; a packet for a connection
that does not exist, or to a CID we do not serve, gets RST (never a RST for a RST);
data beyond the credit we gave, data after the guest said it would send no more,
and packets out of turn reset the connection.  Each case is counted in
:attr:`VsockBridge.stats` and logged (the first few of each kind, then every
thousandth), and every other connection carries on.

:meth:`~VsockBridge.transport_reset` drops every connection (closing the host
streams) and queues ``VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`` for the event queue, for
a guest that kept running while the backend restarted.
"""

from __future__ import annotations

import enum
import logging
import struct
from collections import Counter, deque
from dataclasses import dataclass

from .buffer import ByteQueue
from .constants import (
    DEFAULT_BUF_SIZE,
    HEADER_SIZE,
    MAX_PKT_PAYLOAD,
    NITRO_PARENT_CID,
    U32_MASK,
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_RCV,
    VIRTIO_VSOCK_SHUTDOWN_SEND,
    VIRTIO_VSOCK_TYPE_STREAM,
    VMADDR_CID_ANY,
    VMADDR_CID_HOST,
)
from .packet import Header, PacketError, decode, encode_event, pack_header, problem

__all__ = [
    "LINE_MAX",
    "LOCAL_PORT_BASE",
    "BridgeLimits",
    "CloseHost",
    "ConnectHost",
    "HostAction",
    "ShutdownHost",
    "VsockBridge",
]

log = logging.getLogger(__name__)

#: The longest ``CONNECT <port>\n`` line accepted from a host program.
LINE_MAX = 64
#: Local ports of host-initiated connections are taken from here upwards.
LOCAL_PORT_BASE = 1 << 30
_LOCAL_PORT_LAST = U32_MASK - 1
#: How many times each kind of guest misbehaviour is logged before only every 1000th is.
_LOG_FIRST = 5
#: ``struct virtio_vsock_hdr`` as a tuple (the fast path builds no :class:`Header`).
_UNPACK_HEADER = struct.Struct("<QQIIIHHIII").unpack_from


@dataclass(frozen=True, slots=True)
class ConnectHost:
    """Connect host stream ``host_id`` to the Unix socket ``PATH_<port>``.

    Report the outcome with :meth:`VsockBridge.host_connected` or
    :meth:`VsockBridge.host_connect_failed`.
    """

    host_id: int
    port: int


@dataclass(frozen=True, slots=True)
class ShutdownHost:
    """``shutdown()`` one direction of host stream ``host_id``."""

    host_id: int
    read: bool = False
    write: bool = False


@dataclass(frozen=True, slots=True)
class CloseHost:
    """Close host stream ``host_id`` and forget it (the bridge already has)."""

    host_id: int


HostAction = ConnectHost | ShutdownHost | CloseHost


@dataclass(frozen=True, slots=True)
class BridgeLimits:
    """Per-connection buffers and table sizes (all bound the bridge's memory)."""

    #: Credit granted to the guest: guest bytes held until the host stream takes them.
    buf_alloc: int = DEFAULT_BUF_SIZE
    #: Host bytes held per connection until the guest's credit lets them go.
    host_buffer: int = DEFAULT_BUF_SIZE
    #: Host streams (connections, connecting and closing ones) at once.
    max_streams: int = 1024
    #: RST replies waiting for rx buffers; more are dropped.
    max_pending_resets: int = 4096

    def __post_init__(self) -> None:
        if not 1 <= self.buf_alloc <= U32_MASK:
            raise ValueError(f"buf_alloc {self.buf_alloc} is not in 1..{U32_MASK}")
        for name in ("host_buffer", "max_streams", "max_pending_resets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")

    @property
    def memory_bound(self) -> int:
        """Most payload bytes the bridge can hold (all connections, both directions)."""
        per_stream = self.buf_alloc + self.host_buffer + 2 * LINE_MAX
        return self.max_streams * per_stream


ConnKey = tuple[int, int, int]  # (host-side cid, host-side port, guest port)


class _State(enum.Enum):
    AWAIT_LINE = "await-line"  # host client accepted, its CONNECT line not read yet
    CONNECTING_HOST = "connecting-host"  # guest REQUEST, connecting to PATH_<port>
    CONNECTING_GUEST = "connecting-guest"  # CONNECT line read, REQUEST to the guest
    ESTABLISHED = "established"
    DETACHED = "detached"  # the guest side is over; the host stream is being flushed




class _Stream:
    """One host byte stream and the guest connection bridged to it."""

    __slots__ = (
        "adv_fwd",
        "close_when_flushed",
        "credit_requested",
        "fwd_cnt",
        "guest_shut_rcv",
        "guest_shut_send",
        "host_eof",
        "host_id",
        "key",
        "line",
        "peer_buf_alloc",
        "peer_fwd_cnt",
        "queued",
        "rd_shut_done",
        "rx_cnt",
        "shutdown_sent",
        "state",
        "to_guest",
        "to_host",
        "to_host_uncounted",
        "tx_cnt",
        "want_credit_update",
        "want_request",
        "want_response",
        "wr_shut_done",
    )

    def __init__(self, host_id: int, state: _State, key: ConnKey | None) -> None:
        self.host_id = host_id
        self.state = state
        self.key = key
        self.line = bytearray()
        # guest -> host
        self.to_host = ByteQueue()
        self.to_host_uncounted = 0  # leading bytes of to_host that are not guest data (OK line)
        self.rx_cnt = 0  # guest bytes received (unbounded; the wire carries them mod 2**32)
        self.fwd_cnt = 0  # guest bytes written to the host stream
        self.adv_fwd = 0  # fwd_cnt as last told to the guest
        # host -> guest
        self.to_guest = ByteQueue()
        self.tx_cnt = 0
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        # shutdown bookkeeping
        self.guest_shut_send = False
        self.guest_shut_rcv = False
        self.host_eof = False
        self.shutdown_sent = False
        self.wr_shut_done = False
        self.rd_shut_done = False
        self.close_when_flushed = False
        # packets owed to the guest
        self.want_request = False
        self.want_response = False
        self.want_credit_update = False
        self.credit_requested = False
        self.queued = False

    def __repr__(self) -> str:
        return f"<stream {self.host_id} {self.state.value} key={self.key}>"

    @property
    def attached(self) -> bool:
        state = self.state  # two identity tests: an Enum's hash is Python code
        return state is _State.ESTABLISHED or state is _State.CONNECTING_GUEST

    def credit(self) -> int:
        """Bytes the guest's receive buffer can take now."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32_MASK
        return max(0, self.peer_buf_alloc - in_flight)


class VsockBridge:
    """Connection table and stream state machines of a vsock device (see the module doc)."""

    def __init__(self, guest_cid: int, *, limits: BridgeLimits | None = None) -> None:
        if not NITRO_PARENT_CID <= guest_cid < VMADDR_CID_ANY:
            raise ValueError(f"guest CID {guest_cid} is not in {NITRO_PARENT_CID}..{VMADDR_CID_ANY - 1}")
        self.guest_cid = guest_cid
        self.limits = limits or BridgeLimits()
        #: The CIDs by which the guest reaches the host: 2, and 3 unless that is the guest's own.
        self.host_cids = frozenset({VMADDR_CID_HOST} | ({NITRO_PARENT_CID} - {guest_cid}))
        #: Counters: traffic, and each kind of guest misbehaviour.
        self.stats: Counter[str] = Counter()
        self._streams: dict[int, _Stream] = {}
        self._conns: dict[ConnKey, _Stream] = {}
        self._ready: deque[_Stream] = deque()
        self._resets: dict[ConnKey, bytes] = {}  # insertion-ordered RST packets
        self._actions: list[HostAction] = []
        self._dirty: set[int] = set()
        self._next_host_id = 1
        self._next_local_port = LOCAL_PORT_BASE
        self._event_pending = False
        self._read_low = max(1, self.limits.host_buffer // 4)

    def __repr__(self) -> str:
        return (
            f"<VsockBridge cid={self.guest_cid} streams={len(self._streams)} "
            f"connections={len(self._conns)} resets={len(self._resets)}>"
        )

    # ------------------------------------------------------------------ inspection
    @property
    def stream_count(self) -> int:
        """Host streams alive (including those still being flushed after the guest side ended)."""
        return len(self._streams)

    @property
    def connection_count(self) -> int:
        """Guest connections in the table."""
        return len(self._conns)

    def buffered(self) -> int:
        """Payload bytes held, both directions, all streams."""
        return sum(len(s.to_host) + len(s.to_guest) + len(s.line) for s in self._streams.values())

    def host_ids(self) -> list[int]:
        return list(self._streams)

    # ------------------------------------------------------------------ guest side
    def guest_packet(self, buf: bytes | memoryview) -> None:
        """Process one packet from the tx queue (header and payload, as the chain holds them)."""
        self.stats["tx_packets"] += 1
        # Fast path: data or a credit update on an established connection, well formed
        # and within credit -- nearly every packet of a transfer or a request/response
        # exchange.  Everything else (including each way these checks can fail) takes
        # the general path, which decides exactly as it would have.
        size = len(buf)
        if size >= HEADER_SIZE:
            src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc, fwd_cnt = (
                _UNPACK_HEADER(buf)
            )
            if src_cid == self.guest_cid and type_ == VIRTIO_VSOCK_TYPE_STREAM and not flags:
                s = self._conns.get((dst_cid, dst_port, src_port))  # only host CIDs are keys
                if s is not None and s.state is _State.ESTABLISHED:
                    if op == VIRTIO_VSOCK_OP_RW:
                        if (
                            length <= MAX_PKT_PAYLOAD
                            and length <= size - HEADER_SIZE
                            and not s.guest_shut_send
                            and s.rx_cnt - s.fwd_cnt + length <= self.limits.buf_alloc
                        ):
                            self._peer_credit(s, buf_alloc, fwd_cnt)
                            if length:
                                self._guest_data(s, bytes(buf[HEADER_SIZE : HEADER_SIZE + length]))
                            self._schedule(s)
                            return
                    elif op == VIRTIO_VSOCK_OP_CREDIT_UPDATE and not length:
                        self._peer_credit(s, buf_alloc, fwd_cnt)
                        self._schedule(s)
                        return
        self._guest_packet(buf)

    def _guest_packet(self, buf: bytes | memoryview) -> None:
        """The general path of :meth:`guest_packet` (every packet can take it)."""
        try:
            header, payload = decode(buf)
        except PacketError as exc:
            self._violation("malformed", str(exc))
            return
        if header.src_cid != self.guest_cid:
            self._violation("src_cid", f"packet from CID {header.src_cid}, the guest is {self.guest_cid}")
            return
        if header.type != VIRTIO_VSOCK_TYPE_STREAM:
            self._violation("type", f"unsupported socket type {header.type}")
            if header.op != VIRTIO_VSOCK_OP_RST:
                self._reply_reset(header)
            return
        if header.dst_cid not in self.host_cids:
            self.stats["no_route"] += 1
            log.debug("vsock: packet to CID %d, which is not the host", header.dst_cid)
            if header.op != VIRTIO_VSOCK_OP_RST:
                self._reply_reset(header)
            return
        key = (header.dst_cid, header.dst_port, header.src_port)
        stream = self._conns.get(key)
        bad = problem(header)
        if bad is not None:
            self._violation("invalid", bad)
            if stream is not None:
                self._reset(stream)
            elif header.op != VIRTIO_VSOCK_OP_RST:
                self._reply_reset(header)
            return
        if stream is None:
            if header.op == VIRTIO_VSOCK_OP_REQUEST:
                self._guest_connect(header, key)
            elif header.op != VIRTIO_VSOCK_OP_RST:
                self.stats["no_connection"] += 1
                log.debug("vsock: op %d for no connection %s", header.op, key)
                self._reply_reset(header)
            return
        self._on_guest_packet(stream, header, payload)
        self._schedule(stream)

    def _on_guest_packet(self, s: _Stream, h: Header, payload: bytes) -> None:
        op = h.op
        if op == VIRTIO_VSOCK_OP_RST:
            self.stats["guest_resets"] += 1
            self._detach(s)
            self._close_host(s, flush=True)
            return
        if op == VIRTIO_VSOCK_OP_REQUEST:
            self._violation("sequence", f"REQUEST for the existing connection {s.key}")
            self._reset(s)
            return
        if op == VIRTIO_VSOCK_OP_RESPONSE:
            if s.state is not _State.CONNECTING_GUEST or s.want_request:
                self._violation("sequence", f"RESPONSE on {s.key} in state {s.state.value}")
                self._reset(s)
                return
            self._peer_credit(s, h.buf_alloc, h.fwd_cnt, initial=True)
            s.state = _State.ESTABLISHED
            assert s.key is not None
            ok = b"OK %d\n" % s.key[1]
            s.to_host.append(ok)
            s.to_host_uncounted = len(ok)
            self._dirty.add(s.host_id)
            return
        if s.state is not _State.ESTABLISHED:
            self._violation("sequence", f"op {op} on {s.key} in state {s.state.value}")
            self._reset(s)
            return
        self._peer_credit(s, h.buf_alloc, h.fwd_cnt)
        if op == VIRTIO_VSOCK_OP_RW:
            if s.guest_shut_send:
                self._violation("sequence", f"data on {s.key} after the guest's SHUTDOWN(send)")
                self._reset(s)
                return
            held = s.rx_cnt - s.fwd_cnt
            if held + len(payload) > self.limits.buf_alloc:
                self._violation(
                    "credit",
                    f"{len(payload)} bytes on {s.key} with {self.limits.buf_alloc - held} bytes of credit",
                )
                self._reset(s)
                return
            if payload:
                self._guest_data(s, payload)
        elif op == VIRTIO_VSOCK_OP_SHUTDOWN:
            if h.flags & VIRTIO_VSOCK_SHUTDOWN_RCV and not s.guest_shut_rcv:
                s.guest_shut_rcv = True
                s.to_guest.clear()
                if not s.rd_shut_done:
                    s.rd_shut_done = True
                    self._actions.append(ShutdownHost(s.host_id, read=True))
                self._dirty.add(s.host_id)
            if h.flags & VIRTIO_VSOCK_SHUTDOWN_SEND and not s.guest_shut_send:
                s.guest_shut_send = True
                self._flushed(s)
            self._check_done(s)
        elif op == VIRTIO_VSOCK_OP_CREDIT_REQUEST:
            s.want_credit_update = True
        # CREDIT_UPDATE: _peer_credit has taken it in.

    def _guest_data(self, s: _Stream, payload: bytes) -> None:
        """Bytes of an RW packet (checked: within credit, the guest may send) for the host."""
        s.to_host.append(payload)
        s.rx_cnt += len(payload)
        self.stats["guest_bytes"] += len(payload)
        self._dirty.add(s.host_id)
        self._maybe_credit_update(s)

    def _peer_credit(self, s: _Stream, buf_alloc: int, fwd_cnt: int, *, initial: bool = False) -> None:
        """Take in the guest's buffer size and forwarded count (every header carries them)."""
        s.peer_buf_alloc = buf_alloc
        if initial:
            s.peer_fwd_cnt = fwd_cnt
        else:
            # The count only moves forward, and never past what we sent; packets built
            # by racing guest threads may carry an older one, which is ignored.
            now = (s.tx_cnt - fwd_cnt) & U32_MASK
            before = (s.tx_cnt - s.peer_fwd_cnt) & U32_MASK
            if now <= before:
                s.peer_fwd_cnt = fwd_cnt
            else:
                self.stats["stale_fwd_cnt"] += 1
        if s.credit() > 0:
            s.credit_requested = False

    def _guest_connect(self, h: Header, key: ConnKey) -> None:
        if len(self._streams) >= self.limits.max_streams:
            self._violation("table_full", f"REQUEST {key} refused: {len(self._streams)} streams open")
            self._reply_reset(h)
            return
        self._resets.pop(key, None)  # the guest has moved on from any earlier connection
        s = self._new_stream(_State.CONNECTING_HOST, key)
        self._conns[key] = s
        self._peer_credit(s, h.buf_alloc, h.fwd_cnt, initial=True)
        self.stats["guest_connects"] += 1
        self._actions.append(ConnectHost(s.host_id, key[1]))

    def has_rx(self) -> bool:
        """Whether :meth:`next_rx` may have a packet (cheap; may say yes spuriously)."""
        return bool(self._resets) or bool(self._ready)

    def next_rx(self, capacity: int) -> bytes | None:
        """The next packet for an rx buffer of ``capacity`` bytes, or ``None``.

        Connections take turns; each packet is at most ``capacity`` bytes long.
        """
        if capacity < HEADER_SIZE:
            return None
        if self._resets:
            key = next(iter(self._resets))
            self.stats["rx_packets"] += 1
            return self._resets.pop(key)
        for _ in range(len(self._ready)):
            s = self._ready.popleft()
            s.queued = False
            if not s.attached:
                continue
            packet = self._packet_for(s, capacity - HEADER_SIZE)
            self._schedule(s)
            if packet is not None:
                self.stats["rx_packets"] += 1
                return packet
        return None

    def _has_work(self, s: _Stream) -> bool:
        if s.state is _State.CONNECTING_GUEST:
            return s.want_request
        if s.state is not _State.ESTABLISHED:
            return False
        if s.want_response or s.want_credit_update:
            return True
        if s.guest_shut_rcv:
            return False
        if s.to_guest:
            return s.credit() > 0 or not s.credit_requested
        return s.host_eof and not s.shutdown_sent

    def _packet_for(self, s: _Stream, room: int) -> bytes | None:
        if s.state is _State.CONNECTING_GUEST:
            if s.want_request:
                s.want_request = False
                return self._header(s, VIRTIO_VSOCK_OP_REQUEST)
            return None
        if s.state is not _State.ESTABLISHED:
            return None
        if s.want_response:
            s.want_response = False
            return self._header(s, VIRTIO_VSOCK_OP_RESPONSE)
        if s.to_guest and not s.guest_shut_rcv:
            credit = s.credit()
            if credit > 0 and room > 0:
                n = min(len(s.to_guest), credit, room, MAX_PKT_PAYLOAD)
                payload = s.to_guest.take(n)
                s.tx_cnt += n
                self.stats["host_bytes"] += n
                self._dirty.add(s.host_id)  # room to read more from the host
                return self._header(s, VIRTIO_VSOCK_OP_RW, length=n) + payload
            if credit == 0 and not s.credit_requested:
                s.credit_requested = True
                return self._header(s, VIRTIO_VSOCK_OP_CREDIT_REQUEST)
        if s.want_credit_update:
            return self._header(s, VIRTIO_VSOCK_OP_CREDIT_UPDATE)
        if s.host_eof and not s.to_guest and not s.shutdown_sent and not s.guest_shut_rcv:
            s.shutdown_sent = True
            packet = self._header(s, VIRTIO_VSOCK_OP_SHUTDOWN, flags=VIRTIO_VSOCK_SHUTDOWN_SEND)
            self._check_done(s)
            return packet
        return None

    def _header(self, s: _Stream, op: int, *, length: int = 0, flags: int = 0) -> bytes:
        key = s.key
        assert key is not None
        s.adv_fwd = s.fwd_cnt
        s.want_credit_update = False
        return pack_header(
            key[0],
            self.guest_cid,
            key[1],
            key[2],
            length,
            VIRTIO_VSOCK_TYPE_STREAM,
            op,
            flags,
            self.limits.buf_alloc,
            s.fwd_cnt & U32_MASK,
        )

    def _schedule(self, s: _Stream) -> None:
        if not s.queued and s.attached and self._has_work(s):
            s.queued = True
            self._ready.append(s)

    @property
    def event_pending(self) -> bool:
        """Whether :meth:`take_event` has a record for the event queue."""
        return self._event_pending

    def take_event(self) -> bytes | None:
        """The event-queue record owed to the guest (TRANSPORT_RESET), if any."""
        if not self._event_pending:
            return None
        self._event_pending = False
        return encode_event(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)

    def transport_reset(self) -> None:
        """Forget every connection (host streams closed) and owe the guest a TRANSPORT_RESET."""
        for s in list(self._streams.values()):
            s.state = _State.DETACHED
            self._actions.append(CloseHost(s.host_id))
        self.stats["transport_resets"] += 1
        self._streams.clear()
        self._conns.clear()
        self._ready.clear()
        self._resets.clear()
        self._dirty.clear()
        self._event_pending = True

    # ------------------------------------------------------------------ host side
    def host_accepted(self) -> int:
        """A host program connected to the hybrid socket; returns its ``host_id``."""
        s = self._new_stream(_State.AWAIT_LINE, None)
        if len(self._streams) > self.limits.max_streams:
            self.stats["host_refused"] += 1
            count = self.stats["host_refused"]
            if count <= _LOG_FIRST or count % 1000 == 0:
                log.warning(
                    "vsock: host connection refused (#%d): %d streams open", count, len(self._streams) - 1
                )
            self._close_host(s, flush=False)
        return s.host_id

    def host_connected(self, host_id: int) -> None:
        """The :class:`ConnectHost` for ``host_id`` succeeded."""
        s = self._streams.get(host_id)
        if s is None:
            return
        if s.state is _State.CONNECTING_HOST:
            s.state = _State.ESTABLISHED
            s.want_response = True
            self._dirty.add(host_id)
            self._schedule(s)
        else:
            self._close_host(s, flush=False)

    def host_connect_failed(self, host_id: int) -> None:
        """The :class:`ConnectHost` for ``host_id`` failed (nothing listens at ``PATH_<port>``)."""
        s = self._streams.get(host_id)
        if s is None:
            return
        self.stats["refused"] += 1
        if s.attached or s.state is _State.CONNECTING_HOST:
            self._reset(s)
        else:
            self._close_host(s, flush=False)

    def read_budget(self, host_id: int) -> int:
        """How many bytes may be read from host stream ``host_id`` now (0: do not read)."""
        s = self._streams.get(host_id)
        if s is None:
            return 0
        if s.state is _State.AWAIT_LINE:
            return LINE_MAX - len(s.line)
        if not s.attached or s.host_eof or s.guest_shut_rcv:
            return 0
        room = self.limits.host_buffer - len(s.to_guest)
        # Hysteresis: once the buffer is nearly full, wait until a quarter of it is
        # free, so that the host socket is read in large pieces, not one rx packet's worth.
        return room if room >= self._read_low else 0

    def host_data(self, host_id: int, data: bytes) -> None:
        """Bytes read from host stream ``host_id`` (at most :meth:`read_budget`)."""
        s = self._streams.get(host_id)
        if s is None or not data:
            return
        budget = self.read_budget(host_id)
        if len(data) > budget:
            raise ValueError(f"{len(data)} bytes read from host stream {host_id} with a budget of {budget}")
        if s.state is _State.AWAIT_LINE:
            s.line += data
            self._parse_line(s)
            return
        s.to_guest.append(data)
        self._dirty.add(host_id)  # the read budget shrank: the host side re-checks its watch
        self._schedule(s)

    def _parse_line(self, s: _Stream) -> None:
        end = s.line.find(b"\n")
        if end < 0:
            if len(s.line) >= LINE_MAX:
                self._host_protocol_error(s, f"no CONNECT line in the first {LINE_MAX} bytes")
            return
        line = bytes(s.line[:end]).rstrip(b"\r")
        rest = bytes(s.line[end + 1 :])
        s.line.clear()
        words = line.split(b" ")
        port = _parse_port(words[1]) if len(words) == 2 and words[0] == b"CONNECT" else None
        if port is None:
            self._host_protocol_error(s, f"bad line {line[:LINE_MAX]!r}")
            return
        key = (VMADDR_CID_HOST, self._alloc_port(port), port)
        s.key = key
        s.state = _State.CONNECTING_GUEST
        s.want_request = True
        s.to_guest.append(rest)
        self._conns[key] = s
        self.stats["host_connects"] += 1
        self._dirty.add(s.host_id)
        self._schedule(s)

    def _alloc_port(self, guest_port: int) -> int:
        while True:
            port = self._next_local_port
            self._next_local_port = port + 1 if port < _LOCAL_PORT_LAST else LOCAL_PORT_BASE
            key = (VMADDR_CID_HOST, port, guest_port)
            if key not in self._conns and key not in self._resets:
                return port

    def _host_protocol_error(self, s: _Stream, why: str) -> None:
        log.info("vsock: host connection %d closed: %s", s.host_id, why)
        self.stats["host_bad_line"] += 1
        self._close_host(s, flush=False)

    def host_eof(self, host_id: int) -> None:
        """Host stream ``host_id`` reached end of file (its program shut down writing)."""
        s = self._streams.get(host_id)
        if s is None:
            return
        if s.state is _State.AWAIT_LINE:
            self._close_host(s, flush=False)
            return
        if s.attached and not s.host_eof:
            s.host_eof = True
            self._dirty.add(host_id)
            self._check_done(s)
            self._schedule(s)

    def host_error(self, host_id: int) -> None:
        """Host stream ``host_id`` failed (reset, broken pipe): reset its guest connection."""
        s = self._streams.get(host_id)
        if s is None:
            return
        self.stats["host_errors"] += 1
        if s.attached or s.state is _State.CONNECTING_HOST:
            self._reset(s)
        else:
            self._close_host(s, flush=False)

    def host_output(self, host_id: int) -> memoryview:
        """The next bytes to write to host stream ``host_id`` (empty: nothing to write)."""
        s = self._streams.get(host_id)
        if s is None:
            return memoryview(b"")
        return s.to_host.front()

    def host_sent(self, host_id: int, n: int) -> None:
        """``n`` bytes of :meth:`host_output` were written to host stream ``host_id``."""
        s = self._streams.get(host_id)
        if s is None:
            return
        s.to_host.consume(n)
        uncounted = min(n, s.to_host_uncounted)
        s.to_host_uncounted -= uncounted
        s.fwd_cnt += n - uncounted
        self._dirty.add(host_id)
        if s.attached:
            self._maybe_credit_update(s)
        self._flushed(s)
        if s.attached:
            self._schedule(s)

    @property
    def host_work_pending(self) -> bool:
        """Whether :meth:`take_actions` or :meth:`take_dirty` may have something (cheap)."""
        return bool(self._actions) or bool(self._dirty)

    def take_actions(self) -> list[HostAction]:
        """Host-side actions decided since the last call, in order."""
        actions, self._actions = self._actions, []
        return actions

    def take_dirty(self) -> set[int]:
        """Host streams whose read budget or output may have changed since the last call."""
        dirty, self._dirty = self._dirty, set()
        return {i for i in dirty if i in self._streams}

    # ------------------------------------------------------------------ internals
    def _new_stream(self, state: _State, key: ConnKey | None) -> _Stream:
        host_id = self._next_host_id
        self._next_host_id += 1
        s = _Stream(host_id, state, key)
        self._streams[host_id] = s
        self._dirty.add(host_id)
        return s

    def _maybe_credit_update(self, s: _Stream) -> None:
        """Owe the guest a CREDIT_UPDATE if it may be short of credit and we have more to give."""
        if s.fwd_cnt > s.adv_fwd and s.rx_cnt - s.adv_fwd > self.limits.buf_alloc // 2:
            s.want_credit_update = True

    def _flushed(self, s: _Stream) -> None:
        """Act on an empty ``to_host``: the shutdown or close that waited for it."""
        if s.to_host:
            return
        if s.close_when_flushed:
            self._close_host(s, flush=False)
        elif s.guest_shut_send and not s.wr_shut_done and s.state is _State.ESTABLISHED:
            s.wr_shut_done = True
            self._actions.append(ShutdownHost(s.host_id, write=True))

    def _check_done(self, s: _Stream) -> None:
        """End the guest connection once neither side will send anything more."""
        if s.state is not _State.ESTABLISHED or not s.guest_shut_send:
            return
        if s.guest_shut_rcv or s.shutdown_sent:
            self._queue_reset(s)
            self._detach(s)
            self._close_host(s, flush=True)

    def _reset(self, s: _Stream) -> None:
        """Abort: RST to the guest, host stream closed without flushing."""
        if s.key is not None and s.state is not _State.DETACHED and s.state is not _State.AWAIT_LINE:
            self._queue_reset(s)
            self._detach(s)
        self._close_host(s, flush=False)

    def _queue_reset(self, s: _Stream) -> None:
        assert s.key is not None
        rst = self._header(s, VIRTIO_VSOCK_OP_RST)
        self._push_reset(s.key, rst)

    def _reply_reset(self, h: Header) -> None:
        """RST for a packet that names no connection we have."""
        rst = Header(
            src_cid=h.dst_cid,
            dst_cid=h.src_cid,
            src_port=h.dst_port,
            dst_port=h.src_port,
            len=0,
            type=VIRTIO_VSOCK_TYPE_STREAM,
            op=VIRTIO_VSOCK_OP_RST,
        ).encode()
        self._push_reset((h.dst_cid, h.dst_port, h.src_port), rst)

    def _push_reset(self, key: ConnKey, rst: bytes) -> None:
        if key in self._resets:
            return
        if len(self._resets) >= self.limits.max_pending_resets:
            self._violation("reset_flood", "RST queue full (the guest posts no rx buffers); RST dropped")
            return
        self._resets[key] = rst

    def _detach(self, s: _Stream) -> None:
        if s.key is not None and self._conns.get(s.key) is s:
            del self._conns[s.key]
        s.state = _State.DETACHED
        s.to_guest.clear()
        s.want_request = s.want_response = s.want_credit_update = False
        self._dirty.add(s.host_id)

    def _close_host(self, s: _Stream, *, flush: bool) -> None:
        if s.host_id not in self._streams:
            return
        if flush and s.to_host:
            s.close_when_flushed = True
            self._dirty.add(s.host_id)
            return
        s.state = _State.DETACHED
        del self._streams[s.host_id]
        self._dirty.discard(s.host_id)
        self._actions.append(CloseHost(s.host_id))

    def _violation(self, kind: str, detail: str) -> None:
        self.stats[f"bad_{kind}"] += 1
        count = self.stats[f"bad_{kind}"]
        if count <= _LOG_FIRST or count % 1000 == 0:
            log.warning("vsock: guest misbehaves (%s, #%d): %s", kind, count, detail)


def _parse_port(word: bytes) -> int | None:
    if not word.isdigit() or len(word) > 10:
        return None
    port = int(word)
    return port if port <= U32_MASK else None
