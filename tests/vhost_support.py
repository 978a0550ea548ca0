"""Helpers for the vhost-user tests."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virtio_nsm.serving import ServeConfig, serving
from virtio_nsm.vhost_user.cpu_qos import CpuLatencyQos
from virtio_nsm.vhost_user.daemon import VhostUserDaemon
from virtio_nsm.vhost_user.device import (
    EVENT_READ,
    ConfigError,
    EventLoop,
    QueueWorker,
    VhostUserDevice,
)
from virtio_nsm.vhost_user.inflight import InflightQueue
from virtio_nsm.virtio.queue import DeviceQueue, VirtqueueError


@dataclass
class Running:
    """A daemon serving a real device from a thread (see :func:`serve_in_thread`)."""

    path: Path
    device: Any  # the NsmDevice, or the device given to serve_in_thread
    daemon: VhostUserDaemon
    thread: threading.Thread


@contextmanager
def serve_in_thread(path: Path, device: VhostUserDevice | None = None,
                    cpu_qos: CpuLatencyQos | None = None, **config: Any) -> Iterator[Running]:
    """A real daemon built by :func:`virtio_nsm.serving.serving` from
    ``ServeConfig(path, ephemeral=True, **config)``, serving ``device`` (by default the
    NSM, in memory) from a thread; on exit it must stop within 20 s, then it is closed.
    ``cpu_qos``: a CPU latency request object to hand the daemon (it closes it)."""
    with serving(ServeConfig(path, ephemeral=True, **config), device) as served:
        daemon = served.daemon
        daemon.cpu_qos = cpu_qos
        thread = threading.Thread(target=daemon.serve_forever, daemon=True)
        thread.start()
        try:
            yield Running(path, device or served.nsm.device, daemon, thread)  # type: ignore[union-attr]
        finally:
            daemon.stop()
            thread.join(20)
            assert not thread.is_alive(), "daemon did not stop"


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Wait up to 20 s for ``condition()`` to hold (a test failure otherwise)."""
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def sealed_memfd(size: int, name: str = "guest") -> int:
    """A memfd of ``size`` bytes sealed against shrinking and growing, as QEMU's
    ``memory-backend-memfd`` makes guest RAM (the backend refuses unsealed memory)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


# -- a second device on the same stack (proves the device interface) ------------------------------


class EchoWorker:
    """Queue 0 of :class:`TwoQueueDevice`: each chain's readable part comes back in its
    writable part (upper-cased once the driver acked ``F_SHOUT``)."""

    def __init__(self, device: TwoQueueDevice, queue: DeviceQueue) -> None:
        self.device, self.queue = device, queue

    def process(self) -> bool:
        answered = False
        while (chain := self.queue.pop()) is not None:
            data = chain.read(self.queue.memory, chain.writable_len)
            if self.device.acked & TwoQueueDevice.F_SHOUT:
                data = data.upper()
            self.queue.add_used(chain.head, chain.write(self.queue.memory, data))
            answered = True
        if answered:
            self.queue.publish_used()
        return answered

    def rewind(self) -> int:
        return self.queue.last_avail_idx

    def track_inflight(self, tracker: InflightQueue, resubmit: list[int]) -> None:
        raise VirtqueueError("this test device keeps no inflight record")


class RxWorker(EchoWorker):
    """Queue 1 of :class:`TwoQueueDevice`: host bytes (its pipe) go to the guest's
    writable chains, the config's tag first."""

    def process(self) -> bool:
        answered = False
        pending = self.device.pending
        while pending and (chain := self.queue.pop()) is not None:
            data = (self.device.tag + pending.popleft())[: chain.writable_len]
            self.queue.add_used(chain.head, chain.write(self.queue.memory, data))
            answered = True
        if answered:
            self.queue.publish_used()
        return answered


class TwoQueueDevice(VhostUserDevice):
    """A test device: two queues (0 echoes, 1 delivers what the host writes into
    :attr:`host_w`), a feature bit, 8 bytes of config (``b"TEST"`` read-only, then a
    writable tag), a descriptor of its own (a pipe) and a migratable state (the tag)."""

    F_SHOUT = 1 << 0
    device_id = 0x7E
    num_queues = 2
    max_queue_size = 256
    features = F_SHOUT
    config_size = 8

    def __init__(self) -> None:
        self.tag = b"tag0"
        self.acked = 0
        self.resets = 0
        self.pending: deque[bytes] = deque()
        self.loop: EventLoop | None = None
        self.host_r, self.host_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.device_state = self

    def worker(self, index: int, queue: DeviceQueue, notify: Callable[[], None]) -> QueueWorker:
        return EchoWorker(self, queue) if index == 0 else RxWorker(self, queue)

    def features_acked(self, features: int) -> None:
        self.acked = features

    def get_config(self, offset: int, size: int) -> bytes:
        space = b"TEST" + self.tag
        if offset < 0 or size < 0 or offset + size > len(space):
            raise ConfigError(f"{offset}+{size} is outside the 8-byte config space")
        return space[offset : offset + size]

    def set_config(self, offset: int, data: bytes) -> None:
        if offset < 4 or offset + len(data) > 8:
            raise ConfigError("only the tag (bytes 4-7) is writable")
        tag = bytearray(self.tag)
        tag[offset - 4 : offset - 4 + len(data)] = data
        self.tag = bytes(tag)

    def attach(self, loop: EventLoop) -> None:
        self.loop = loop
        loop.watch(self.host_r, EVENT_READ, self._host_readable)

    def _host_readable(self, ready: int) -> None:
        assert self.loop is not None
        data = os.read(self.host_r, 4096)
        if not data:
            self.loop.unwatch(self.host_r)
            return
        self.pending.append(data)
        self.loop.serve_queue(1)

    def detach(self) -> None:
        if self.loop is not None:
            self.loop.unwatch(self.host_r)
        for fd in (self.host_r, self.host_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def reset(self) -> None:
        self.resets += 1
        self.pending.clear()

    def save_state(self) -> bytes:
        return b"tag=" + self.tag

    def load_state(self, data: bytes) -> None:
        if not data.startswith(b"tag=") or len(data) != 8:
            raise ValueError("not a state of this device")
        self.tag = data[4:]
