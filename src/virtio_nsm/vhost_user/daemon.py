"""The NSM vhost-user daemon: NSM queue semantics and the event loop.

NSM queue semantics (facts §3)
------------------------------
The Linux driver queues, per request, two chains: one device-readable descriptor
holding the request and one device-writable descriptor of 0x3000 bytes for the
response; it kicks once and expects, in this order, the request chain on the used
ring with length 0, the response chain with the exact CBOR length, then one
interrupt.  :class:`NsmQueueWorker` does exactly that for every pair available, and
also accepts a single chain holding a readable then a writable part (answered with
one used entry).  A request chain whose response chain has not been made
available yet is held until it is (and given back if the ring is stopped first).
A writable chain with no request before it, or a readable chain where a response
chain is due, breaks the rules: the ring is stopped with ``DEVICE_NEEDS_RESET``.

Crash recovery: when the ring has inflight tracking (see :mod:`.inflight`), every
chain taken is marked in the shared region and cleared once its used entry is
published; chains a previous backend left unanswered are served first, and each
request goes to the handler with a token, ``(head, counter)`` of its request
chain, that is the same when a restarted backend serves it again.  With tracking,
each answer is published as soon as it is written, so at most one request at a
time has been applied without its answer being visible.  A handler that
records its last state change with that token (:class:`virtio_nsm.durable.DurableNsm`)
answers the repeated request from the record instead of applying it twice.  The
handler returns only once a state change is durable, and only then is the answer
put on the used ring.

Requests longer than ``MAX_REQUEST_SIZE`` are passed on truncated to one byte more
than the limit, so the device answers ``InputTooLarge`` without us copying
arbitrary amounts of guest memory.  A response chain too small for the answer
gets ``{"Error": "BufferTooSmall"}`` if that fits, otherwise nothing (length 0).

Event loop
----------
:class:`VhostUserDaemon` listens on a Unix socket (mode 0600) and serves one
frontend at a time; further connections wait in the backlog until the current one
ends.  One ``selectors`` loop watches the listening socket, the connection, every
vring's kick eventfd and a wake-up pipe used by :meth:`VhostUserDaemon.stop`
(signal- and thread-safe).  The NSM handler object, which holds PCRs and locks,
belongs to the daemon and outlives every connection and reset.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import stat
from collections import deque
from collections.abc import Callable
from pathlib import Path

from ..errors import ErrorCode
from ..nsm.protocol import MAX_REQUEST_SIZE, MAX_RESPONSE_SIZE, encode_error
from ..virtio.queue import Chain, DeviceQueue, VirtqueueError
from .backend import BackendError, DeviceStateHandler, QueueWorker, VhostUserBackend
from .connection import Connection, ConnectionClosed
from .inflight import InflightQueue
from .message import MessageError

__all__ = [
    "BUFFER_TOO_SMALL",
    "INTERNAL_ERROR",
    "Handler",
    "NsmQueueWorker",
    "VhostUserDaemon",
]

log = logging.getLogger("virtio_nsm.vhost_user")

#: ``handler(request) -> response``; on a ring with inflight tracking it is called
#: as ``handler(request, token)`` (``NsmDevice.handle`` takes both forms).
Handler = Callable[..., bytes]

INTERNAL_ERROR = encode_error(ErrorCode.InternalError)
BUFFER_TOO_SMALL = encode_error(ErrorCode.BufferTooSmall)


class NsmQueueWorker:
    """Serves NSM requests from one started virtqueue (see the module docstring)."""

    #: Pairs answered between two looks at whether the driver wants an interrupt,
    #: so that a pipelining driver hears about finished work while more is served.
    NOTIFY_EVERY = 16

    def __init__(
        self, queue: DeviceQueue, handler: Handler, notify: Callable[[], None] | None = None
    ) -> None:
        self.queue = queue
        self.handler = handler
        self.notify = notify
        self.pending: Chain | None = None
        self.tracker: InflightQueue | None = None
        self.resubmit: deque[int] = deque()

    def track_inflight(self, tracker: InflightQueue, resubmit: list[int]) -> None:
        self.tracker = tracker
        self.resubmit = deque(resubmit)

    def __repr__(self) -> str:
        return f"<NsmQueueWorker {self.queue!r} pending={self.pending and self.pending.head}>"

    def process(self) -> bool:
        queue = self.queue
        answered = 0
        try:
            while self.resubmit:
                # Left unanswered by a previous backend: serve them first, in the order taken.
                if self._take(queue.resubmit(self.resubmit[0]), fresh=False):
                    answered += 1
                    self._publish()
                self.resubmit.popleft()
            while (chain := queue.pop()) is not None:
                if self._take(chain):
                    answered += 1
                    if self.notify is not None and answered % self.NOTIFY_EVERY == 0:
                        self._publish()
                        self.notify()
                    elif self.tracker is not None:
                        # At most one applied-but-unpublished request at any time: the
                        # durable record holds only the last change (see DurableNsm).
                        self._publish()
        finally:
            # Publish what was answered even if a later chain broke the rules.
            if answered:
                self._publish()
        return answered > 0

    def _publish(self) -> None:
        self.queue.publish_used()
        if self.tracker is not None:
            self.tracker.published(self.queue.next_used_idx)

    def _used(self, head: int, length: int) -> None:
        self.queue.add_used(head, length)
        if self.tracker is not None:
            self.tracker.returned(head)

    def _take(self, chain: Chain, fresh: bool = True) -> int:
        memory = self.queue.memory
        if fresh and self.tracker is not None:
            self.tracker.taken(chain.head)
        request = self.pending
        if request is None:
            if chain.readable and chain.writable:
                response = self._serve(chain, chain.writable_len)
                self._used(chain.head, chain.write(memory, response))
                return 1
            if chain.readable:
                self.pending = chain
                return 0
            raise VirtqueueError(f"chain {chain.head} is a response buffer with no request before it")
        if chain.readable or not chain.writable:
            raise VirtqueueError(
                f"request chain {request.head} is followed by chain {chain.head}, "
                "which is not a device-writable response buffer"
            )
        self.pending = None
        written = chain.write(memory, self._serve(request, chain.writable_len))
        self._used(request.head, 0)
        self._used(chain.head, written)
        return 1

    def rewind(self) -> int:
        if self.pending is not None:
            if self.tracker is None:
                self.queue.unpop(self.pending)
            # else it stays marked inflight and is resubmitted when the ring restarts
            self.pending = None
        return self.queue.last_avail_idx

    def _serve(self, request_chain: Chain, capacity: int) -> bytes:
        request = request_chain.read(self.queue.memory, MAX_REQUEST_SIZE + 1)
        try:
            if self.tracker is None:
                response = self.handler(request)
            else:
                response = self.handler(request, self.tracker.token(request_chain.head))
        except Exception:
            log.exception("NSM handler failed on a %d-byte request", len(request))
            response = INTERNAL_ERROR
        if len(response) > MAX_RESPONSE_SIZE:
            log.error("NSM handler returned %d bytes (> 0x3000)", len(response))
            response = INTERNAL_ERROR
        if len(response) > capacity:
            log.warning(
                "response of %d bytes does not fit the %d-byte buffer of chain %d",
                len(response),
                capacity,
                request_chain.head,
            )
            response = BUFFER_TOO_SMALL if len(BUFFER_TOO_SMALL) <= capacity else b""
        return response


class VhostUserDaemon:
    """Serve an NSM handler as a vhost-user device on a Unix socket."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        handler: Handler,
        *,
        message_timeout: float = 5.0,
        device_state: DeviceStateHandler | None = None,
    ) -> None:
        self.path = Path(path)
        self.handler = handler
        self.message_timeout = message_timeout
        self.backend = VhostUserBackend(self._make_worker, device_state=device_state)
        self.connections_served = 0
        self._listener: socket.socket | None = None
        self._conn: Connection | None = None
        self._selector = selectors.DefaultSelector()
        self._kicks: dict[int, int] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False

    def __repr__(self) -> str:
        state = "connected" if self._conn else "listening" if self._listener else "idle"
        return f"<VhostUserDaemon {str(self.path)!r} {state}>"

    def _make_worker(self, queue: DeviceQueue, notify: Callable[[], None]) -> QueueWorker:
        return NsmQueueWorker(queue, self.handler, notify)

    # -- lifecycle -----------------------------------------------------------------

    def bind(self) -> None:
        """Create the listening socket, mode 0600 (a stale socket file is replaced)."""
        if self.path.exists() or self.path.is_symlink():
            st = self.path.lstat()
            if not stat.S_ISSOCK(st.st_mode):
                raise FileExistsError(f"{self.path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
            except OSError:
                self.path.unlink()
            else:
                raise FileExistsError(f"{self.path} is in use by another process")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        sock.listen(4)
        sock.setblocking(False)
        self._listener = sock
        self._selector.register(sock, selectors.EVENT_READ, "listen")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        log.info("listening on %s", self.path)

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to return (safe from signal handlers and threads)."""
        self._stopping = True
        wake = self._wake_w
        if wake >= 0:  # after close() the number may belong to someone else
            with contextlib.suppress(OSError):
                os.write(wake, b"x")

    def close(self) -> None:
        """Drop the connection, remove the socket file, release everything."""
        self._drop_connection("daemon closing", error=False)
        if self._listener is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._selector.close()
        fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def __enter__(self) -> VhostUserDaemon:
        if self._listener is None:
            self.bind()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def serve_forever(self) -> None:
        if self._listener is None:
            self.bind()
        while not self._stopping:
            for key, _events in self._selector.select():
                if self._stopping:
                    break
                tag = key.data
                try:
                    if tag == "listen":
                        self._accept()
                    elif tag == "conn":
                        self._on_message()
                    elif tag == "wake":
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 64)
                    elif isinstance(tag, int):
                        self._on_kick(key.fd, tag)
                except Exception:
                    # A bug of ours must not take the device (PCRs, locks) down with it.
                    log.exception("internal error while serving the frontend")
                    self._drop_connection("internal error")
                    break  # the selector's key set changed
        log.info("stopped")

    # -- events ----------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(True)
        self._conn = Connection(sock, timeout=self.message_timeout)
        self.connections_served += 1
        # One frontend at a time: later ones wait in the backlog.
        self._selector.unregister(self._listener)
        self._selector.register(sock, selectors.EVENT_READ, "conn")
        log.info("frontend connected (connection %d)", self.connections_served)

    def _on_message(self) -> None:
        conn = self._conn
        assert conn is not None
        try:
            message = conn.recv_message()
            reply = self.backend.handle(message)
            if reply is not None:
                conn.send_message(reply)
        except ConnectionClosed:
            self._drop_connection("frontend disconnected", error=False)
            return
        except MessageError as exc:
            self._drop_connection(f"malformed message: {exc}")
            return
        except BackendError as exc:
            self._drop_connection(f"request refused: {exc}")
            return
        except OSError as exc:
            self._drop_connection(f"socket error: {exc}")
            return
        self._sync_kicks()

    def _on_kick(self, fd: int, index: int) -> None:
        try:
            data = os.read(fd, 8)
        except BlockingIOError:
            data = b"\0"
        except OSError as exc:
            data = b""
            log.error("vring %d: kick fd unreadable: %s", index, exc)
        if not data:
            # EOF or error: it would stay readable forever, so stop watching it.
            log.error("vring %d: kick fd closed by the frontend; ring stopped", index)
            self._selector.unregister(fd)
            del self._kicks[fd]
            self.backend.drop_kick(index)
            return
        self.backend.kick(index)

    def _sync_kicks(self) -> None:
        # Re-register everything: a replaced kick fd may have reused the old number,
        # and closing the old one silently removed it from epoll.
        for fd in self._kicks:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(fd)
        self._kicks.clear()
        for fd, index in self.backend.kick_fds().items():
            try:
                self._selector.register(fd, selectors.EVENT_READ, index)
            except (OSError, ValueError, KeyError) as exc:
                log.error("vring %d: cannot watch kick fd %d: %s", index, fd, exc)
                continue
            self._kicks[fd] = index

    def _drop_connection(self, reason: str, *, error: bool = True) -> None:
        if self._conn is None:
            return
        if error:
            log.error("dropping the frontend: %s", reason)
        else:
            log.info("connection closed: %s", reason)
        for fd in list(self._kicks):
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(fd)
        self._kicks.clear()
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(self._conn.sock)
        self._conn.close()
        self._conn = None
        self.backend.disconnect()
        if self._listener is not None and not self._stopping:
            self._selector.register(self._listener, selectors.EVENT_READ, "listen")
