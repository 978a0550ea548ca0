from __future__ import annotations

import logging
import os

import pytest
from vsock.vsock_harness import GUEST_CID, Harness

from virtio_nsm.vsock import BridgeLimits, CloseHost, ConnectHost, Header, ShutdownHost, VsockBridge
from virtio_nsm.vsock import constants as c
from virtio_nsm.vsock.bridge import LOCAL_PORT_BASE
from virtio_nsm.vsock.packet import decode

LISTEN = 1000  # a host program listens on PATH_1000
GUEST_LISTEN = 500


def pkt(
    op: int,
    *,
    src_port: int = 40000,
    dst_port: int = LISTEN,
    payload: bytes = b"",
    src_cid: int = GUEST_CID,
    dst_cid: int = c.VMADDR_CID_HOST,
    flags: int = 0,
    buf_alloc: int = 65536,
    fwd_cnt: int = 0,
    type_: int = c.VIRTIO_VSOCK_TYPE_STREAM,
    length: int | None = None,
) -> bytes:
    h = Header(
        src_cid,
        dst_cid,
        src_port,
        dst_port,
        len(payload) if length is None else length,
        type_,
        op,
        flags,
        buf_alloc,
        fwd_cnt,
    )
    return h.encode() + payload


def rx_all(bridge: VsockBridge, capacity: int = 4096) -> list[tuple[Header, bytes]]:
    out = []
    while (p := bridge.next_rx(capacity)) is not None:
        out.append(decode(p))
    return out


def connected_harness(**kw: object) -> tuple[Harness, object, object]:
    h = Harness(listening={LISTEN}, **kw)  # type: ignore[arg-type]
    sock = h.guest.connect(LISTEN)
    h.settle()
    assert sock.state == "established"
    return h, sock, h.host_accepted[-1]


# ------------------------------------------------------------------ connecting
def test_guest_connects_to_host_and_echoes() -> None:
    h, sock, end = connected_harness()
    h.guest.write(sock, b"ping")
    h.settle()
    assert h.host_read(end, 100) == b"ping"
    h.host_write(end, b"pong")
    h.settle()
    assert h.guest.read(sock, 100) == b"pong"
    assert ConnectHost(end.host_id, LISTEN) in h.actions
    assert h.guest.violations == []


@pytest.mark.parametrize("cid", [c.VMADDR_CID_HOST, c.NITRO_PARENT_CID])
def test_cid_2_and_3_both_reach_path_port(cid: int) -> None:
    h = Harness(listening={LISTEN})
    sock = h.guest.connect(LISTEN, cid=cid)
    h.settle()
    assert sock.state == "established"
    assert h.host_accepted[0].port == LISTEN
    h.guest.write(sock, b"x")
    h.settle()
    assert h.host_read(h.host_accepted[0], 10) == b"x"


def test_cid_3_is_the_guest_itself_when_it_is_cid_3() -> None:
    bridge = VsockBridge(3)
    assert bridge.host_cids == {2}
    bridge.guest_packet(pkt(c.VIRTIO_VSOCK_OP_REQUEST, src_cid=3, dst_cid=3))
    [(rst, _)] = rx_all(bridge)
    assert rst.op == c.VIRTIO_VSOCK_OP_RST
    assert bridge.take_actions() == []


def test_refused_port_resets_the_guest() -> None:
    h = Harness(listening=set())
    sock = h.guest.connect(2000)
    h.settle()
    assert sock.state == "closed" and sock.reset
    assert h.bridge.stream_count == 0 and h.bridge.stats["refused"] == 1


def test_host_connects_to_guest_with_connect_line() -> None:
    h = Harness()
    h.guest.listen(GUEST_LISTEN)
    end = h.host_connect(GUEST_LISTEN)
    h.settle()
    assert h.host_read(end, 100) == b"OK %d\n" % LOCAL_PORT_BASE
    [gsock] = h.guest.accepted
    assert (gsock.peer_cid, gsock.peer_port, gsock.local_port) == (2, LOCAL_PORT_BASE, GUEST_LISTEN)
    h.host_write(end, b"hello")
    h.settle()
    assert h.guest.read(gsock, 100) == b"hello"
    h.guest.write(gsock, b"world")
    h.settle()
    assert h.host_read(end, 100) == b"world"


def test_host_connect_pipelined_data_follows_the_line() -> None:
    h = Harness()
    h.guest.listen(GUEST_LISTEN)
    host_id = h.bridge.host_accepted()
    from vsock.vsock_harness import HostEnd

    end = HostEnd(host_id)
    h.hosts[host_id] = end
    h.host_write(end, b"CONNECT 500\r\nearly bytes")
    h.settle()
    [gsock] = h.guest.accepted
    assert h.guest.read(gsock, 100) == b"early bytes"
    assert h.host_read(end, 100).startswith(b"OK ")


def test_host_connect_to_port_nobody_listens_on_closes_host_stream() -> None:
    h = Harness()
    end = h.host_connect(600)
    h.settle()
    assert end.closed and end.received == b"" and h.host_read(end, 10) == b""
    assert h.bridge.stream_count == 0 and h.bridge.connection_count == 0


@pytest.mark.parametrize(
    "line",
    [b"CONNECT x\n", b"HELLO 5\n", b"CONNECT 5 6\n", b"CONNECT 4294967296\n", b"CONNECT -1\n", b"A" * 64],
)
def test_bad_connect_line_closes_host_stream(line: bytes) -> None:
    h = Harness()
    h.guest.listen(5)
    host_id = h.bridge.host_accepted()
    h.bridge.host_data(host_id, line)
    assert CloseHost(host_id) in h.bridge.take_actions()
    assert h.bridge.stream_count == 0 and h.bridge.next_rx(4096) is None


def test_host_eof_before_connect_line_closes() -> None:
    bridge = VsockBridge(GUEST_CID)
    host_id = bridge.host_accepted()
    bridge.host_data(host_id, b"CONN")
    bridge.host_eof(host_id)
    assert bridge.take_actions() == [CloseHost(host_id)]


def test_read_budget_is_enforced() -> None:
    bridge = VsockBridge(GUEST_CID)
    host_id = bridge.host_accepted()
    with pytest.raises(ValueError, match="budget of 64"):
        bridge.host_data(host_id, b"x" * 65)


def test_local_ports_skip_ports_in_use() -> None:
    h = Harness()
    h.guest.listen(GUEST_LISTEN)
    ends = [h.host_connect(GUEST_LISTEN) for _ in range(3)]
    h.settle()
    ports = [int(h.host_read(e, 100).split()[1]) for e in ends]
    assert ports == [LOCAL_PORT_BASE, LOCAL_PORT_BASE + 1, LOCAL_PORT_BASE + 2]


# ------------------------------------------------------------------ closing
def test_guest_half_close_then_host_answers_and_closes() -> None:
    h, sock, end = connected_harness()
    h.guest.write(sock, b"request")
    h.guest.shutdown(sock, send=True)
    h.settle()
    assert h.host_read(end, 100) == b"request"
    assert end.eof and not end.closed  # shutdown(SHUT_WR), still open for the answer
    assert ShutdownHost(end.host_id, write=True) in h.actions
    h.host_write(end, b"answer")
    h.host_close(end)
    h.settle()
    assert h.guest.read(sock, 100) == b"answer"
    assert sock.eof and sock.state == "closed" and not sock.reset
    assert end.closed and h.bridge.stream_count == 0 and h.bridge.connection_count == 0


def test_host_half_close_then_guest_answers() -> None:
    h, sock, end = connected_harness()
    h.host_write(end, b"question")
    h.host_shutdown_write(end)
    h.settle()
    assert h.guest.read(sock, 100) == b"question"
    assert sock.peer_shut_send and sock.eof and sock.state == "established"
    h.guest.write(sock, b"reply")
    h.settle()
    assert h.host_read(end, 100) == b"reply"
    h.guest.close(sock)
    h.settle()
    assert end.closed and sock.state == "closed" and not sock.reset
    assert h.bridge.stream_count == 0


def test_guest_close_flushes_data_to_slow_host_reader() -> None:
    h, sock, end = connected_harness()
    data = os.urandom(100_000)
    h.guest.write(sock, data)
    h.guest.close(sock)
    h.settle()
    assert sock.state == "closed" and not sock.reset
    assert h.bridge.connection_count == 0 and h.bridge.stream_count == 1  # still flushing
    for _ in range(1000):
        if end.closed:
            break
        h.host_read(end, 5000)
        h.settle()
    h.host_read(end, 10**6)
    assert bytes(end.received) == data
    assert h.bridge.stream_count == 0


def test_guest_shutdown_rcv_makes_host_writes_fail() -> None:
    h, sock, end = connected_harness()
    h.host_write(end, b"a" * 10)
    h.guest.shutdown(sock, rcv=True)
    h.settle()
    assert end.read_shut
    h.host_write(end, b"more")
    assert end.write_failed


def test_guest_rst_closes_host_after_flush() -> None:
    h, sock, end = connected_harness()
    h.guest.write(sock, b"last words")
    h.guest_tx()
    h.guest.abort(sock)
    h.settle()
    assert end.closed and bytes(end.inbox.take(100)) == b"last words"
    assert h.bridge.connection_count == 0


def test_host_error_resets_guest() -> None:
    h, sock, end = connected_harness()
    h.host_close(end)
    h.settle()
    assert sock.peer_shut_send  # the close looks like end of file first
    h.guest.write(sock, b"into the void")
    h.settle()
    assert sock.state == "closed" and sock.reset
    assert h.bridge.stats["host_errors"] == 1 and h.bridge.stream_count == 0


def test_ports_are_reused_after_close() -> None:
    h = Harness(listening={LISTEN})
    for round_ in range(3):
        sock = h.guest.connect(LISTEN, local_port=7777)
        h.settle()
        assert sock.state == "established", round_
        h.guest.write(sock, b"r%d" % round_)
        h.guest.close(sock)
        h.settle()
        assert sock.state == "closed" and not sock.reset
        end = h.host_accepted[-1]
        assert h.host_read(end, 10) == b"r%d" % round_
        h.settle()
        assert end.closed
    assert h.bridge.connection_count == 0 and h.bridge.stream_count == 0


def test_many_concurrent_connections_interleave() -> None:
    h = Harness(listening={LISTEN})
    socks = [h.guest.connect(LISTEN) for _ in range(64)]
    h.settle()
    ends = {e.host_id: e for e in h.host_accepted}
    assert len(ends) == 64 and all(s.state == "established" for s in socks)
    payloads = {s.local_port: os.urandom(20_000) for s in socks}
    for s in socks:
        h.guest.write(s, payloads[s.local_port])
    # the host programs echo everything back
    for _ in range(200):
        h.settle()
        for e in ends.values():
            data = h.host_read(e, 1 << 20)
            if data:
                h.host_write(e, data)
        done = all(len(s.rx) == 20_000 for s in socks)
        if done:
            break
    for s in socks:
        assert h.guest.read(s, 1 << 20) == payloads[s.local_port]
    assert h.guest.violations == []


# ------------------------------------------------------------------ flow control
def test_guest_that_stops_reading_stops_the_host_writer() -> None:
    limits = BridgeLimits(host_buffer=32768)
    h = Harness(VsockBridge(GUEST_CID, limits=limits), listening={LISTEN})
    sock = h.guest.connect(LISTEN)
    h.settle()
    end = h.host_accepted[0]
    data = os.urandom(4 << 20)
    h.host_write(end, data)
    h.settle()
    # the guest's credit (256 KiB) is used up, the bridge holds at most host_buffer,
    # and the rest waits in the host program's socket: memory stays flat.
    assert len(sock.rx) == c.DEFAULT_BUF_SIZE
    assert h.bridge.buffered() <= 32768
    assert len(end.outbox) >= len(data) - c.DEFAULT_BUF_SIZE - 32768
    assert h.bridge.read_budget(end.host_id) == 0
    assert h.bridge.stats["rx_packets"] < 200
    got = bytearray()
    for _ in range(1000):
        if len(got) == len(data):
            break
        got += h.guest.read(sock, 50_000)
        h.settle()
    assert bytes(got) == data
    assert h.guest.violations == []


def test_a_full_host_buffer_is_read_again_once_a_quarter_is_free() -> None:
    limits = BridgeLimits(host_buffer=32768)
    h = Harness(VsockBridge(GUEST_CID, limits=limits), listening={LISTEN})
    h.guest.connect(LISTEN)
    h.settle()
    host_id = h.host_accepted[0].host_id
    bridge = h.bridge
    assert bridge.read_budget(host_id) == 32768
    bridge.host_data(host_id, b"a" * 32768)
    assert bridge.read_budget(host_id) == 0
    assert host_id in bridge.take_dirty()  # the host side must stop watching the socket
    assert bridge.next_rx(c.HEADER_SIZE + 4096) is not None
    assert bridge.read_budget(host_id) == 0  # 4 KiB free: not worth a read yet
    assert bridge.next_rx(c.HEADER_SIZE + 4096) is not None
    assert bridge.read_budget(host_id) == 8192
    assert host_id in bridge.take_dirty()


def test_slow_host_reader_stops_the_guest_writer() -> None:
    limits = BridgeLimits(buf_alloc=65536)
    h = Harness(VsockBridge(GUEST_CID, limits=limits), listening={LISTEN})
    sock = h.guest.connect(LISTEN)
    h.settle()
    end = h.host_accepted[0]
    data = os.urandom(2 << 20)
    h.guest.write(sock, data)
    h.settle()
    assert h.bridge.buffered() <= 65536
    assert len(sock.tx) >= len(data) - 65536 - 8192  # waiting in the guest: back-pressure
    for _ in range(1000):
        if len(end.received) == len(data):
            break
        h.host_read(end, 30_000)
        h.settle()
    assert bytes(end.received) == data


def test_bridge_asks_for_credit_once_when_blocked() -> None:
    bridge = VsockBridge(GUEST_CID)
    bridge.guest_packet(pkt(c.VIRTIO_VSOCK_OP_REQUEST, buf_alloc=10))
    [connect] = bridge.take_actions()
    assert isinstance(connect, ConnectHost)
    bridge.host_connected(connect.host_id)
    bridge.host_data(connect.host_id, b"0123456789abc")
    ops = [(hh.op, p) for hh, p in rx_all(bridge)]
    assert ops == [
        (c.VIRTIO_VSOCK_OP_RESPONSE, b""),
        (c.VIRTIO_VSOCK_OP_RW, b"0123456789"),
        (c.VIRTIO_VSOCK_OP_CREDIT_REQUEST, b""),
    ]
    bridge.guest_packet(pkt(c.VIRTIO_VSOCK_OP_CREDIT_UPDATE, buf_alloc=10, fwd_cnt=10))
    assert [(hh.op, p) for hh, p in rx_all(bridge)] == [(c.VIRTIO_VSOCK_OP_RW, b"abc")]


def test_credit_request_is_answered_with_credit_update() -> None:
    h, sock, end = connected_harness()
    h.guest.write(sock, b"12345")
    h.settle()
    h.host_read(end, 5)
    h.settle()
    h.bridge.guest_packet(pkt(c.VIRTIO_VSOCK_OP_CREDIT_REQUEST, src_port=sock.local_port))
    [(update, _)] = rx_all(h.bridge)
    assert update.op == c.VIRTIO_VSOCK_OP_CREDIT_UPDATE
    assert (update.buf_alloc, update.fwd_cnt) == (c.DEFAULT_BUF_SIZE, 5)


def test_credit_update_sent_when_guest_may_run_short() -> None:
    h, sock, end = connected_harness()
    h.guest.write(sock, b"x" * 200_000)
    h.settle()
    assert h.bridge.next_rx(4096) is None
    for _ in range(100):
        h.host_read(end, 200_000)
        h.settle()
    assert len(end.received) == 200_000
    assert h.bridge.stats["rx_packets"] < 20  # not one update per packet


def test_rx_buffer_smaller_than_a_header_gets_nothing() -> None:
    bridge = VsockBridge(GUEST_CID)
    bridge.guest_packet(pkt(c.VIRTIO_VSOCK_OP_RW))
    assert bridge.next_rx(43) is None
    assert bridge.next_rx(44) is not None


# ------------------------------------------------------------------ hostile guest
def established_raw() -> tuple[VsockBridge, int]:
    bridge = VsockBridge(GUEST_CID, limits=BridgeLimits(buf_alloc=1000))
    bridge.guest_packet(pkt(c.VIRTIO_VSOCK_OP_REQUEST))
    [connect] = bridge.take_actions()
    assert isinstance(connect, ConnectHost)
    bridge.host_connected(connect.host_id)
    [(resp, _)] = rx_all(bridge)
    assert resp.op == c.VIRTIO_VSOCK_OP_RESPONSE
    return bridge, connect.host_id


def assert_reset(bridge: VsockBridge, host_id: int) -> None:
    [(rst, _)] = rx_all(bridge)
    assert (rst.op, rst.dst_port, rst.src_port) == (c.VIRTIO_VSOCK_OP_RST, 40000, LISTEN)
    assert CloseHost(host_id) in bridge.take_actions()
    assert bridge.connection_count == 0 and bridge.stream_count == 0


def test_credit_violation_resets(caplog: pytest.LogCaptureFixture) -> None:
    bridge, host_id = established_raw()
    bridge.guest_packet(pkt(c.VIRTIO_VSOCK_OP_RW, payload=b"a" * 600))
    with caplog.at_level(logging.WARNING):
        bridge.guest_packet(pkt(c.VIRTIO_VSOCK_OP_RW, payload=b"a" * 401))
    assert "credit" in caplog.text
    assert bridge.stats["bad_credit"] == 1
    assert_reset(bridge, host_id)


def test_credit_exactly_used_is_fine() -> None:
    bridge, host_id = established_raw()
    bridge.guest_packet(pkt(c.VIRTIO_VSOCK_OP_RW, payload=b"a" * 1000))
    assert bridge.connection_count == 1 and len(bridge.host_output(host_id)) == 1000


def test_data_after_shutdown_send_resets() -> None:
    bridge, host_id = established_raw()
    bridge.guest_packet(pkt(c.VIRTIO_VSOCK_OP_SHUTDOWN, flags=c.VIRTIO_VSOCK_SHUTDOWN_SEND))
    assert bridge.take_actions() == [ShutdownHost(host_id, write=True)]
    bridge.guest_packet(pkt(c.VIRTIO_VSOCK_OP_RW, payload=b"late"))
    assert_reset(bridge, host_id)


@pytest.mark.parametrize(
    "raw",
    [
        pkt(c.VIRTIO_VSOCK_OP_REQUEST),  # duplicate
        pkt(c.VIRTIO_VSOCK_OP_RESPONSE),  # out of turn
        pkt(9),  # unknown op
        pkt(c.VIRTIO_VSOCK_OP_SHUTDOWN, flags=8),
        pkt(c.VIRTIO_VSOCK_OP_CREDIT_UPDATE, payload=b"x"),
    ],
)
def test_bad_packet_on_a_connection_resets_it(raw: bytes) -> None:
    bridge, host_id = established_raw()
    bridge.guest_packet(raw)
    assert_reset(bridge, host_id)


def test_wrong_src_cid_is_dropped_silently() -> None:
    bridge, host_id = established_raw()
    bridge.guest_packet(pkt(c.VIRTIO_VSOCK_OP_RW, payload=b"spoof", src_cid=7))
    bridge.guest_packet(pkt(c.VIRTIO_VSOCK_OP_RST, src_cid=7))
    assert bridge.stats["bad_src_cid"] == 2
    assert rx_all(bridge) == [] and bridge.take_actions() == []
    assert bridge.connection_count == 1 and bridge.host_output(host_id) == b""


@pytest.mark.parametrize(
    "raw",
    [
        b"\0" * 10,
        pkt(c.VIRTIO_VSOCK_OP_RW, length=100, payload=b"short")[: 44 + 5],
        pkt(c.VIRTIO_VSOCK_OP_RW, length=100) + b"x" * 50,
    ],
)
def test_malformed_buffers_are_dropped(raw: bytes) -> None:
    bridge, _ = established_raw()
    bridge.guest_packet(raw)
    assert bridge.stats["bad_malformed"] == 1
    assert rx_all(bridge) == [] and bridge.connection_count == 1


def test_unknown_type_is_refused_without_touching_the_stream() -> None:
    bridge, _ = established_raw()
    bridge.guest_packet(pkt(c.VIRTIO_VSOCK_OP_RW, payload=b"dgram", type_=c.VIRTIO_VSOCK_TYPE_SEQPACKET))
    [(rst, _)] = rx_all(bridge)
    assert rst.op == c.VIRTIO_VSOCK_OP_RST and bridge.connection_count == 1


def test_packets_for_no_connection_get_rst_but_rst_gets_nothing() -> None:
    bridge = VsockBridge(GUEST_CID)
    bridge.guest_packet(pkt(c.VIRTIO_VSOCK_OP_RW, payload=b"ghost", src_port=1, dst_port=2))
    bridge.guest_packet(pkt(c.VIRTIO_VSOCK_OP_RST, src_port=3, dst_port=4))
    bridge.guest_packet(pkt(c.VIRTIO_VSOCK_OP_REQUEST, dst_cid=77, src_port=5))
    got = rx_all(bridge)
    assert [(x.op, x.src_cid, x.src_port, x.dst_port) for x, _ in got] == [
        (c.VIRTIO_VSOCK_OP_RST, 2, 2, 1),
        (c.VIRTIO_VSOCK_OP_RST, 77, LISTEN, 5),
    ]
    assert all(x.dst_cid == GUEST_CID for x, _ in got)


def test_flood_keeps_memory_bounded_and_others_served() -> None:
    limits = BridgeLimits(max_streams=8, max_pending_resets=100)
    h = Harness(VsockBridge(GUEST_CID, limits=limits), listening={LISTEN})
    good = h.guest.connect(LISTEN)
    h.settle()
    # thousands of connection attempts and ghost packets while posting no rx buffers
    for port in range(5000):
        h.bridge.guest_packet(pkt(c.VIRTIO_VSOCK_OP_REQUEST, src_port=10_000 + port))
        h.bridge.guest_packet(pkt(c.VIRTIO_VSOCK_OP_RW, payload=b"x", src_port=20_000 + port, dst_port=9))
        h._actions()
    assert h.bridge.stream_count <= 8
    assert len(h.bridge._resets) <= 100
    assert h.bridge.stats["bad_reset_flood"] > 0 and h.bridge.stats["bad_table_full"] > 0
    # the well-behaved connection still works
    h.guest.write(good, b"still here")
    h.settle()
    assert h.host_read(h.host_accepted[0], 100) == b"still here"


def test_table_full_refuses_host_connections_too() -> None:
    bridge = VsockBridge(GUEST_CID, limits=BridgeLimits(max_streams=1))
    first = bridge.host_accepted()
    second = bridge.host_accepted()
    assert bridge.take_actions() == [CloseHost(second)]
    assert bridge.host_ids() == [first]


def test_host_streams_of_a_reset_are_closed_and_event_queued() -> None:
    h, sock, end = connected_harness()
    h.guest.listen(GUEST_LISTEN)
    other = h.host_connect(GUEST_LISTEN)
    h.settle()
    assert h.bridge.take_event() is None
    h.bridge.transport_reset()
    h._actions()
    assert end.closed and other.closed
    assert h.bridge.stream_count == 0 and h.bridge.next_rx(4096) is None
    assert h.bridge.take_event() == b"\0\0\0\0"
    assert h.bridge.take_event() is None
    # after the reset, the guest's stale packets get RST and new connections work
    h.guest.write(sock, b"stale")
    h.guest_tx()
    [(rst, _)] = rx_all(h.bridge)
    assert rst.op == c.VIRTIO_VSOCK_OP_RST
    fresh = h.guest.connect(LISTEN)
    h.settle()
    assert fresh.state == "established"


def test_guest_cid_is_validated() -> None:
    for bad in (0, 1, 2, 0xFFFFFFFF):
        with pytest.raises(ValueError, match="guest CID"):
            VsockBridge(bad)
    with pytest.raises(ValueError, match="buf_alloc"):
        BridgeLimits(buf_alloc=0)


def test_host_work_pending_says_when_actions_or_streams_wait() -> None:
    """The host side skips its pump loop when this is False: it must never hide work."""
    h = Harness(listening={LISTEN})
    bridge = h.bridge
    bridge.take_actions()
    bridge.take_dirty()
    assert not bridge.host_work_pending
    bridge.guest_packet(pkt(c.VIRTIO_VSOCK_OP_REQUEST))  # a ConnectHost to carry out
    assert bridge.host_work_pending
    [connect] = bridge.take_actions()
    assert isinstance(connect, ConnectHost)
    bridge.take_dirty()
    assert not bridge.host_work_pending
    bridge.host_connected(connect.host_id)  # its watch changes
    assert bridge.host_work_pending
    assert bridge.take_dirty() == {connect.host_id}
    assert not bridge.host_work_pending
