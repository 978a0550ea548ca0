"""Adaptive polling of the available ring (``nsm serve --poll-us``): no timing assertions.

Backend level: what the driver is told (EVENT_IDX ``avail_event`` or the
``VIRTQ_USED_F_NO_NOTIFY`` flag) while polling and after, and that nothing is lost
across the switch.  Daemon level (real sockets, our frontend): requests served
while polling need no kick, an idle window goes back to blocking and asks for
kicks again, ``poll_us=0`` disables polling, a disturbed window backs off.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from vhost_support import serve_in_thread, wait_for

from virtio_nsm.nsm.frontend import NsmFrontend
from virtio_nsm.nsm.protocol import DescribePCR, ExtendPCR, decode_response, encode_request
from virtio_nsm.nsm.virtio import NsmQueueWorker, NsmVirtioDevice
from virtio_nsm.vhost_user import daemon as daemon_module
from virtio_nsm.vhost_user.backend import TRANSPORT_FEATURES, VhostUserBackend
from virtio_nsm.vhost_user.daemon import VhostUserDaemon
from virtio_nsm.virtio import spec
from virtio_nsm.virtio.memory import GuestMemory, MemoryRegion
from virtio_nsm.virtio.queue import DeviceQueue, DriverQueue, RingLayout

GPA = 0x10_0000
REQ = GPA + 0x4000
RESP = GPA + 0x8000
EVENT_IDX = 1 << spec.VIRTIO_RING_F_EVENT_IDX


# -- backend level: what the driver is told -------------------------------------------------


class Rig:
    """A backend with one started ring on anonymous memory (no socket, no thread)."""

    def __init__(self, event_idx: bool) -> None:
        self.mem = GuestMemory([MemoryRegion.anonymous(GPA, 0x20000)])
        layout = RingLayout.contiguous(16, GPA)
        self.drv = DriverQueue(self.mem, layout, event_idx=event_idx)
        self.count = 0
        self.backend = VhostUserBackend(NsmVirtioDevice(self.handler))
        self.backend.features = TRANSPORT_FEATURES if event_idx else TRANSPORT_FEATURES & ~EVENT_IDX
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        vring = self.backend.vrings[0]
        vring.queue = DeviceQueue(self.mem, layout, event_idx=event_idx)
        vring.worker = NsmQueueWorker(vring.queue, self.handler, lambda: None)
        vring.call_fd = self.call
        self.backend.process(vring)  # as on start: publishes "kick me"

    def handler(self, request: bytes, token: object = None, *, max_response: int | None = None) -> bytes:
        self.count += 1
        return b"\x18" + bytes([self.count])

    @property
    def queue(self) -> DeviceQueue:
        queue = self.backend.vrings[0].queue
        assert queue is not None
        return queue

    def send(self, slot: int = 0) -> bool:
        """What nsm.ko does (two chains, avail index bumped for each); True if a kick is due."""
        self.mem.write(REQ + 16 * slot, b"req")
        self.drv.add_buffer(REQ + 16 * slot, 3, False)
        self.drv.add_buffer(RESP + 0x100 * slot, 0x100, True)
        return self.drv.publish()

    def interrupts(self) -> int:
        try:
            return os.eventfd_read(self.call)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        self.backend.disconnect()
        self.drv.release()
        self.mem.close()


@pytest.fixture(params=[True, False], ids=["event_idx", "flags"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    r = Rig(request.param)
    yield r
    r.close()


def test_polling_tells_the_driver_not_to_kick_and_serves_without_kicks(rig: Rig) -> None:
    assert rig.send() is True  # not polling: the driver must kick
    assert rig.backend.kick(0) is True
    assert len(rig.drv.collect_used()) == 2 and rig.interrupts() == 1
    rig.backend.set_polling(True)
    for slot in range(5):
        rig.drv.request_interrupt_after(1)  # as Linux does after taking a buffer
        assert rig.send(slot) is False  # no kick needed
        assert rig.backend.poll() is True
        used = rig.drv.collect_used()
        assert [length for _, length in used] == [0, 2]
        assert rig.interrupts() == 1  # the answer is still signalled
    assert rig.backend.poll() is False  # nothing new: nothing done, no interrupt
    assert rig.interrupts() == 0
    assert rig.count == 6


def test_stopping_serves_what_came_without_a_kick_and_asks_for_kicks_again(rig: Rig) -> None:
    rig.backend.set_polling(True)
    assert rig.send() is False
    # The window closes before poll() saw the request: it is served all the same.
    assert rig.backend.set_polling(False) is True
    assert len(rig.drv.collect_used()) == 2
    assert rig.send(1) is True  # kicks are wanted again
    assert rig.backend.set_polling(False) is True
    assert rig.backend.set_polling(False) is False


def test_the_ring_asks_for_kicks_when_dropped_while_polling(rig: Rig) -> None:
    rig.backend.set_polling(True)
    rig.backend.vrings[0].drop_queue()  # e.g. GET_VRING_BASE or a new memory table
    assert rig.send() is True  # whoever serves the ring next may not poll


def test_used_flags_are_left_alone_with_event_idx() -> None:
    rig = Rig(True)
    try:
        rig.backend.set_polling(True)
        assert rig.queue._used16[0] == 0
        assert rig.send() is False
    finally:
        rig.close()


# -- daemon level: real socket, our frontend, the daemon in a thread ------------------------


@pytest.fixture(autouse=True)
def no_preemption_guess(monkeypatch: pytest.MonkeyPatch) -> None:
    # Here the frontend shares the GIL with the daemon's thread: waiting for it would
    # look like losing the CPU and make the daemon back off at random.
    monkeypatch.setattr(daemon_module, "PREEMPTED_NS", 10**15)


@contextmanager
def serving(tmp_path: Path, poll_us: int, adaptive: bool = False) -> Iterator[VhostUserDaemon]:
    # The daemon spins in a thread of this process: hand the GIL over often.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0002)
    try:
        with _serving(tmp_path, poll_us, adaptive) as daemon:
            yield daemon
    finally:
        sys.setswitchinterval(interval)


@contextmanager
def _serving(tmp_path: Path, poll_us: int, adaptive: bool) -> Iterator[VhostUserDaemon]:
    with serve_in_thread(tmp_path / "nsm.sock", message_timeout=5.0, poll_us=poll_us,
                         adaptive_polling=adaptive) as run:
        yield run.daemon


class Counting(NsmFrontend):
    kicks = 0

    def kick(self) -> None:
        self.kicks += 1
        super().kick()


WINDOW_NEVER_ENDS = 600_000_000  # 10 minutes: the window cannot close during a test


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "flags"])
def test_requests_while_polling_need_no_kick(tmp_path: Path, event_idx: bool) -> None:
    with serving(tmp_path, WINDOW_NEVER_ENDS) as daemon, \
            Counting(daemon.path, timeout=20, event_idx=event_idx) as f:
        first = f.exchange(encode_request(DescribePCR(16)))
        assert f.kicks == 1
        assert daemon.backend.polling  # set before the answer went out
        values = [decode_response(f.exchange(encode_request(ExtendPCR(16, bytes([i])))))
                  for i in range(20)]
        assert f.kicks == 1, "a request was kicked while the backend polled"
        wait_for(lambda: daemon.poll_hits >= 20, "the counter (bumped after the answer)")
        assert daemon.kick_wakeups == 1
        assert len({v.data for v in values}) == 20  # type: ignore[union-attr]
        # A burst while polling: also without a kick.
        burst = f.exchange_many([encode_request(DescribePCR(i)) for i in range(12)])
        assert len(burst) == 12 and f.kicks == 1
        assert len(first) > 48


def test_idle_window_goes_back_to_blocking_and_asks_for_kicks(tmp_path: Path) -> None:
    with serving(tmp_path, 1000) as daemon, Counting(daemon.path, timeout=20) as f:
        f.exchange(encode_request(DescribePCR(0)))
        assert f.kicks == 1
        # Nothing else comes: the window closes and the loop blocks in select again.
        wait_for(lambda: daemon._poll_deadline is None and not daemon.backend.polling,
                 "the polling window to close")
        queue = daemon.backend.vrings[0].queue
        assert queue is not None and queue.kicks_wanted
        f.exchange(encode_request(DescribePCR(1)))
        assert f.kicks == 2
        wait_for(lambda: daemon.poll_windows == 2, "the second window")
        assert daemon.kick_wakeups == 2


def test_poll_us_zero_disables_polling(tmp_path: Path) -> None:
    with serving(tmp_path, 0) as daemon, Counting(daemon.path, timeout=20) as f:
        for i in range(10):
            f.exchange(encode_request(DescribePCR(i)))
            assert not daemon.backend.polling
        assert f.kicks == 10 and daemon.kick_wakeups == 10
        assert daemon.poll_windows == 0 and daemon.poll_hits == 0


def test_a_disturbed_window_backs_off_and_nothing_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every empty look at the ring counts as "the CPU was taken from us".
    monkeypatch.setattr(daemon_module, "PREEMPTED_NS", -1)
    with serving(tmp_path, WINDOW_NEVER_ENDS) as daemon, Counting(daemon.path, timeout=20) as f:
        values = [decode_response(f.exchange(encode_request(ExtendPCR(20, b"x"))))
                  for _ in range(10)]
        assert len({v.data for v in values}) == 10  # type: ignore[union-attr]
        wait_for(lambda: daemon.policy.backoffs >= 1, "a back-off")
        wait_for(lambda: not daemon.backend.polling, "polling to stop")
        assert daemon.backend.vrings[0].queue.kicks_wanted  # type: ignore[union-attr]
        kicks = f.kicks
        f.exchange(encode_request(DescribePCR(0)))
        assert f.kicks == kicks + 1  # not polling any more: the driver kicks


def test_stop_interrupts_a_polling_window(tmp_path: Path) -> None:
    with serving(tmp_path, WINDOW_NEVER_ENDS) as daemon, Counting(daemon.path, timeout=20) as f:
        f.exchange(encode_request(DescribePCR(0)))
        wait_for(lambda: daemon._poll_deadline is not None, "the window to open")
    # serving() asserts that the thread stopped


def test_disconnect_while_polling_ends_the_window(tmp_path: Path) -> None:
    with serving(tmp_path, WINDOW_NEVER_ENDS) as daemon:
        with Counting(daemon.path, timeout=20) as f:
            f.exchange(encode_request(DescribePCR(0)))
            assert daemon.backend.polling
        wait_for(lambda: daemon._poll_deadline is None and not daemon.backend.polling,
                 "the window to end")
        with Counting(daemon.path, timeout=20) as f:  # a new frontend is served
            f.exchange(encode_request(DescribePCR(0)))
            assert f.kicks == 1


def test_negative_poll_us_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        VhostUserDaemon(tmp_path / "x.sock", NsmVirtioDevice(lambda r, t=None, **kw: r), poll_us=-1)


def test_the_class_does_not_poll_unless_asked(tmp_path: Path) -> None:
    # nsm serve asks (DEFAULT_POLL_US); in-process users (nsm demo) do not spin.
    daemon = VhostUserDaemon(tmp_path / "x.sock", NsmVirtioDevice(lambda r, t=None, **kw: r))
    try:
        assert daemon.poll_us == 0 and not daemon.policy.may_poll(10**18)
    finally:
        daemon.close()


def test_serve_cli_validates_poll_us() -> None:
    from click.testing import CliRunner

    from virtio_nsm.cli import main

    result = CliRunner().invoke(main, ["serve", "--poll-us", "-1"])
    assert result.exit_code == 2 and "--poll-us" in result.output
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert "--poll-us" in result.output and "--poll-always" in result.output


def test_frontend_keeps_completions_of_a_reused_head_apart(tmp_path: Path) -> None:
    # A fast (polling) device can answer round 3, which reuses descriptors freed when
    # round 2 was collected, before round 2 is consumed: each round must get its own.
    from virtio_nsm.nsm.frontend import VhostUserTransport

    with serving(tmp_path, 0) as daemon, VhostUserTransport(daemon.path, timeout=20) as f:
        r1 = f._submit([encode_request(DescribePCR(0))] * 4)
        r2 = f._submit([encode_request(DescribePCR(4))] * 4)

        def collect_until(count: int) -> None:  # completions collected so far
            deadline = time.monotonic() + 20
            while f._seq < count:
                assert time.monotonic() < deadline
                f.queue.request_interrupt_after(1)
                f._collect(block=False) or time.sleep(0.001)

        collect_until(16)  # both rounds collected: their descriptors are free
        assert len(f._complete(r1)) == 4
        r3 = f._submit([encode_request(ExtendPCR(16, b"a"))] * 4)
        reused = {h for p in r3 for h in (p.req_head, p.resp_head)} & {
            h for p in r2 for h in (p.req_head, p.resp_head)}
        assert reused  # the situation under test
        collect_until(24)  # round 3 answered before round 2 is consumed
        pcr4 = f._complete(r2)
        assert all(decode_response(r) == decode_response(pcr4[0]) for r in pcr4)
        assert decode_response(pcr4[0]).lock is True  # type: ignore[union-attr]
        extended = [decode_response(r) for r in f._complete(r3)]
        assert len({e.data for e in extended}) == 4  # type: ignore[union-attr]
