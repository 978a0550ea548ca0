"""A state change whose answer does not fit the response buffer is not applied (issue 11, D7).

Before the fix an ExtendPCR with a 22-60 byte response buffer was answered
``BufferTooSmall`` (with 21 bytes: nothing) while the extend was applied and
persisted, so a driver that retried with a larger buffer extended twice.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtio_nsm.durable import DurableNsm
from virtio_nsm.errors import ErrorCode
from virtio_nsm.nsm.device import Commit, NsmDevice
from virtio_nsm.nsm.frontend import NsmFrontend
from virtio_nsm.nsm.pcr import Digest
from virtio_nsm.nsm.protocol import (
    DescribePCR,
    ExtendPCR,
    ExtendPCRResponse,
    LockPCR,
    LockPCRs,
    encode_error,
    encode_request,
    encode_response,
)
from virtio_nsm.nsm.virtio import NsmVirtioDevice
from virtio_nsm.persist import JOURNAL_FILE, STATE_FILE, current_state
from virtio_nsm.request import RequestToken
from virtio_nsm.vhost_user.daemon import VhostUserDaemon
from virtio_nsm.vhost_user.frontend import GUEST_BASE
from virtio_nsm.virtio.queue import Segment

TOO_SMALL = encode_error(ErrorCode.BufferTooSmall)
DATA = b"\x01" * 32
EXTEND = encode_request(ExtendPCR(16, DATA))
EXTENDED = Digest.SHA384.extend(bytes(48), DATA)
ANSWER = encode_response(ExtendPCRResponse(EXTENDED))


def expected_for(room: int) -> bytes:
    return TOO_SMALL if room >= len(TOO_SMALL) else b""


@pytest.mark.parametrize("request_", [
    ExtendPCR(16, DATA), LockPCR(20), LockPCRs(32),
], ids=lambda r: type(r).__name__)
def test_no_change_is_applied_when_its_answer_does_not_fit(request_: object) -> None:
    commits: list[Commit] = []
    device = NsmDevice(commit=commits.append)
    before = device.state
    data = encode_request(request_)  # type: ignore[arg-type]
    full = NsmDevice(state=before, ca=device.ca).handle(data)  # what it answers with room
    for room in [-1, *range(len(full))]:
        assert device.handle(data, max_response=room) == expected_for(room), room
        assert device.state is before and commits == []
    assert device.handle(data, max_response=len(full)) == full
    assert len(commits) == 1 and device.state is commits[0].state is not before


def test_extend_applies_exactly_once_after_a_retry() -> None:
    device = NsmDevice()
    assert device.handle(EXTEND, max_response=40) == TOO_SMALL
    assert device.handle(EXTEND, max_response=0x3000) == ANSWER  # the retry
    assert device.state.pcrs.values[16] == EXTENDED
    assert device.handle(EXTEND) == encode_response(ExtendPCRResponse(
        Digest.SHA384.extend(EXTENDED, DATA)))


def test_reads_and_errors_are_cut_the_same_way() -> None:
    device = NsmDevice()
    describe = encode_request(DescribePCR(0))
    assert device.handle(describe, max_response=30) == TOO_SMALL
    assert device.handle(describe, max_response=5) == b""
    assert len(device.handle(describe, max_response=0x3000)) == 1 + 12 + 1 + 5 + 1 + 5 + 2 + 48
    invalid = encode_error(ErrorCode.InvalidOperation)
    assert device.handle(b"\xff", max_response=len(invalid)) == invalid
    assert device.handle(b"\xff", max_response=len(invalid) - 1) == TOO_SMALL
    assert device.handle(b"\xff", max_response=len(TOO_SMALL) - 1) == b""
    # More room than the spec's buffer changes nothing.
    assert device.handle(encode_request(DescribePCR(0)), max_response=1 << 40).startswith(b"\xa1")


def test_durable_device_persists_nothing_for_a_too_small_buffer(tmp_path: Path) -> None:
    nsm = DurableNsm.open(tmp_path / "state", durable=False)
    try:
        directory = tmp_path / "state"
        files = (directory / STATE_FILE, directory / JOURNAL_FILE)
        before = [f.read_bytes() for f in files]
        assert nsm.handle(EXTEND, RequestToken(0, 1), max_response=len(ANSWER) - 1) == TOO_SMALL
        assert [f.read_bytes() for f in files] == before  # nothing written at all
        assert nsm.device.state.pcrs.values[16] == bytes(48)
        assert nsm.handle(EXTEND, RequestToken(0, 2), max_response=0x3000) == ANSWER
        assert current_state(directory).state.pcrs.values[16] == EXTENDED  # on disk
    finally:
        nsm.close()
    reopened = DurableNsm.open(tmp_path / "state", durable=False)
    try:
        assert reopened.device.state.pcrs.values[16] == EXTENDED
    finally:
        reopened.close()


# -- through a real vhost-user daemon and our frontend ---------------------------------

BUF = GUEST_BASE + 0x4000  # inside the frontend's buffer area


@pytest.fixture
def durable_daemon(tmp_path: Path) -> Iterator[tuple[Path, DurableNsm]]:
    nsm = DurableNsm.open(tmp_path / "state", durable=False)
    daemon = VhostUserDaemon(tmp_path / "nsm.sock", NsmVirtioDevice(nsm.handle), message_timeout=5.0)
    daemon.bind()
    thread = threading.Thread(target=daemon.serve_forever, daemon=True)
    thread.start()
    try:
        yield tmp_path / "nsm.sock", nsm
    finally:
        daemon.stop()
        thread.join(20)
        daemon.close()
        nsm.close()


def exchange(fe: NsmFrontend, request: bytes, room: int) -> bytes:
    fe.memory.write(BUF, request)
    req = fe.queue.add([Segment(BUF, len(request))])
    resp = fe.queue.add([Segment(BUF + 0x2000, room, True)])
    fe.queue.request_interrupt_after(2)
    fe.queue.publish()
    fe.kick()
    used = fe.wait_used(2)
    assert used[0] == (req, 0) and used[1][0] == resp
    return fe.memory.read(BUF + 0x2000, used[1][1])


def test_vhost_user_too_small_buffer_changes_nothing(
    durable_daemon: tuple[Path, DurableNsm], tmp_path: Path
) -> None:
    sock, nsm = durable_daemon
    directory = tmp_path / "state"
    files = (directory / STATE_FILE, directory / JOURNAL_FILE)
    before = [f.read_bytes() for f in files]
    with NsmFrontend(sock, timeout=10) as fe:
        for room in (21, 22, 40, len(ANSWER) - 1):
            assert exchange(fe, EXTEND, room) == expected_for(room)
            assert nsm.device.state.pcrs.values[16] == bytes(48)
            assert [f.read_bytes() for f in files] == before
        assert exchange(fe, EXTEND, 0x3000) == ANSWER
    assert nsm.device.state.pcrs.values[16] == EXTENDED
    assert current_state(directory).state.pcrs.values[16] == EXTENDED
