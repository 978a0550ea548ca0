"""The bridge's fast path for RW and CREDIT_UPDATE decides exactly as its general path.

Two bridges in the same state are fed the same packets -- well formed ones and every
way the fast path's checks can fail (wrong CID, type, flags, length, credit, a
shutdown connection, unknown connection) -- one through ``guest_packet`` (fast path
where it applies), the other only through the general path.  Everything either
bridge hands out afterwards must be the same.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_nsm.vsock import BridgeLimits, ConnectHost, VsockBridge
from virtio_nsm.vsock import constants as c

GUEST_CID = 5
GUEST_PORT, HOST_PORT = 40000, 1000
HEADER = struct.Struct("<QQIIIHHIII")


def established(buf_alloc: int = 1000) -> tuple[VsockBridge, int]:
    bridge = VsockBridge(GUEST_CID, limits=BridgeLimits(buf_alloc=buf_alloc, host_buffer=500))
    bridge.take_event()
    bridge.guest_packet(
        HEADER.pack(GUEST_CID, c.VMADDR_CID_HOST, GUEST_PORT, HOST_PORT, 0, c.VIRTIO_VSOCK_TYPE_STREAM,
                    c.VIRTIO_VSOCK_OP_REQUEST, 0, 4096, 0)
    )
    [connect] = bridge.take_actions()
    assert isinstance(connect, ConnectHost)
    bridge.host_connected(connect.host_id)
    bridge.host_data(connect.host_id, b"h" * 300)  # host bytes waiting for the guest's credit
    return bridge, connect.host_id


def payload(n: int) -> bytes:
    return (bytes(range(256)) * (n // 256 + 1))[:n]


# (op, flags, payload length) of packets a guest sends on the connection ...
WELL_FORMED = [
    (c.VIRTIO_VSOCK_OP_RW, 0, 1),
    (c.VIRTIO_VSOCK_OP_RW, 0, 200),
    (c.VIRTIO_VSOCK_OP_RW, 0, 600),
    (c.VIRTIO_VSOCK_OP_RW, 0, 0),
    (c.VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0, 0),
    (c.VIRTIO_VSOCK_OP_CREDIT_REQUEST, 0, 0),
    (c.VIRTIO_VSOCK_OP_SHUTDOWN, c.VIRTIO_VSOCK_SHUTDOWN_SEND, 0),
    (c.VIRTIO_VSOCK_OP_SHUTDOWN, c.VIRTIO_VSOCK_SHUTDOWN_RCV, 0),
    (c.VIRTIO_VSOCK_OP_RST, 0, 0),
]
# ... and one way to spoil each (or none).
MUTATIONS = ["none"] * 6 + ["src_cid", "dst_cid", "cid_3", "type", "flags", "port", "op", "long",
                            "short", "huge", "truncated", "payload_on_control"]


@st.composite
def packets(draw: st.DrawFn) -> bytes:
    op, flags, length = draw(st.sampled_from(WELL_FORMED))
    src_cid, dst_cid, type_, src_port = GUEST_CID, c.VMADDR_CID_HOST, c.VIRTIO_VSOCK_TYPE_STREAM, GUEST_PORT
    buf_alloc = draw(st.sampled_from([0, 100, 4096, (1 << 32) - 1]))
    fwd_cnt = draw(st.integers(0, 400) | st.just((1 << 32) - 1))
    body = length
    mutation = draw(st.sampled_from(MUTATIONS))
    if mutation == "src_cid":
        src_cid += 1
    elif mutation == "dst_cid":
        dst_cid = 7
    elif mutation == "cid_3":  # the same host, by its other address: another connection
        dst_cid = c.NITRO_PARENT_CID
    elif mutation == "type":
        type_ = 2
    elif mutation == "flags":
        flags = draw(st.sampled_from([1, 2, 4, 8, 1 << 31]))
    elif mutation == "port":
        src_port += 1
    elif mutation == "op":
        op = draw(st.sampled_from([0, 9, c.VIRTIO_VSOCK_OP_REQUEST, c.VIRTIO_VSOCK_OP_RESPONSE]))
    elif mutation == "long":  # bytes after the payload (ignored)
        body = length + 3
    elif mutation == "short":  # fewer payload bytes than len says
        length, body = length + 1, length
    elif mutation == "huge":
        length = draw(st.sampled_from([1001, c.MAX_PKT_PAYLOAD, c.MAX_PKT_PAYLOAD + 1]))
        body = min(length, c.MAX_PKT_PAYLOAD + 1)
    elif mutation == "payload_on_control":
        length = body = 1
    raw = HEADER.pack(src_cid, dst_cid, src_port, HOST_PORT, length, type_, op, flags, buf_alloc, fwd_cnt)
    raw += payload(body)
    if mutation == "truncated":
        raw = raw[: draw(st.sampled_from([0, 10, 43]))]
    return raw


def observe(bridge: VsockBridge, host_id: int, taken: int) -> tuple[object, ...]:
    out = bytes(bridge.host_output(host_id))
    if out:
        bridge.host_sent(host_id, min(len(out), taken))
    rx = []
    while (p := bridge.next_rx(4096 + 44)) is not None:
        rx.append(p)
    return (rx, bridge.take_actions(), out, bridge.buffered(), bridge.read_budget(host_id),
            bridge.connection_count, bridge.stream_count, dict(bridge.stats))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([1000, 200_000]), st.lists(st.tuples(packets(), st.integers(0, 700)), min_size=1, max_size=12))
def test_fast_and_general_paths_agree(buf_alloc: int, steps: list[tuple[bytes, int]]) -> None:
    fast, host_id = established(buf_alloc)
    general, other = established(buf_alloc)
    assert host_id == other
    for raw, taken in steps:
        fast.guest_packet(raw)
        general.stats["tx_packets"] += 1
        general._guest_packet(raw)
        assert observe(fast, host_id, taken) == observe(general, host_id, taken)


def test_well_formed_data_and_credit_updates_take_the_fast_path() -> None:
    """The point of the fast path: no Header objects for the usual packets."""
    bridge, host_id = established()
    calls: list[bytes] = []
    general = bridge._guest_packet

    def counting(raw: bytes | memoryview) -> None:
        calls.append(bytes(raw))
        general(raw)

    bridge._guest_packet = counting  # type: ignore[method-assign]
    rw = HEADER.pack(GUEST_CID, c.VMADDR_CID_HOST, GUEST_PORT, HOST_PORT, 3, c.VIRTIO_VSOCK_TYPE_STREAM,
                     c.VIRTIO_VSOCK_OP_RW, 0, 4096, 0) + b"abc"
    cu = HEADER.pack(GUEST_CID, c.VMADDR_CID_HOST, GUEST_PORT, HOST_PORT, 0, c.VIRTIO_VSOCK_TYPE_STREAM,
                     c.VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0, 4096, 0)
    bridge.guest_packet(rw)
    bridge.guest_packet(cu)
    assert calls == []
    assert bytes(bridge.host_output(host_id)) == b"abc"
    bridge.guest_packet(rw[:-1])  # one payload byte short: the general path drops it
    assert calls == [rw[:-1]] and bridge.stats["bad_malformed"] == 1
