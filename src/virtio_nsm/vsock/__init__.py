"""virtio-vsock (device ID 19): a sans-IO stream bridge between guest vsock and host Unix sockets.

* :mod:`.constants`: spec names and numbers;
* :mod:`.packet`: the 44-byte header codec and its validation;
* :mod:`.bridge`: the connection table and state machines (:class:`VsockBridge`), fed with
  guest packets and host-side events, emitting guest packets and host-side actions;
* :mod:`.guest`: the same protocol from the guest's side (:class:`GuestTransport`), which
  our tests and the Python driver use to play a guest.
"""

from __future__ import annotations

from .bridge import BridgeLimits, CloseHost, ConnectHost, HostAction, ShutdownHost, VsockBridge
from .guest import GuestSocket, GuestTransport
from .packet import Header, PacketError

__all__ = [
    "BridgeLimits",
    "CloseHost",
    "ConnectHost",
    "GuestSocket",
    "GuestTransport",
    "Header",
    "HostAction",
    "PacketError",
    "ShutdownHost",
    "VsockBridge",
]
