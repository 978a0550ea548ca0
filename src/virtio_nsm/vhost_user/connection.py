"""The vhost-user socket: framing and SCM_RIGHTS.  The only module that touches sockets.

A message's file descriptors travel with its first bytes, so the header is read
with ``recvmsg`` (room for :data:`~.message.MAX_FDS` descriptors and no more: a
sender that attaches more gets the message refused, and the kernel closes the
surplus) and the payload with plain ``recv`` (any descriptors smuggled there are
discarded and closed by the kernel).  A peer that stops mid-message is cut off
after ``timeout`` seconds; one that closes mid-message gets a :class:`MessageError`.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket

from .message import HEADER, MAX_FDS, Message, MessageError

__all__ = ["Connection", "ConnectionClosed"]

_FD_SIZE = array.array("i").itemsize


class ConnectionClosed(Exception):
    """The peer closed the connection cleanly, between two messages."""


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


class Connection:
    """A connected vhost-user socket (either side)."""

    def __init__(self, sock: socket.socket, *, timeout: float | None = 5.0) -> None:
        self.sock = sock
        sock.settimeout(timeout)

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
            data, ancdata, msg_flags, _addr = self.sock.recvmsg(
                HEADER.size, socket.CMSG_SPACE(MAX_FDS * _FD_SIZE)
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
            chunk = self.sock.recv(count)
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
        sent = self.sock.sendmsg([data], anc)
        if sent < len(data):
            self.sock.sendall(data[sent:])
