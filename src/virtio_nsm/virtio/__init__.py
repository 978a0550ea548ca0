"""virtio building blocks: spec constants, bounds-checked guest memory, split virtqueue.

Both sides of a virtqueue live here: the *device* role (used by the vhost-user
backend) and the *driver* role (used by the Python virtio driver that acts as a
vhost-user frontend).  Neither performs any I/O of its own.
"""

from __future__ import annotations

from .memory import GuestMemory, GuestMemoryError, MemoryRegion, VirtioError
from .queue import Chain, DeviceQueue, DriverQueue, RingLayout, Segment, VirtqueueError

__all__ = [
    "Chain",
    "DeviceQueue",
    "DriverQueue",
    "GuestMemory",
    "GuestMemoryError",
    "MemoryRegion",
    "RingLayout",
    "Segment",
    "VirtioError",
    "VirtqueueError",
]
