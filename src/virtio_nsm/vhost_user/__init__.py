"""vhost-user transport, device-agnostic: backend daemon and Python frontend.

Layers, bottom up: :mod:`.message` (wire format, syntax checks), :mod:`.connection`
(socket and SCM_RIGHTS), :mod:`.device` (the interface a device implements),
:mod:`.backend` (protocol state and dispatch), :mod:`.daemon` (the event loop),
:mod:`.frontend` (a Python virtio driver's control plane, acting as the vhost-user
frontend).  Nothing here knows any particular device: the NSM's ring rules and
its driver live in :mod:`virtio_nsm.nsm.virtio` and :mod:`virtio_nsm.nsm.frontend`.
"""

from __future__ import annotations

from .backend import BackendError, VhostUserBackend
from .daemon import VhostUserDaemon
from .device import ConfigError, DeviceStateHandler, EventLoop, QueueWorker, VhostUserDevice
from .frontend import BackendDisconnected, VhostUserError, VhostUserFrontend
from .message import MessageError

__all__ = [
    "BackendDisconnected",
    "BackendError",
    "ConfigError",
    "DeviceStateHandler",
    "EventLoop",
    "MessageError",
    "QueueWorker",
    "VhostUserBackend",
    "VhostUserDaemon",
    "VhostUserDevice",
    "VhostUserError",
    "VhostUserFrontend",
]
