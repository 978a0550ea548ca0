"""A hostile guest's packets, arbitrary and near-valid, never break the bridge (hypothesis).

Whatever the tx queue holds: no exception escapes, every packet the bridge emits is a
well-formed one addressed to the guest, memory and queues stay within their limits, and
a well-behaved connection opened afterwards still works.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from vsock.vsock_harness import GUEST_CID, Harness

from virtio_nsm.vsock import BridgeLimits, Header, VsockBridge
from virtio_nsm.vsock import constants as c
from virtio_nsm.vsock.packet import decode, problem

# (at most 8 fuzzed connections can exist: 4 source ports x 2 host CIDs; room is left for one more)
LIMITS = BridgeLimits(buf_alloc=4096, host_buffer=4096, max_streams=9, max_pending_resets=16)

near_valid = st.builds(
    lambda src, dst, sp, dp, ty, op, fl, ba, fc, payload, extra: (
        Header(src, dst, sp, dp, len(payload) + extra, ty, op, fl, ba, fc).encode() + payload
    ),
    src=st.sampled_from([GUEST_CID, GUEST_CID, 2, 3, 0, 2**64 - 1]),
    dst=st.sampled_from([2, 3, 2, GUEST_CID, 1, 2**32]),
    sp=st.integers(0, 3),
    dp=st.sampled_from([1000, 1000, 2000, 2**32 - 1]),
    ty=st.sampled_from([1, 1, 1, 2, 0, 0xFFFF]),
    op=st.integers(0, 9),
    fl=st.sampled_from([0, 0, 1, 2, 3, 4, 2**32 - 1]),
    ba=st.sampled_from([0, 1, 4096, 2**32 - 1]),
    fc=st.sampled_from([0, 1, 4096, 2**32 - 1]),
    payload=st.binary(max_size=5000),
    extra=st.sampled_from([0, 0, 0, 1, 100]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(near_valid, st.binary(max_size=100)), max_size=60), st.data())
def test_hostile_packets(packets: list[bytes], data: st.DataObject) -> None:
    h = Harness(VsockBridge(GUEST_CID, limits=LIMITS), listening={1000})
    bridge = h.bridge
    for packet in packets:
        bridge.guest_packet(packet)
        h._actions()
        if data.draw(st.booleans()):
            for end in list(h.hosts.values()):
                h.host_io(end)
                h.host_write(end, b"x" * 100) if not end.shut_wr and not end.closed else None
        if data.draw(st.booleans()):
            capacity = data.draw(st.sampled_from([44, 45, 4096]))
            while (out := bridge.next_rx(capacity)) is not None:
                assert len(out) <= capacity
                header, _ = decode(out)
                assert problem(header) is None and header.dst_cid == GUEST_CID
        assert bridge.stream_count <= LIMITS.max_streams
        assert len(bridge._resets) <= LIMITS.max_pending_resets
        assert bridge.buffered() <= LIMITS.memory_bound
    # a well-behaved connection still works afterwards
    h.guest.listen(1)
    sock = h.guest.connect(1000, local_port=60000)
    h.settle()
    assert sock.state == "established"
    h.guest.write(sock, b"still fine")
    h.settle()
    end = h.host_accepted[-1]
    assert h.host_read(end, 100) == b"still fine"
    assert h.guest.violations == []


def test_every_op_and_type_without_a_connection_gets_at_most_one_rst() -> None:
    bridge = VsockBridge(GUEST_CID, limits=LIMITS)
    for ty in (0, 1, 2, 3):
        for op in range(9):
            bridge.guest_packet(Header(GUEST_CID, 2, 7, 4000 + op, 0, ty, op).encode())
    out = []
    while (p := bridge.next_rx(4096)) is not None:
        out.append(decode(p)[0])
    assert all(h.op == c.VIRTIO_VSOCK_OP_RST for h in out)
    keys = [(h.src_port, h.dst_port) for h in out]
    assert len(keys) == len(set(keys)) <= LIMITS.max_pending_resets
