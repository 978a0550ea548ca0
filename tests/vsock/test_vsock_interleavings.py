"""Random interleavings of guest and host operations against the bridge (hypothesis).

Whatever the order of socket calls, packet deliveries, rx buffer sizes and host
socket progress: bytes are never lost, duplicated or reordered; neither side's
credit is exceeded; buffers stay within their limits; and once everybody reads,
everything written on a connection that was not reset arrives.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from vsock.vsock_harness import GUEST_CID, Harness, HostEnd

from virtio_nsm.vsock import BridgeLimits, GuestSocket, GuestTransport, VsockBridge
from virtio_nsm.vsock import constants as c
from virtio_nsm.vsock.bridge import LINE_MAX
from virtio_nsm.vsock.packet import Header

HOST_PORTS = (1000, 2000)  # 2000: nobody listens
GUEST_PORTS = (500, 600)  # 600: the guest does not listen


def pattern(seed: str, offset: int, n: int) -> bytes:
    return random.Random(f"{seed}:{offset}").randbytes(n)


def host_sent(end: HostEnd) -> bytes:
    """What a host program wrote after its CONNECT line, if it had one."""
    sent = bytes(end.sent)
    return sent if end.port is not None else sent[sent.index(b"\n") + 1 :]


class Interleavings(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.limits = BridgeLimits(buf_alloc=3000, host_buffer=2000, max_streams=16, max_pending_resets=64)
        self.h = Harness(VsockBridge(GUEST_CID, limits=self.limits), listening={1000})
        self.h.guest = GuestTransport(GUEST_CID, buf_alloc=2500, max_packet=1500)
        self.h.guest.listen(500)
        self.socks: list[GuestSocket] = []
        self.guest_written: dict[int, bytearray] = {}
        self.guest_read: dict[int, bytearray] = {}

    # ------------------------------------------------------------- helpers
    def _accepted(self) -> None:
        while self.h.guest.accepted:
            sock = self.h.guest.accepted.popleft()
            self._track(sock)

    def _track(self, sock: GuestSocket) -> None:
        self.socks.append(sock)
        self.guest_written[id(sock)] = bytearray()
        self.guest_read[id(sock)] = bytearray()

    def _end_for(self, sock: GuestSocket) -> HostEnd | None:
        for end in self.h.hosts.values():
            if end.key == sock.key:
                return end
        return None

    # ------------------------------------------------------------- connecting
    @rule(port=st.sampled_from(HOST_PORTS), cid=st.sampled_from([2, 3]))
    def guest_connect(self, port: int, cid: int) -> None:
        self._track(self.h.guest.connect(port, cid=cid))

    @rule(port=st.sampled_from(GUEST_PORTS))
    def host_connect(self, port: int) -> None:
        self.h.host_connect(port)

    # ------------------------------------------------------------- guest side
    @precondition(lambda self: self.socks)
    @rule(data=st.data(), n=st.integers(1, 4000))
    def guest_write(self, data: st.DataObject, n: int) -> None:
        sock = data.draw(st.sampled_from(self.socks))
        if sock.state != "established" or sock.shut_send or sock.peer_shut_rcv:
            return
        written = self.guest_written[id(sock)]
        chunk = pattern(f"g{sock.key}", len(written), n)
        self.h.guest.write(sock, chunk)
        written += chunk

    @precondition(lambda self: self.socks)
    @rule(data=st.data(), n=st.integers(1, 5000))
    def guest_read_(self, data: st.DataObject, n: int) -> None:
        sock = data.draw(st.sampled_from(self.socks))
        self.guest_read[id(sock)] += self.h.guest.read(sock, n)

    @precondition(lambda self: self.socks)
    @rule(data=st.data(), rcv=st.booleans(), send=st.booleans())
    def guest_shutdown(self, data: st.DataObject, rcv: bool, send: bool) -> None:
        self.h.guest.shutdown(data.draw(st.sampled_from(self.socks)), rcv=rcv, send=send)

    @precondition(lambda self: self.socks)
    @rule(data=st.data(), abort=st.booleans())
    def guest_close(self, data: st.DataObject, abort: bool) -> None:
        sock = data.draw(st.sampled_from(self.socks))
        if abort:
            self.h.guest.abort(sock)
        else:
            self.h.guest.close(sock)

    @rule(port=st.integers(0, 3))
    def guest_sends_ghost_packet(self, port: int) -> None:
        ghost = Header(GUEST_CID, 2, 30000 + port, 1000, 3, c.VIRTIO_VSOCK_TYPE_STREAM, c.VIRTIO_VSOCK_OP_RW)
        self.h.bridge.guest_packet(ghost.encode() + b"boo")

    # ------------------------------------------------------------- host side
    def _ends(self, data: st.DataObject) -> HostEnd | None:
        ends = sorted(self.h.hosts.values(), key=lambda e: e.host_id)
        return data.draw(st.sampled_from(ends)) if ends else None

    @rule(data=st.data(), n=st.integers(1, 4000))
    def host_write(self, data: st.DataObject, n: int) -> None:
        end = self._ends(data)
        if end is None or end.shut_wr or end.key is None:
            return
        self.h.host_write(end, pattern(f"h{end.key}", len(end.sent), n))

    @rule(data=st.data(), n=st.integers(1, 5000))
    def host_read(self, data: st.DataObject, n: int) -> None:
        end = self._ends(data)
        if end is not None:
            self.h.host_read(end, n)

    @rule(data=st.data(), close=st.booleans())
    def host_shutdown(self, data: st.DataObject, close: bool) -> None:
        end = self._ends(data)
        if end is None or end.key is None:
            return
        if close:
            self.h.host_close(end)
        else:
            self.h.host_shutdown_write(end)

    # ------------------------------------------------------------- the machinery in between
    @rule(k=st.integers(1, 8))
    def pump_tx(self, k: int) -> None:
        self.h.guest_tx(k)

    @rule(k=st.integers(1, 8), capacity=st.sampled_from([44, 45, 100, 1500, 4096]))
    def pump_rx(self, k: int, capacity: int) -> None:
        self.h.guest_rx(k, capacity)
        self._accepted()

    @rule(data=st.data())
    def pump_host(self, data: st.DataObject) -> None:
        end = self._ends(data)
        if end is not None:
            self.h.host_io(end)

    # ------------------------------------------------------------- checks
    @invariant()
    def no_rule_broken(self) -> None:
        assert self.h.guest.violations == []

    @invariant()
    def buffers_bounded(self) -> None:
        for s in self.h.bridge._streams.values():
            assert len(s.to_host) <= self.limits.buf_alloc + 16
            assert len(s.to_guest) <= self.limits.host_buffer + LINE_MAX
            assert len(s.line) <= LINE_MAX
        assert self.h.bridge.stream_count <= self.limits.max_streams
        assert len(self.h.bridge._resets) <= self.limits.max_pending_resets

    @invariant()
    def streams_are_prefixes(self) -> None:
        for sock in self.socks:
            end = self._end_for(sock)
            if end is None:
                continue
            if end.program_closed:  # what reached its socket afterwards was thrown away
                assert host_sent(end).startswith(bytes(self.guest_read[id(sock)]))
                continue
            got_host = bytes(end.received) + bytes(end.inbox.front())
            if end.port is None:  # host-initiated: the OK line comes first
                ok = b"OK %d\n" % sock.peer_port
                assert got_host.startswith(ok[: len(got_host)])
                got_host = got_host[len(ok) :]
            assert bytes(self.guest_written[id(sock)]).startswith(got_host)
            assert host_sent(end).startswith(bytes(self.guest_read[id(sock)]))

    def teardown(self) -> None:
        h = self.h
        for _ in range(10_000):
            h.settle()
            self._accepted()
            moved = False
            for end in h.hosts.values():
                moved |= bool(h.host_read(end, 1 << 20))
            for sock in self.socks:
                chunk = h.guest.read(sock, 1 << 20)
                self.guest_read[id(sock)] += chunk
                moved |= bool(chunk)
            if not moved:
                break
        else:
            raise AssertionError("never quiet")
        self.streams_are_prefixes()
        for sock in self.socks:
            end = self._end_for(sock)
            if end is None:
                continue
            if (not sock.reset or sock.aborted) and not end.program_closed and sock.state != "connecting":
                received = bytes(end.received)
                if end.port is None:
                    received = received[received.index(b"\n") + 1 :]
                assert received == bytes(self.guest_written[id(sock)][: sock.tx_cnt]), sock
                if sock.state == "established" and not sock.peer_shut_rcv:
                    assert not sock.tx, f"{sock} could not send everything"
            clean = not sock.reset and not sock.shut_rcv and not end.read_shut and not end.write_failed
            if clean and (sock.state == "established" or sock.eof):
                assert bytes(self.guest_read[id(sock)]) == host_sent(end), sock
                assert not end.outbox, f"{end} could not send everything"
        assert h.guest.violations == []


Interleavings.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestInterleavings = Interleavings.TestCase
