"""The vhost-user socket: framing and SCM_RIGHTS.  The only module that touches sockets.

A message's file descriptors travel with its first bytes, so the header is read
with ``recvmsg`` (room for :data:`~.message.MAX_FDS` descriptors and no more: a
sender that attaches more gets the message refused, and the kernel closes the
surplus) and the payload with plain ``recv`` (any descriptors smuggled there are
discarded and closed by the kernel).  A peer that stops mid-message is cut off
after ``timeout`` seconds; one that closes mid-message gets a :class:`MessageError`.

A backend must stay responsive to its own shutdown while a peer stalls: given an
``interrupted`` callable, every wait is cut into slices of :data:`SLICE` seconds
and, between two slices, a true ``interrupted()`` ends the wait with
:class:`Interrupted` (so SIGTERM ends ``nsm serve`` within a second even when a
frontend stops in the middle of a message or stops reading our replies).
"""

from __future__ import annotations

import array
import contextlib
import functools
import os
import socket
import time
from collections.abc import Callable
from typing import TypeVar

from .message import HEADER, MAX_FDS, Message, MessageError

__all__ = ["SLICE", "Connection", "ConnectionClosed", "Interrupted"]

_T = TypeVar("_T")

#: Longest uninterruptible wait for a peer when an ``interrupted`` callable is given.
SLICE = 0.1

_FD_SIZE = array.array("i").itemsize


class ConnectionClosed(Exception):
    """The peer closed the connection cleanly, between two messages."""


class Interrupted(ConnectionClosed):
    """Our side gave up waiting for the peer because ``interrupted()`` became true."""


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


class Connection:
    """A connected vhost-user socket (either side)."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        timeout: float | None = 5.0,
        interrupted: Callable[[], bool] | None = None,
    ) -> None:
        self.sock = sock
        self.timeout = timeout
        self.interrupted = interrupted
        if interrupted is None:
            sock.settimeout(timeout)
        else:
            sock.settimeout(SLICE if timeout is None else min(SLICE, timeout))

    def _wait(self, call: Callable[[], _T]) -> _T:
        """Run one socket call, retrying its timeouts in slices until ``timeout`` has passed."""
        if self.interrupted is None:
            return call()
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            try:
                return call()
            except TimeoutError:
                if self.interrupted():
                    raise Interrupted("stopped while waiting for the peer") from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    def __repr__(self) -> str:
        return f"<Connection fd={self.sock.fileno()}>"

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def recv_message(self) -> Message:
        """Read one whole message; raises :class:`ConnectionClosed` at a clean end."""
        fds: list[int] = []
        try:
            data, ancdata, msg_flags, _addr = self._wait(
                lambda: self.sock.recvmsg(HEADER.size, socket.CMSG_SPACE(MAX_FDS * _FD_SIZE))
            )
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(cdata) - len(cdata) % _FD_SIZE
                    fds.extend(array.array("i", cdata[:usable]))
            if msg_flags & socket.MSG_CTRUNC:
                raise MessageError(f"message carries more than {MAX_FDS} file descriptors")
            if not data:
                if fds:
                    raise MessageError("file descriptors received without a message")
                raise ConnectionClosed("peer closed the connection")
            header = data + self._recv_exact(HEADER.size - len(data), "header")
            request, flags, size = HEADER.unpack(header)
            Message.check_header(request, flags, size)
            payload = self._recv_exact(size, f"payload of request {request}")
            return Message(request, flags, payload, fds)
        except TimeoutError as exc:
            close_fds(fds)
            raise MessageError("timed out in the middle of a message") from exc
        except BaseException:
            close_fds(fds)
            raise

    def _recv_exact(self, count: int, what: str) -> bytes:
        chunks: list[bytes] = []
        while count:
            chunk = self._wait(functools.partial(self.sock.recv, count))
            if not chunk:
                raise MessageError(f"connection closed in the middle of the {what}")
            chunks.append(chunk)
            count -= len(chunk)
        return b"".join(chunks)

    def send_message(self, message: Message) -> None:
        """Send a message; its ``fds`` are passed (not closed: the caller owns them)."""
        data = message.encode()
        if len(message.fds) > MAX_FDS:
            raise ValueError(f"at most {MAX_FDS} file descriptors per message")
        anc = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", message.fds).tobytes())]
            if message.fds
            else []
        )
        sent = self._wait(lambda: self.sock.sendmsg([data], anc))
        view = memoryview(data)[sent:]
        while view:
            view = view[self._wait(functools.partial(self.sock.send, view)) :]
