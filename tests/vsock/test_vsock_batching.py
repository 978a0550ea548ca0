"""Batching on the rings: tx buffers given back in batches (interrupt decisions count only
what is published), rx published once per pass."""

from __future__ import annotations

import select
import time
from pathlib import Path

from vsock.vsock_harness import GUEST_CID, Harness

from virtio_nsm.virtio.memory import GuestMemory, MemoryRegion
from virtio_nsm.virtio.queue import DeviceQueue, DriverQueue, RingLayout, Segment
from virtio_nsm.vsock import Header
from virtio_nsm.vsock import constants as c
from virtio_nsm.vsock.device import TX_QUIET_NS, VsockDevice, _TxWorker
from virtio_nsm.vsock.timer import Timer

BASE = 0x10_0000
CID = 9
RST = Header(CID, c.VMADDR_CID_HOST, 1234, 80, 0, c.VIRTIO_VSOCK_TYPE_STREAM, c.VIRTIO_VSOCK_OP_RST).encode()


def setup(tmp_path: Path, size: int = 16) -> tuple[GuestMemory, DriverQueue, DeviceQueue, _TxWorker, list[int]]:
    mem = GuestMemory([MemoryRegion.anonymous(BASE, 0x20000)])
    layout = RingLayout.contiguous(size, BASE + 0x10000)
    drv = DriverQueue(mem, layout, event_idx=True)
    dev = DeviceQueue(mem, layout, event_idx=True)
    device = VsockDevice(CID, tmp_path / "v.sock")  # not attached: no timer, no sockets
    notified: list[int] = []
    worker = device.worker(c.TX_QUEUE, dev, lambda: notified.append(dev.next_used_idx))
    assert isinstance(worker, _TxWorker)
    return mem, drv, dev, worker, notified


def send(mem: GuestMemory, drv: DriverQueue, n: int) -> None:
    for _i in range(n):
        addr = BASE + 0x100 * (drv.in_flight % 64)
        mem.write(addr, RST)
        drv.add([Segment(addr, len(RST))])
    drv.publish()


def test_tx_buffers_come_back_once_a_quarter_of_the_ring_is_held(tmp_path: Path) -> None:
    mem, drv, dev, worker, _ = setup(tmp_path, size=16)
    send(mem, drv, 3)
    assert worker.process() is False
    assert drv.collect_used() == []
    assert dev.next_used_idx == dev.used_idx == 0  # nothing written that the driver cannot see
    send(mem, drv, 1)
    assert worker.process() is True
    assert [length for _, length in drv.collect_used()] == [0, 0, 0, 0]
    assert worker.held == []


def test_interrupt_decision_counts_only_published_buffers(tmp_path: Path) -> None:
    mem, drv, dev, worker, _ = setup(tmp_path, size=16)
    send(mem, drv, 4)
    drv.request_interrupt_after(1)
    assert worker.process() is True  # a batch published ...
    send(mem, drv, 2)
    assert worker.process() is False  # ... and two more held, in the same backend pass
    assert dev.needs_notify() is True  # the backend's decision for the batch
    assert len(drv.collect_used()) == 4
    drv.request_interrupt_after(1)  # the driver wants to hear of the next one
    worker.flush_due = True  # the quiet timer
    assert worker.process() is True
    assert dev.needs_notify() is True  # without it the driver would never reclaim them
    assert len(drv.collect_used()) == 2


def test_stopping_the_ring_gives_back_what_is_held(tmp_path: Path) -> None:
    mem, drv, _dev, worker, notified = setup(tmp_path, size=16)
    send(mem, drv, 2)
    assert worker.process() is False
    assert worker.rewind() == 2
    assert len(drv.collect_used()) == 2
    assert notified == [2]


def test_timer_expires_once_and_can_be_disarmed() -> None:
    timer = Timer()
    try:
        timer.arm(1_000_000)
        assert select.select([timer], [], [], 2)[0] == [timer]
        assert timer.expired() is True
        assert timer.armed is False
        assert timer.expired() is False
        timer.arm(20_000_000)
        timer.disarm()
        time.sleep(0.05)
        assert select.select([timer], [], [], 0)[0] == []
    finally:
        timer.close()


def test_rx_pass_is_published_and_interrupted_once(tmp_path: Path) -> None:
    """Linux takes a whole batch per interrupt; interrupting it after the first few
    packets of a long pass made its reader wake per packet (slower host -> guest)."""
    mem = GuestMemory([MemoryRegion.anonymous(BASE, 0x80000)])
    layout = RingLayout.contiguous(64, BASE + 0x70000)
    drv = DriverQueue(mem, layout, event_idx=True)
    dev = DeviceQueue(mem, layout, event_idx=True)
    device = VsockDevice(GUEST_CID, tmp_path / "v.sock")
    harness = Harness(device.bridge, listening={1000})
    harness.guest.connect(1000)
    harness.settle()
    host_id = harness.host_accepted[0].host_id
    device.bridge.host_data(host_id, bytes(device.bridge.read_budget(host_id)))
    notified: list[int] = []

    def notify() -> None:  # what the backend does: interrupt if the driver asked
        if dev.needs_notify(barrier=False):
            notified.append(dev.next_used_idx)

    worker = device.worker(c.RX_QUEUE, dev, notify)
    drv.request_interrupt_after(1)
    for i in range(40):
        drv.add([Segment(BASE + i * 0x1000, 0x1000, True)])
    drv.publish()
    assert worker.process() is True
    assert notified == [40]  # one interrupt, once the whole pass is published
    assert len(drv.collect_used()) == 40
    assert dev.needs_notify() is False  # the backend's decision after the pass: not twice


class _Loop:
    def __init__(self) -> None:
        self.watched: dict[int, object] = {}

    def watch(self, fd: int, events: int, callback: object) -> None:
        self.watched[fd] = callback

    def unwatch(self, fd: int) -> None:
        self.watched.pop(fd, None)

    def serve_queue(self, index: int) -> bool:
        return False


def test_quiet_timer_is_pushed_back_once_per_half_period_not_per_pass(tmp_path: Path) -> None:
    """While tx traffic goes on, the quiet timer neither expires (a wake-up per period)
    nor costs a system call per packet."""
    device = VsockDevice(CID, tmp_path / "v.sock")
    device.attach(_Loop())
    try:
        timer = device._timer
        assert timer is not None
        arms: list[int] = []
        arm = timer.arm

        def counting(delay_ns: int) -> None:
            arms.append(delay_ns)
            arm(delay_ns)

        timer.arm = counting  # type: ignore[method-assign]
        start = time.monotonic_ns()
        for i in range(10):  # a tx pass every 0.3 ms for 3 ms
            device.tx_held(start + i * 300_000)
        assert arms == [TX_QUIET_NS] * 3  # at 0, 1.2 and 2.4 ms
        device.tx_quiet()
        assert not timer.armed
    finally:
        device.detach()


def test_nothing_is_held_while_the_daemon_polls(tmp_path: Path) -> None:
    """The daemon keeps polling only while passes publish something: held buffers
    would look like no traffic, and the guest's kicks stay off meanwhile anyway."""
    mem, drv, dev, worker, _ = setup(tmp_path, size=16)
    dev.kicks_wanted = False
    send(mem, drv, 1)
    assert worker.process() is True
    assert len(drv.collect_used()) == 1


def test_host_gets_the_packet_before_the_quiet_timer_is_touched(tmp_path: Path) -> None:
    """A tx pass hands the guest's bytes to the host side first: arming the quiet timer
    (a system call) waits until they are on their way."""
    mem, drv, _dev, worker, _ = setup(tmp_path, size=16)
    device = worker.device
    device.attach(_Loop())
    try:
        order: list[str] = []
        pump, timer = device.host.pump, device._timer
        assert timer is not None
        arm = timer.arm

        def pumping() -> None:
            order.append("pump")
            pump()

        def arming(delay_ns: int) -> None:
            order.append("arm")
            arm(delay_ns)

        device.host.pump = pumping  # type: ignore[method-assign]
        timer.arm = arming  # type: ignore[method-assign]
        send(mem, drv, 1)
        assert worker.process() is False  # held
        assert order == ["pump", "arm"]
    finally:
        device.detach()


class _CountingLoop(_Loop):
    def __init__(self) -> None:
        super().__init__()
        self.served: list[int] = []

    def serve_queue(self, index: int) -> bool:
        self.served.append(index)
        return False


def test_an_owed_event_is_pushed_once_not_on_every_pump(tmp_path: Path) -> None:
    """QEMU keeps the event queue to itself, so the TRANSPORT_RESET stays owed for good:
    serving that queue after every host-side change cost a call per packet."""
    device = VsockDevice(CID, tmp_path / "v.sock")
    loop = _CountingLoop()
    device.attach(loop)
    try:
        assert device.bridge.event_pending
        for _ in range(5):
            device.host.pump()
        assert loop.served.count(c.EVENT_QUEUE) == 1
        device.reset()  # a transport reset owes the guest a new event: pushed once more
        device.host.pump()
        assert loop.served.count(c.EVENT_QUEUE) == 2
    finally:
        device.detach()
