"""What ties a transport's request to the device that answers it and the store that records it.

A request/response device (the NSM) is called as ``handler(request, token)``: a
:class:`RequestHandler`.  ``token`` names one submission of one request in a way
that survives a restart of the backend, so that a durable device
(:class:`virtio_nsm.durable.DurableNsm`) can recognise a request that a
restarted backend serves again and answer it from its record instead of
applying it twice (:mod:`virtio_nsm.persist` keeps that record).

The transport makes tokens: the vhost-user inflight region
(:mod:`virtio_nsm.vhost_user.inflight`) gives every chain taken from the ring a
counter that a restarted backend finds again; the token is the chain's head
descriptor with that counter.  Without such tracking there is no token (None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["RequestHandler", "RequestToken"]


@dataclass(frozen=True, slots=True)
class RequestToken:
    """One submission of a request: its head descriptor and its inflight counter."""

    head: int
    counter: int

    def __post_init__(self) -> None:
        if type(self.head) is not int or type(self.counter) is not int:
            raise TypeError("a request token is two integers")
        if not 0 <= self.head < 1 << 16 or not 0 <= self.counter < 1 << 64:
            raise ValueError(f"request token ({self.head}, {self.counter}) out of range")


class RequestHandler(Protocol):
    """Answers one request (bytes in, bytes out); ``token`` as described above.

    ``max_response`` is the size of the driver's response buffer: a handler that
    cannot answer within it must not apply the request (the NSM answers
    ``BufferTooSmall`` and changes nothing); None means the protocol's maximum.
    """

    def __call__(
        self, request: bytes, token: RequestToken | None = None, /, *, max_response: int | None = None
    ) -> bytes: ...
