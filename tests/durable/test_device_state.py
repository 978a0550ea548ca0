"""Migration through VHOST_USER_PROTOCOL_F_DEVICE_STATE, driven by our frontend."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from durable_support import PcrModel

from virtio_nsm import persist
from virtio_nsm.durable import DurableNsm
from virtio_nsm.errors import ErrorCode
from virtio_nsm.nsm.device import DeviceState
from virtio_nsm.nsm.frontend import NsmFrontend
from virtio_nsm.nsm.pcr import Digest, PcrBank
from virtio_nsm.nsm.pki import CertificateAuthority
from virtio_nsm.nsm.protocol import (
    DescribeNSM,
    DescribePCR,
    ExtendPCR,
    decode_response,
    encode_error,
    encode_request,
)
from virtio_nsm.nsm.virtio import NsmVirtioDevice
from virtio_nsm.vhost_user.daemon import VhostUserDaemon
from virtio_nsm.vhost_user.frontend import VhostUserError
from virtio_nsm.vhost_user.message import VHOST_TRANSFER_STATE_DIRECTION_LOAD


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
def destination(tmp_path: Path, source: Served) -> Iterator[Served]:
    # A migration destination holds a copy of the source's CA (README: copy DIR/ca/).
    assert source.nsm.store is not None
    served = Served(DurableNsm.open(tmp_path / "b", ca=source.nsm.store.ca), tmp_path / "b.sock")
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
    # The same signed snapshot as `nsm state export` makes (signatures differ each time).
    assert source.nsm.store is not None
    root = source.nsm.store.ca.certificate
    assert persist.verify_snapshot(data, root).snapshot == \
        persist.verify_snapshot(persist.export_state(tmp_path / "a"), root).snapshot

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
            data = f.save_device_state()
            snapshot = persist.verify_snapshot(data, served.nsm.device.ca.certificate).snapshot
            assert snapshot.state == served.nsm.device.state and snapshot.seq == 1
            f.load_device_state(data)  # its own state again: accepted
            f.start_ring()
            f.exchange(PcrModel().lock(16)[0])
            f.get_vring_base()
            with pytest.raises(VhostUserError, match="CHECK_DEVICE_STATE"):
                f.load_device_state(data)  # but not once PCR16 is locked
            f.start_ring()
            assert pcrs(f)[16][0] is True
    finally:
        served.close()


# -- issue 11 D2: a state load must never unlock a PCR ------------------------------

def boot_locked(frontend: NsmFrontend) -> bool:
    return all(lock for lock, _ in pcrs(frontend)[:16])


def unlocked_state(like: DeviceState, module: str | None = None) -> DeviceState:
    """The attack's state: every PCR zero and unlocked."""
    bank = like.pcrs
    return DeviceState(module or like.module_id, PcrBank(bank.digest, (bytes(bank.digest.size),) * bank.max_pcrs, 0))


def foreign_state() -> DeviceState:
    """Another module id, SHA256, one PCR, version 9.9.9."""
    return DeviceState("i-0123456789abcdef0-enc0123456789abcdef",
                       PcrBank(Digest.SHA256, (bytes(32),), 0), (9, 9, 9))


def assert_untouched(served: Served, sock: Path, before: list[tuple[bool, bytes]], seq: int) -> None:
    with NsmFrontend(sock, timeout=20) as f:
        assert pcrs(f) == before
        assert boot_locked(f)
    assert served.nsm.store is not None and served.nsm.store.snapshot.seq == seq


def crafted_loads(destination: Served, tmp_path: Path) -> dict[str, bytes]:
    store = destination.nsm.store
    assert store is not None
    current = store.snapshot
    other_ca = CertificateAuthority.generate()
    now = time.time()
    unsigned = persist.encode_snapshot(persist.Snapshot(unlocked_state(current.state), current.seq + 5))
    signed = bytearray(persist.sign_snapshot(current, store.ca, now))
    signed[40] ^= 1
    return {
        # the original attack: the checksummed state format with a recomputed checksum
        "unsigned, all unlocked": unsigned,
        "signed by another CA": persist.sign_snapshot(
            persist.Snapshot(unlocked_state(current.state), current.seq + 5), other_ca, now),
        "tampered signed snapshot": bytes(signed),
        # what even the CA key holder's signature does not make acceptable
        "signed, boot PCRs unlocked": persist.sign_snapshot(
            persist.Snapshot(unlocked_state(current.state), current.seq + 5), store.ca, now),
        "signed, foreign device": persist.sign_snapshot(
            persist.Snapshot(foreign_state(), current.seq + 5), store.ca, now),
        "signed, seq -1": persist.sign_snapshot(persist.Snapshot(current.state, -1), store.ca, now),
        "signed, an hour old": persist.sign_snapshot(current, store.ca, now - 3600),
    }


@pytest.mark.parametrize("case", ["unsigned, all unlocked", "signed by another CA", "tampered signed snapshot",
                                  "signed, boot PCRs unlocked", "signed, foreign device", "signed, seq -1",
                                  "signed, an hour old"])
def test_crafted_state_load_is_refused(destination: Served, tmp_path: Path, case: str) -> None:
    with NsmFrontend(destination.sock, timeout=20) as f:
        f.exchange(PcrModel().lock(20)[0])
        before = pcrs(f)
        f.get_vring_base()
        seq = destination.nsm.store.snapshot.seq  # type: ignore[union-attr]
        data = crafted_loads(destination, tmp_path)[case]
        with pytest.raises(VhostUserError, match="CHECK_DEVICE_STATE"):
            f.load_device_state(data)
        f.start_ring()
        assert pcrs(f) == before
        assert f.exchange(encode_request(ExtendPCR(3, b"boot PCR"))) == encode_error(ErrorCode.ReadOnlyIndex)
    assert_untouched(destination, destination.sock, before, seq)
    # and after a restart
    destination.close()
    with persist.StateStore.open(tmp_path / "b") as store:
        assert store.state.pcrs.locked == (1 << 16) - 1 | 1 << 20


def test_rollback_to_an_earlier_save_is_refused(source: Served, tmp_path: Path) -> None:
    with NsmFrontend(source.sock, timeout=20) as f:
        f.get_vring_base()
        old = f.save_device_state()  # PCR16 unlocked here
        f.start_ring()
        f.exchange(PcrModel().lock(16)[0])
        before = pcrs(f)
        f.get_vring_base()
        with pytest.raises(VhostUserError, match="CHECK_DEVICE_STATE"):
            f.load_device_state(old)
        f.start_ring()
        assert pcrs(f) == before and before[16][0] is True


def test_another_identity_only_on_a_device_that_never_changed(source: Served, destination: Served) -> None:
    with NsmFrontend(source.sock, timeout=20) as f1:
        source_id = module_id(f1)
        f1.get_vring_base()
        data = f1.save_device_state()
    with NsmFrontend(destination.sock, timeout=20) as f2:
        f2.exchange(PcrModel().extend(16, b"used")[0])  # the destination has a life of its own now
        own_id = module_id(f2)
        f2.get_vring_base()
        with pytest.raises(VhostUserError, match="CHECK_DEVICE_STATE"):
            f2.load_device_state(data)
        f2.start_ring()
        assert module_id(f2) == own_id != source_id


def test_destination_with_another_ca_refuses(source: Served, tmp_path: Path) -> None:
    other = Served(DurableNsm.open(tmp_path / "c"), tmp_path / "c.sock")  # its own, new CA
    try:
        with NsmFrontend(source.sock, timeout=20) as f1:
            f1.get_vring_base()
            data = f1.save_device_state()
        with NsmFrontend(other.sock, timeout=20, start=False) as f2:
            with pytest.raises(VhostUserError, match="CHECK_DEVICE_STATE"):
                f2.load_device_state(data)
            f2.start_ring()
            assert boot_locked(f2)
    finally:
        other.close()


def test_load_refused_when_a_ring_starts_before_the_check(source: Served, destination: Served) -> None:
    with NsmFrontend(source.sock, timeout=20) as f1:
        f1.get_vring_base()
        data = f1.save_device_state()
    with NsmFrontend(destination.sock, timeout=20, start=False) as f2:
        own_id = destination.nsm.device.state.module_id
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            theirs = f2._device_state_fd(VHOST_TRANSFER_STATE_DIRECTION_LOAD, r)
            assert theirs is None
            os.write(w, data)
        finally:
            os.close(r)
            os.close(w)
        f2.start_ring()  # the device runs before CHECK_DEVICE_STATE
        with pytest.raises(VhostUserError, match="CHECK_DEVICE_STATE"):
            f2._check_device_state()
        assert module_id(f2) == own_id
