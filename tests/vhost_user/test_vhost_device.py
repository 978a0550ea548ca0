"""The device interface: a second device (two queues, a config space, a descriptor of its
own, a feature bit, a migratable state) served by the same daemon, driven by the generic
frontend.  Nothing in it is NSM-specific."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vhost_support import Running, TwoQueueDevice, serve_in_thread, wait_for

from virtio_nsm.nsm.virtio import NsmVirtioDevice
from virtio_nsm.vhost_user.backend import OFFERED_PROTOCOL_FEATURES, TRANSPORT_FEATURES, VhostUserBackend
from virtio_nsm.vhost_user.frontend import VhostUserError, VhostUserFrontend
from virtio_nsm.vhost_user.message import (
    U64,
    DeviceConfig,
    FrontendRequest,
    Message,
    ProtocolFeature,
)
from virtio_nsm.virtio.queue import Segment

R = FrontendRequest
CONFIG = 1 << ProtocolFeature.VHOST_USER_PROTOCOL_F_CONFIG


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Running]:
    with serve_in_thread(tmp_path / "dev.sock", TwoQueueDevice(), message_timeout=2.0) as run:
        yield run


def frontend(path: Path, **options: object) -> VhostUserFrontend:
    return VhostUserFrontend(path, num_queues=2, queue_size=16, buffer_size=0x2000,
                             device_features=TwoQueueDevice.F_SHOUT, timeout=10, **options)  # type: ignore[arg-type]


def send(fe: VhostUserFrontend, index: int, data: bytes, room: int) -> int:
    """Queue one chain on ``index``: ``data`` readable (if any), then ``room`` writable bytes."""
    base = fe.buffers + 0x1000 * index
    fe.memory.write(base, data)
    segments = [Segment(base, len(data))] if data else []
    segments.append(Segment(base + 0x800, room, True))
    head = fe.queues[index].add(segments)
    fe.queues[index].request_interrupt_after(1)
    if fe.queues[index].publish():
        fe.kick(index)
    return head


def answer(fe: VhostUserFrontend, index: int) -> bytes:
    ((_, length),) = fe.wait_used(1, index)
    return fe.memory.read(fe.buffers + 0x1000 * index + 0x800, length)


def test_two_queues_features_and_config(served: Running) -> None:
    device = served.device
    with frontend(served.path) as fe:
        assert fe.features & TwoQueueDevice.F_SHOUT and device.acked & TwoQueueDevice.F_SHOUT
        assert fe.protocol_features & CONFIG
        # Queue 0: echo, upper-cased because the feature was acked.
        send(fe, 0, b"hello", 16)
        assert answer(fe, 0) == b"HELLO"
        # Configuration space: read, write the writable part, refused elsewhere.
        assert fe.get_config(0, 8) == b"TESTtag0"
        fe.set_config(4, b"ab")
        assert fe.get_config(4, 4) == b"abg0" and device.tag == b"abg0"
        with pytest.raises(VhostUserError, match="refused"):
            fe.set_config(0, b"XXXX")
        with pytest.raises(VhostUserError, match="refused"):
            fe.get_config(6, 4)  # past the end: a reply of size 0
        assert fe.get_config(0, 4) == b"TEST"  # the connection is still up


def test_device_descriptor_feeds_queue_one_without_a_kick(served: Running) -> None:
    device = served.device
    with frontend(served.path) as fe:
        send(fe, 1, b"", 64)  # an empty receive buffer
        time.sleep(0.05)
        assert not fe.queues[1].collect_used()  # nothing to deliver yet
        os.write(device.host_w, b"from the host")
        assert answer(fe, 1) == b"tag0from the host"


def test_state_transfer_and_reset_hooks(served: Running, tmp_path: Path) -> None:
    device = served.device
    with frontend(served.path) as fe:
        fe.set_config(4, b"save")
        for index in (0, 1):
            fe.get_vring_base(index)
        state = fe.save_device_state()
        assert state == b"tag=save"
    wait_for(lambda: device.resets >= 1, "the device told of the disconnect")
    device.tag = b"gone"
    with frontend(served.path, start=False) as fe:
        fe.load_device_state(state)
        assert device.tag == b"save"
        with pytest.raises(VhostUserError, match="failed transfer"):
            fe.load_device_state(b"junk")
        fe.start_ring()
        send(fe, 0, b"again", 16)
        assert answer(fe, 0) == b"AGAIN"


def test_unwatched_device_descriptor_and_failing_callback(
    served: Running, caplog: pytest.LogCaptureFixture
) -> None:
    device, daemon = served.device, served.daemon

    def broken(ready: int) -> None:
        raise RuntimeError("device bug")

    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        with caplog.at_level(logging.ERROR, logger="virtio_nsm.vhost_user"):
            daemon.watch(r, 1, broken)  # (a test reaching into the loop: thread-unsafe but quiet)
            os.write(w, b"x")
            wait_for(lambda: "device callback for fd" in caplog.text, "the failing callback logged")
        wait_for(lambda: r not in daemon._watches, "the failing fd unwatched")
        with frontend(served.path) as fe:  # the daemon still serves
            send(fe, 0, b"ok", 16)
            assert answer(fe, 0) == b"OK"
    finally:
        os.close(r)
        os.close(w)
    assert device.host_r in daemon._watches


def test_backend_offers_what_the_device_has() -> None:
    nsm = VhostUserBackend(NsmVirtioDevice(lambda r, t=None, **kw: r))
    assert nsm.offered_protocol_features == OFFERED_PROTOCOL_FEATURES  # NSM: unchanged
    assert not nsm.offered_protocol_features & CONFIG
    assert nsm.offered_features == TRANSPORT_FEATURES
    device = TwoQueueDevice()
    try:
        two = VhostUserBackend(device)
        assert two.offered_protocol_features & CONFIG
        assert two.offered_features == TRANSPORT_FEATURES | TwoQueueDevice.F_SHOUT
        assert two.num_queues == 2 and two.max_queue_size == 256
        two.handle(Message(R.VHOST_USER_SET_PROTOCOL_FEATURES, payload=U64(CONFIG).encode()))
        reply = two.handle(Message(R.VHOST_USER_GET_CONFIG, payload=DeviceConfig(0, 8, 0, bytes(8)).encode()))
        assert reply is not None and DeviceConfig.decode(reply.payload).data == b"TESTtag0"
        reply = two.handle(Message(R.VHOST_USER_GET_CONFIG, payload=DeviceConfig(4, 8, 0, bytes(8)).encode()))
        assert reply is not None and DeviceConfig.decode(reply.payload).size == 0
    finally:
        device.detach()  # its pipe


@pytest.mark.parametrize(
    ("attribute", "value", "match"),
    [("num_queues", 0, "1..256 queues"), ("max_queue_size", 48, "power of two"),
     ("features", 1 << 32, "overlap"), ("config_size", 257, "at most 256")],
)
def test_backend_refuses_an_impossible_device(attribute: str, value: int, match: str) -> None:
    device = TwoQueueDevice()
    try:
        setattr(device, attribute, value)
        with pytest.raises(ValueError, match=match):
            VhostUserBackend(device)
    finally:
        device.detach()  # its pipe
