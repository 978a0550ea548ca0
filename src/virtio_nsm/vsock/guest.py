"""A sans-IO guest-side vsock stream transport (the driver role), for tests and tools.

:class:`GuestTransport` plays what Linux's ``vmw_vsock_virtio_transport`` does in a
guest: it turns socket calls (connect, listen, write, read, shutdown, close) into
packets for the device's tx queue (:meth:`~GuestTransport.next_tx`) and takes in the
packets the device puts in rx buffers (:meth:`~GuestTransport.deliver`).  It keeps
the same credit rules (it never sends beyond the device's credit, and grants
``buf_alloc`` bytes itself) and checks the device against them: a device packet
that breaks a rule is recorded in :attr:`GuestTransport.violations` (tests assert it
stays empty).  Unlike a kernel it buffers what the application writes without a
limit: its user decides how much to write.
"""

from __future__ import annotations

import itertools
from collections import deque

from .buffer import ByteQueue
from .constants import (
    DEFAULT_BUF_SIZE,
    MAX_PKT_PAYLOAD,
    U32_MASK,
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
    VMADDR_CID_HOST,
)
from .packet import Header, PacketError, decode, problem

__all__ = ["GuestSocket", "GuestTransport"]

_EPHEMERAL_BASE = 49152


class GuestSocket:
    """One guest stream socket (its state is read by the transport's user)."""

    def __init__(self, local_port: int, peer_cid: int, peer_port: int, buf_alloc: int) -> None:
        self.local_port = local_port
        self.peer_cid = peer_cid
        self.peer_port = peer_port
        #: "connecting", "established" or "closed".
        self.state = "connecting"
        #: Set when the connection ended before both sides were done (a RST, or ours).
        self.reset = False
        #: Set when we ended it: :meth:`GuestTransport.abort`, or a close while connecting.
        self.aborted = False
        self.buf_alloc = buf_alloc
        self.rx = ByteQueue()
        self.rx_cnt = 0
        self.fwd_cnt = 0  # bytes the application has read
        self.adv_fwd = 0
        self.tx = ByteQueue()  # written by the application, not sent yet
        self.tx_cnt = 0
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.peer_shut_send = False  # the device sends no more: end of file once rx is read
        self.peer_shut_rcv = False
        self.shut_send = False  # the application shut down writing (SHUTDOWN goes after tx)
        self.shut_rcv = False
        self.shutdown_sent = 0  # flags already sent
        self.want_credit_update = False
        self.queued = False

    def __repr__(self) -> str:
        return f"<GuestSocket {self.local_port}->{self.peer_cid}:{self.peer_port} {self.state}>"

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.peer_cid, self.peer_port, self.local_port)

    @property
    def eof(self) -> bool:
        """Everything the peer will ever send has been read."""
        return not self.rx and (self.peer_shut_send or self.state == "closed")

    def credit(self) -> int:
        return max(0, self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & U32_MASK))


class GuestTransport:
    """Guest-side stream sockets over one vsock device (see the module doc)."""

    def __init__(self, cid: int, *, buf_alloc: int = DEFAULT_BUF_SIZE, max_packet: int = MAX_PKT_PAYLOAD):
        self.cid = cid
        self.buf_alloc = buf_alloc
        self.max_packet = max_packet
        self.sockets: dict[tuple[int, int, int], GuestSocket] = {}
        self.listening: set[int] = set()
        #: Connections accepted on listening ports, oldest first.
        self.accepted: deque[GuestSocket] = deque()
        #: Rule breaks by the device, as text.
        self.violations: list[str] = []
        self._control: deque[bytes] = deque()
        self._ready: deque[GuestSocket] = deque()
        self._ports = itertools.count(_EPHEMERAL_BASE)

    # ------------------------------------------------------------ application side
    def connect(self, port: int, cid: int = VMADDR_CID_HOST, *, local_port: int | None = None) -> GuestSocket:
        local = next(self._ports) if local_port is None else local_port
        sock = GuestSocket(local, cid, port, self.buf_alloc)
        if sock.key in self.sockets:
            raise ValueError(f"{sock.key} is in use")
        self.sockets[sock.key] = sock
        self._control.append(self._header(sock, VIRTIO_VSOCK_OP_REQUEST))
        return sock

    def listen(self, port: int) -> None:
        self.listening.add(port)

    def write(self, sock: GuestSocket, data: bytes) -> None:
        if sock.shut_send or sock.state == "closed" or sock.peer_shut_rcv:
            raise BrokenPipeError(f"{sock} cannot send")
        sock.tx.append(data)
        self._schedule(sock)

    def read(self, sock: GuestSocket, n: int) -> bytes:
        data = sock.rx.take(n)
        sock.fwd_cnt += len(data)
        # Like Linux: tell the device once our free space looks low to it.
        if data and sock.state == "established":
            in_flight = sock.rx_cnt - sock.adv_fwd
            if sock.buf_alloc - in_flight < min(MAX_PKT_PAYLOAD, sock.buf_alloc // 2 + 1):
                sock.want_credit_update = True
                self._schedule(sock)
        return data

    def shutdown(self, sock: GuestSocket, *, rcv: bool = False, send: bool = False) -> None:
        if sock.state != "established":
            return
        if rcv and not sock.shut_rcv:
            sock.shut_rcv = True
            sock.rx.clear()
        if send:
            sock.shut_send = True
        self._schedule(sock)

    def close(self, sock: GuestSocket) -> None:
        """``close()``: shut down both directions (the device then answers with RST)."""
        if sock.state == "established":
            self.shutdown(sock, rcv=True, send=True)
        elif sock.state == "connecting":
            sock.reset = sock.aborted = True
            self._drop(sock)

    def abort(self, sock: GuestSocket) -> None:
        """Send RST and forget the socket."""
        if sock.state != "closed":
            self._control.append(self._header(sock, VIRTIO_VSOCK_OP_RST))
            sock.reset = sock.aborted = True
            self._drop(sock)

    def transport_reset(self) -> None:
        """``VIRTIO_VSOCK_EVENT_TRANSPORT_RESET``: every connection is gone (as Linux resets them)."""
        for sock in list(self.sockets.values()):
            sock.reset = True
            self._drop(sock)
        self._control.clear()
        self._ready.clear()

    # ------------------------------------------------------------ device side
    def next_tx(self) -> bytes | None:
        """The next packet for the device's tx queue."""
        if self._control:
            return self._control.popleft()
        for _ in range(len(self._ready)):
            sock = self._ready.popleft()
            sock.queued = False
            packet = self._packet_for(sock)
            self._schedule(sock)
            if packet is not None:
                return packet
        return None

    def _has_work(self, sock: GuestSocket) -> bool:
        if sock.state != "established":
            return False
        if sock.want_credit_update:
            return True
        if sock.tx:
            return sock.credit() > 0
        return self._shutdown_flags(sock) != sock.shutdown_sent

    def _shutdown_flags(self, sock: GuestSocket) -> int:
        flags = VIRTIO_VSOCK_SHUTDOWN_RCV if sock.shut_rcv else 0
        if sock.shut_send and not sock.tx:
            flags |= VIRTIO_VSOCK_SHUTDOWN_SEND
        return flags | sock.shutdown_sent

    def _packet_for(self, sock: GuestSocket) -> bytes | None:
        if sock.state != "established":
            return None
        if sock.tx and not sock.peer_shut_rcv:
            n = min(len(sock.tx), sock.credit(), self.max_packet)
            if n > 0:
                payload = sock.tx.take(n)
                sock.tx_cnt += n
                return self._header(sock, VIRTIO_VSOCK_OP_RW, length=n) + payload
        if sock.want_credit_update:
            return self._header(sock, VIRTIO_VSOCK_OP_CREDIT_UPDATE)
        flags = self._shutdown_flags(sock)
        if flags != sock.shutdown_sent:
            sock.shutdown_sent = flags
            return self._header(sock, VIRTIO_VSOCK_OP_SHUTDOWN, flags=flags)
        return None

    def deliver(self, packet: bytes) -> None:
        """Take in one packet the device wrote into an rx buffer."""
        try:
            h, payload = decode(packet)
        except PacketError as exc:
            self.violations.append(f"malformed packet: {exc}")
            return
        bad = problem(h)
        if bad is not None or h.dst_cid != self.cid:
            self.violations.append(f"bad packet {h}: {bad or 'wrong dst_cid'}")
            return
        key = (h.src_cid, h.src_port, h.dst_port)
        sock = self.sockets.get(key)
        if sock is None:
            if h.op == VIRTIO_VSOCK_OP_REQUEST and h.dst_port in self.listening:
                sock = GuestSocket(h.dst_port, h.src_cid, h.src_port, self.buf_alloc)
                sock.state = "established"
                sock.peer_buf_alloc, sock.peer_fwd_cnt = h.buf_alloc, h.fwd_cnt
                self.sockets[key] = sock
                self.accepted.append(sock)
                self._control.append(self._header(sock, VIRTIO_VSOCK_OP_RESPONSE))
            elif h.op != VIRTIO_VSOCK_OP_RST:
                self._control.append(
                    Header(
                        self.cid,
                        h.src_cid,
                        h.dst_port,
                        h.src_port,
                        0,
                        VIRTIO_VSOCK_TYPE_STREAM,
                        VIRTIO_VSOCK_OP_RST,
                    ).encode()
                )
            return
        sock.peer_buf_alloc = h.buf_alloc
        sock.peer_fwd_cnt = h.fwd_cnt
        if h.op == VIRTIO_VSOCK_OP_RST:
            sent = sock.shutdown_sent
            done = bool(sent & VIRTIO_VSOCK_SHUTDOWN_SEND) and (
                sock.peer_shut_send or bool(sent & VIRTIO_VSOCK_SHUTDOWN_RCV)
            )
            sock.reset = not done
            self._drop(sock)
        elif sock.state == "connecting":
            if h.op == VIRTIO_VSOCK_OP_RESPONSE:
                sock.state = "established"
            else:
                self.violations.append(f"op {h.op} on connecting {sock}")
        elif h.op == VIRTIO_VSOCK_OP_RW:
            if sock.peer_shut_send:
                self.violations.append(f"data after SHUTDOWN(send) on {sock}")
            if sock.rx_cnt - sock.fwd_cnt + len(payload) > sock.buf_alloc:
                self.violations.append(f"device exceeded our credit on {sock}")
            if not sock.shut_rcv:
                sock.rx.append(payload)
            sock.rx_cnt += len(payload)
            if sock.shut_rcv:
                sock.fwd_cnt += len(payload)
        elif h.op == VIRTIO_VSOCK_OP_SHUTDOWN:
            sock.peer_shut_rcv |= bool(h.flags & VIRTIO_VSOCK_SHUTDOWN_RCV)
            sock.peer_shut_send |= bool(h.flags & VIRTIO_VSOCK_SHUTDOWN_SEND)
        elif h.op == VIRTIO_VSOCK_OP_CREDIT_REQUEST:
            sock.want_credit_update = True
        elif h.op != VIRTIO_VSOCK_OP_CREDIT_UPDATE:
            self.violations.append(f"op {h.op} on established {sock}")
        self._schedule(sock)

    def _drop(self, sock: GuestSocket) -> None:
        sock.state = "closed"
        self.sockets.pop(sock.key, None)

    def _schedule(self, sock: GuestSocket) -> None:
        if not sock.queued and self._has_work(sock):
            sock.queued = True
            self._ready.append(sock)

    def _header(self, sock: GuestSocket, op: int, *, length: int = 0, flags: int = 0) -> bytes:
        sock.adv_fwd = sock.fwd_cnt
        sock.want_credit_update = False
        return Header(
            src_cid=self.cid,
            dst_cid=sock.peer_cid,
            src_port=sock.local_port,
            dst_port=sock.peer_port,
            len=length,
            type=VIRTIO_VSOCK_TYPE_STREAM,
            op=op,
            flags=flags,
            buf_alloc=sock.buf_alloc,
            fwd_cnt=sock.fwd_cnt & U32_MASK,
        ).encode()
