"""In-memory plumbing around a VsockBridge: a GuestTransport as the guest, fake host programs.

Nothing here talks to the OS.  Host "sockets" are modelled with a bounded kernel
buffer each way so that back-pressure is visible: the bridge may write to a host
stream only while its peer's buffer has room, and the host program's own writes
reach the bridge only within the bridge's read budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from virtio_nsm.vsock import CloseHost, ConnectHost, GuestTransport, ShutdownHost, VsockBridge
from virtio_nsm.vsock.buffer import ByteQueue

GUEST_CID = 5
RX_BUFFER = 4096  # what Linux posts
SOCK_BUF = 8192  # the host program's socket receive buffer


@dataclass
class HostEnd:
    """A host program's end of one bridged Unix stream."""

    host_id: int
    port: int | None = None  # PATH_<port> it listens on (guest-initiated), or None
    key: tuple[int, int, int] | None = None  # the guest connection's (cid, host port, guest port)
    inbox: ByteQueue = field(default_factory=ByteQueue)  # in its socket buffer, unread
    received: bytearray = field(default_factory=bytearray)  # read by the program
    outbox: ByteQueue = field(default_factory=ByteQueue)  # written by the program, not taken by the bridge
    sent: bytearray = field(default_factory=bytearray)  # everything the program wrote
    eof: bool = False  # the bridge shut down writing to us (or closed)
    shut_wr: bool = False  # the program shut down writing
    eof_told: bool = False
    read_shut: bool = False  # the bridge shut down reading: our writes fail
    closed: bool = False  # the bridge closed the stream
    write_failed: bool = False
    program_closed: bool = False  # the program closed its socket: writes to it fail


class Harness:
    def __init__(self, bridge: VsockBridge | None = None, *, listening: set[int] | None = None) -> None:
        self.bridge = bridge or VsockBridge(GUEST_CID)
        self.guest = GuestTransport(GUEST_CID)
        self.hosts: dict[int, HostEnd] = {}
        #: Ports with a host program listening on PATH_<port>.
        self.listening = set(listening or ())
        #: Host streams accepted by host programs from PATH_<port>, in order.
        self.host_accepted: list[HostEnd] = []
        self.actions: list[object] = []

    # ---------------------------------------------------------------- host programs
    def host_connect(self, port: int) -> HostEnd:
        """A host program connects to the hybrid socket and writes ``CONNECT <port>``."""
        host_id = self.bridge.host_accepted()
        end = HostEnd(host_id)
        self.hosts[host_id] = end
        self.host_write(end, b"CONNECT %d\n" % port)
        self._actions()
        return end

    def host_write(self, end: HostEnd, data: bytes) -> None:
        assert not end.shut_wr
        if end.read_shut or end.closed:
            end.write_failed = True
            return
        end.outbox.append(data)
        end.sent += data

    def host_shutdown_write(self, end: HostEnd) -> None:
        end.shut_wr = True

    def host_read(self, end: HostEnd, n: int) -> bytes:
        data = end.inbox.take(n)
        end.received += data
        return data

    def host_close(self, end: HostEnd) -> None:
        """The program closes its socket: end of file after what it wrote; writing to it fails."""
        end.shut_wr = True
        end.program_closed = True
        end.inbox.clear()

    # ---------------------------------------------------------------- pumps
    def _actions(self) -> None:
        for action in self.bridge.take_actions():
            self.actions.append(action)
            if isinstance(action, ConnectHost):
                if action.port in self.listening:
                    end = HostEnd(action.host_id, port=action.port)
                    stream = self.bridge._streams.get(action.host_id)
                    end.key = stream.key if stream is not None else None
                    self.hosts[action.host_id] = end
                    self.host_accepted.append(end)
                    self.bridge.host_connected(action.host_id)
                else:
                    self.bridge.host_connect_failed(action.host_id)
            elif isinstance(action, ShutdownHost):
                end = self.hosts[action.host_id]
                if action.write:
                    end.eof = True
                if action.read:
                    end.read_shut = True
            elif isinstance(action, CloseHost):
                end_or_none = self.hosts.get(action.host_id)
                if end_or_none is not None:
                    end_or_none.closed = True
                    end_or_none.eof = True

    def host_io(self, end: HostEnd) -> bool:
        """One round of kernel work on one host stream; returns whether anything moved."""
        moved = False
        if end.closed:
            return False
        # bridge -> program
        out = self.bridge.host_output(end.host_id)
        room = SOCK_BUF - len(end.inbox)
        if out and end.program_closed and not end.outbox and end.eof_told:
            self.bridge.host_error(end.host_id)  # EPIPE
            self._actions()
            return True
        if out and room > 0:
            n = min(len(out), room)
            end.inbox.append(bytes(out[:n]))
            self.bridge.host_sent(end.host_id, n)
            moved = True
            self._actions()
        if end.closed:
            return moved
        # program -> bridge
        budget = self.bridge.read_budget(end.host_id)
        if end.outbox and budget > 0:
            self.bridge.host_data(end.host_id, end.outbox.take(budget))
            stream = self.bridge._streams.get(end.host_id)
            if end.key is None and stream is not None:
                end.key = stream.key
            moved = True
            self._actions()
        elif end.shut_wr and not end.outbox and not end.eof_told and budget > 0:
            end.eof_told = True
            self.bridge.host_eof(end.host_id)
            moved = True
            self._actions()
        return moved

    def guest_tx(self, limit: int = 1 << 30) -> int:
        n = 0
        while n < limit:
            packet = self.guest.next_tx()
            if packet is None:
                break
            self.bridge.guest_packet(packet)
            self._actions()
            n += 1
        return n

    def guest_rx(self, limit: int = 1 << 30, capacity: int = RX_BUFFER) -> int:
        n = 0
        while n < limit:
            packet = self.bridge.next_rx(capacity)
            if packet is None:
                break
            self.guest.deliver(packet)
            self._actions()
            n += 1
        return n

    def settle(self, rounds: int = 100000) -> None:
        """Pump everything until nothing moves (host programs do not read or write)."""
        for _ in range(rounds):
            moved = self.guest_tx() + self.guest_rx()
            for end in list(self.hosts.values()):
                moved += self.host_io(end)
            if not moved:
                return
        raise AssertionError("the bridge did not settle")
