"""The backend's side of GET/SET_INFLIGHT_FD, through our frontend and a real daemon."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtio_nsm.nsm.device import NsmDevice
from virtio_nsm.nsm.frontend import NsmFrontend
from virtio_nsm.nsm.protocol import DescribeNSM, encode_request
from virtio_nsm.nsm.virtio import NsmVirtioDevice
from virtio_nsm.vhost_user.daemon import VhostUserDaemon
from virtio_nsm.vhost_user.frontend import VhostUserError
from virtio_nsm.vhost_user.inflight import InflightRegion
from virtio_nsm.vhost_user.message import (
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_VERSION,
    FrontendRequest,
    Inflight,
    Message,
)
from virtio_nsm.virtio import spec


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "nsm.sock"
    daemon = VhostUserDaemon(path, NsmVirtioDevice(NsmDevice().handle), message_timeout=5.0)
    daemon.bind()
    thread = threading.Thread(target=daemon.serve_forever, daemon=True)
    thread.start()
    yield path
    daemon.stop()
    thread.join(10)
    daemon.close()


def test_region_for_another_queue_size_breaks_the_ring(sock: Path) -> None:
    with NsmFrontend(sock, inflight=True, timeout=10, queue_size=64) as frontend:
        frontend.exchange(encode_request(DescribeNSM()))
        foreign = InflightRegion.create(1, 32)
        try:
            payload = Inflight(foreign.mmap_size, 0, 1, 32).encode()
            # Acknowledged (REPLY_ACK), so it is applied before the next kick.
            frontend.request(Message(FrontendRequest.VHOST_USER_SET_INFLIGHT_FD,
                                     VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK,
                                     payload=payload, fds=[foreign.fd]))
        finally:
            foreign.close()
        with pytest.raises(VhostUserError, match="vring error"):
            frontend.exchange(encode_request(DescribeNSM()))
        assert frontend.get_status() & spec.VIRTIO_CONFIG_S_NEEDS_RESET


def test_inflight_messages_need_the_protocol_feature(sock: Path) -> None:
    with NsmFrontend(sock, timeout=10) as frontend:
        assert not frontend.inflight
        with pytest.raises(VhostUserError):
            frontend.request(Message(FrontendRequest.VHOST_USER_GET_INFLIGHT_FD,
                                     payload=Inflight(0, 0, 1, 64).encode()))


def test_reconnect_to_the_same_backend_keeps_serving(sock: Path) -> None:
    # A frontend that reconnects (e.g. after its own restart of the chardev) hands the
    # same region to the same backend: nothing is in flight, nothing is resubmitted.
    with NsmFrontend(sock, inflight=True, timeout=10) as frontend:
        first = frontend.exchange(encode_request(DescribeNSM()))
        frontend.reconnect(timeout=10)
        assert frontend.exchange(encode_request(DescribeNSM())) == first
        assert frontend.reconnects == 1


def test_first_region_for_a_ring_that_has_run_resumes_at_the_used_index(sock: Path) -> None:
    # What a migration destination does: its ring arrives far along (with the guest's
    # memory) and its first region, fresh from GET_INFLIGHT_FD, has never tracked
    # anything. The ring must go on from used->idx, not break with "used index N is N
    # past the recorded 0".
    with NsmFrontend(sock, inflight=True, timeout=10) as frontend:
        request = encode_request(DescribeNSM())
        answer = frontend.exchange(request)
        for _ in range(40):  # 80 used entries: more than a ring (64) ahead of 0
            assert frontend.exchange(request) == answer
        assert frontend.queue.used_idx > 64
        fresh = InflightRegion.create(1, 64)  # what GET_INFLIGHT_FD hands out
        try:
            payload = Inflight(fresh.mmap_size, 0, 1, 64).encode()
            frontend.request(Message(FrontendRequest.VHOST_USER_SET_INFLIGHT_FD,
                                     VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK,
                                     payload=payload, fds=[fresh.fd]))
            frontend.start_ring()  # the ring starts again, now with the fresh region
            assert frontend.exchange(request) == answer
            assert not frontend.get_status() & spec.VIRTIO_CONFIG_S_NEEDS_RESET
            # The region now records where the ring is.
            assert fresh.queue(0).used_idx == frontend.queue.used_idx
        finally:
            fresh.close()
