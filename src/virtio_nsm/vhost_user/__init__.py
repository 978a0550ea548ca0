"""vhost-user transport for the NSM device: backend daemon and Python frontend.

Layers, bottom up: :mod:`.message` (wire format, syntax checks), :mod:`.connection`
(socket and SCM_RIGHTS), :mod:`.backend` (protocol state and dispatch),
:mod:`.daemon` (NSM queue semantics and the event loop), :mod:`.frontend`
(a Python virtio driver acting as the vhost-user frontend).
"""

from __future__ import annotations

from .backend import BackendError, VhostUserBackend
from .daemon import NsmQueueWorker, VhostUserDaemon
from .frontend import VhostUserError, VhostUserFrontend, VhostUserTransport
from .message import MessageError

__all__ = [
    "BackendError",
    "MessageError",
    "NsmQueueWorker",
    "VhostUserBackend",
    "VhostUserDaemon",
    "VhostUserError",
    "VhostUserFrontend",
    "VhostUserTransport",
]
