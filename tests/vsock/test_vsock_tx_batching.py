"""Tx buffers are given back in batches, and interrupt decisions count only what is published."""

from __future__ import annotations

import select
import time
from pathlib import Path

from virtio_nsm.virtio.memory import GuestMemory, MemoryRegion
from virtio_nsm.virtio.queue import DeviceQueue, DriverQueue, RingLayout, Segment
from virtio_nsm.vsock import Header
from virtio_nsm.vsock import constants as c
from virtio_nsm.vsock.device import VsockDevice, _TxWorker
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
