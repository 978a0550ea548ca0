"""Migration through VHOST_USER_PROTOCOL_F_DEVICE_STATE, driven by our frontend."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from durable_support import PcrModel

from virtio_nsm import persist
from virtio_nsm.durable import DurableNsm
from virtio_nsm.nsm.frontend import NsmFrontend
from virtio_nsm.nsm.protocol import DescribeNSM, DescribePCR, decode_response, encode_request
from virtio_nsm.nsm.virtio import NsmVirtioDevice
from virtio_nsm.vhost_user.daemon import VhostUserDaemon
from virtio_nsm.vhost_user.frontend import VhostUserError


class Served:
    def __init__(self, nsm: DurableNsm, sock: Path) -> None:
        self.nsm, self.sock = nsm, sock
        self.daemon = VhostUserDaemon(sock, NsmVirtioDevice(nsm.handle, device_state=nsm), message_timeout=5.0)
        self.daemon.bind()
        self.thread = threading.Thread(target=self.daemon.serve_forever, daemon=True)
        self.thread.start()
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.daemon.stop()
        self.thread.join(10)
        self.daemon.close()
        self.nsm.close()


@pytest.fixture
def source(tmp_path: Path) -> Iterator[Served]:
    served = Served(DurableNsm.open(tmp_path / "a"), tmp_path / "a.sock")
    yield served
    served.close()


@pytest.fixture
def destination(tmp_path: Path) -> Iterator[Served]:
    served = Served(DurableNsm.open(tmp_path / "b"), tmp_path / "b.sock")
    yield served
    served.close()


def pcrs(frontend: NsmFrontend) -> list[tuple[bool, bytes]]:
    answers = frontend.exchange_many([encode_request(DescribePCR(i)) for i in range(32)])
    return [(r.lock, r.data) for r in map(decode_response, answers)]  # type: ignore[union-attr]


def module_id(frontend: NsmFrontend) -> str:
    return decode_response(frontend.exchange(encode_request(DescribeNSM()))).module_id  # type: ignore[union-attr]


def test_state_moves_to_another_backend(source: Served, destination: Served, tmp_path: Path) -> None:
    model = PcrModel()
    with NsmFrontend(source.sock, inflight=True, timeout=20) as f1:
        for i in range(5):
            request, expected = model.extend(16 + i % 2, bytes([i]))
            assert f1.exchange(request) == expected
        f1.exchange(model.lock(17)[0])
        before, source_id = pcrs(f1), module_id(f1)
        f1.get_vring_base()  # suspend the device: the spec's "stopped" phase
        data = f1.save_device_state()
    # The same versioned, checksummed bytes as `nsm state export`.
    assert data == persist.export_state(tmp_path / "a")

    with NsmFrontend(destination.sock, inflight=True, timeout=20, start=False) as f2:
        f2.load_device_state(data)
        f2.start_ring()
        assert module_id(f2) == source_id
        assert pcrs(f2) == before
        request, expected = model.extend(17, b"after migration")  # PCR17 is locked
        assert f2.exchange(request) == expected
        request, expected = model.extend(16, b"after migration")
        assert f2.exchange(request) == expected
    # Durable on the destination before CHECK_DEVICE_STATE said yes, and on every change.
    destination.close()
    with persist.StateStore.open(tmp_path / "b") as store:
        assert store.state.module_id == source_id
        assert store.state.pcrs.values[16] == model.values[16]
        assert store.state.pcrs.is_locked(17)


def test_source_resumes_when_migration_is_abandoned(source: Served) -> None:
    model = PcrModel()
    with NsmFrontend(source.sock, timeout=20) as f1:
        request, expected = model.extend(20, b"x")
        assert f1.exchange(request) == expected
        f1.get_vring_base()
        f1.save_device_state()
        f1.start_ring()
        request, expected = model.extend(20, b"y")
        assert f1.exchange(request) == expected


@pytest.mark.parametrize("data", [b"", b"garbage", b"NSMSTATE" + bytes(60)])
def test_bad_state_is_refused_and_changes_nothing(destination: Served, data: bytes) -> None:
    with NsmFrontend(destination.sock, timeout=20, start=False) as f2:
        with pytest.raises(VhostUserError, match="CHECK_DEVICE_STATE"):
            f2.load_device_state(data)
        f2.start_ring()
        assert module_id(f2) == destination.nsm.device.state.module_id
        assert destination.nsm.store is not None and destination.nsm.store.snapshot.seq == 0


def test_transfer_refused_while_the_ring_runs(source: Served) -> None:
    with NsmFrontend(source.sock, timeout=20) as f1:
        with pytest.raises(VhostUserError, match="refused"):
            f1.save_device_state()
        f1.exchange(encode_request(DescribeNSM()))  # the connection is still fine


def test_ephemeral_device_state_round_trip(tmp_path: Path) -> None:
    served = Served(DurableNsm.ephemeral(), tmp_path / "e.sock")
    try:
        with NsmFrontend(served.sock, timeout=20) as f:
            f.exchange(PcrModel().extend(16, b"e")[0])
            f.get_vring_base()
            snapshot = persist.decode_snapshot(f.save_device_state())
        assert snapshot.state == served.nsm.device.state
    finally:
        served.close()
