"""The host side of the vsock bridge: Unix sockets driven by the daemon's event loop.

:class:`UnixHost` listens on the hybrid socket ``PATH`` (mode 0600), connects to
``PATH_<port>`` for guest-initiated connections, and moves bytes between those
sockets and a :class:`~.bridge.VsockBridge`.  Every socket is non-blocking and is
watched only for what the bridge allows: reading while the connection has room
(:meth:`~.bridge.VsockBridge.read_budget`), writing while it holds bytes for the
host.  A host program that does not read therefore stops the guest (credit), and a
guest that does not read stops the host program (its socket buffer fills).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

from ..vhost_user.device import EVENT_READ, EVENT_WRITE, EventLoop
from .bridge import CloseHost, ConnectHost, HostAction, ShutdownHost, VsockBridge

__all__ = ["READ_CHUNK", "UnixHost", "listen_unix"]

log = logging.getLogger(__name__)

#: Most bytes taken from a host socket per read.
READ_CHUNK = 256 * 1024
#: Accepts per readiness report of the listening socket (others wait in the backlog).
_ACCEPT_BATCH = 64


def listen_unix(path: Path, backlog: int = 128) -> socket.socket:
    """A non-blocking listening Unix socket at ``path``, mode 0600.

    A stale socket file (nobody listening) is replaced; a live one, or a file that
    is not a socket, is refused with :class:`FileExistsError`.
    """
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
        else:
            raise FileExistsError(f"{path} is in use by another process")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(backlog)
    return sock


class UnixHost:
    """Unix sockets for one bridge (see the module doc).

    ``guest_work`` is called after every change that may have given the guest
    something to receive (the device then serves its rx and event queues).
    """

    def __init__(self, bridge: VsockBridge, path: Path, guest_work: Callable[[], None]) -> None:
        self.bridge = bridge
        self.path = Path(path)
        self.guest_work = guest_work
        self._loop: EventLoop | None = None
        self._listener: socket.socket | None = None
        self._socks: dict[int, socket.socket] = {}  # host_id -> socket
        self._events: dict[int, int] = {}  # host_id -> events watched
        self._pumping = False
        self._listener_paused = False
        self._paused_at = 0.0
        self._accept_failing = False
        #: Every host socket is read into this one buffer (the bridge keeps a copy of
        #: what was read): ``recv(n)`` would allocate ``n`` bytes per read, which for
        #: ``READ_CHUNK`` is an ``mmap``, page faults, an ``mremap`` and a ``munmap``
        #: for every message, however short (measured: 13 µs of a 1-byte read's 16).
        self._rbuf = memoryview(bytearray(READ_CHUNK))

    def __repr__(self) -> str:
        return f"<UnixHost {str(self.path)!r} sockets={len(self._socks)}>"

    @property
    def open_sockets(self) -> int:
        return len(self._socks)

    def open(self, loop: EventLoop) -> None:
        """Listen on ``path`` and register with ``loop``."""
        self._listener = listen_unix(self.path)
        self._loop = loop
        loop.watch(self._listener.fileno(), EVENT_READ, self._on_listener)
        log.info("vsock: host side listening on %s (guest connections go to %s_<port>)", self.path, self.path)

    def close(self) -> None:
        """Close every socket and remove the listening socket's file."""
        for host_id in list(self._socks):
            self._close(host_id)
        if self._listener is not None:
            if self._loop is not None:
                self._loop.unwatch(self._listener.fileno())
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._loop = None

    # ------------------------------------------------------------------ events
    def _on_listener(self, ready: int) -> None:
        assert self._listener is not None
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                # EMFILE and friends: the listener stays readable, so watching it would
                # spin; wait for a host socket to close (or the next pump) instead.
                (log.debug if self._accept_failing else log.warning)(
                    "vsock: accept on %s failed: %s (waiting for a socket to close)", self.path, exc)
                self._accept_failing = True
                self._pause_listener()
                break
            self._accept_failing = False
            sock.setblocking(False)
            host_id = self.bridge.host_accepted()
            self._socks[host_id] = sock
        self.pump()

    def _pause_listener(self) -> None:
        if self._listener is not None and self._loop is not None and not self._listener_paused:
            self._loop.unwatch(self._listener.fileno())
            self._listener_paused = True
            self._paused_at = time.monotonic()

    def _resume_listener(self) -> None:
        if self._listener is not None and self._loop is not None and self._listener_paused:
            self._listener_paused = False
            self._loop.watch(self._listener.fileno(), EVENT_READ, self._on_listener)

    def _on_ready(self, host_id: int, ready: int) -> None:
        sock = self._socks.get(host_id)
        if sock is None:
            return
        if ready & EVENT_READ:
            budget = self.bridge.read_budget(host_id)
            if budget > 0:
                buf = self._rbuf
                try:
                    n = sock.recv_into(buf, min(budget, READ_CHUNK))
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError as exc:
                    log.debug("vsock: host stream %d: read failed: %s", host_id, exc)
                    self.bridge.host_error(host_id)
                else:
                    if n:
                        self.bridge.host_data(host_id, bytes(buf[:n]))
                        # To the guest first (the rx pass ends with the interrupt and
                        # then a pump of its own); this socket's bookkeeping after.
                        self.guest_work()
                    else:
                        self.bridge.host_eof(host_id)
        if ready & EVENT_WRITE and host_id in self._socks:
            self._write(host_id)
        self.pump()

    def _write(self, host_id: int) -> None:
        """Write what the bridge holds for ``host_id`` until the socket is full."""
        sock = self._socks[host_id]
        bridge = self.bridge
        while True:
            out = bridge.host_output(host_id)
            if not out:
                return
            try:
                sent = sock.send(out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("vsock: host stream %d: write failed: %s", host_id, exc)
                bridge.host_error(host_id)
                return
            bridge.host_sent(host_id, sent)

    # ------------------------------------------------------------------ the bridge's decisions
    def pump(self) -> None:
        """Carry out the bridge's actions, fix what each socket is watched for, wake the guest side."""
        if self._pumping:
            return
        bridge = self.bridge
        if bridge.host_work_pending:  # (often not: then no loop, no sets built)
            self._pumping = True
            try:
                while bridge.host_work_pending:
                    for action in bridge.take_actions():
                        self._apply(action)
                    dirty = bridge.take_dirty()
                    for host_id in dirty:
                        if host_id in self._socks and bridge.host_output(host_id):
                            self._write(host_id)  # eagerly: usually the socket has room
                    for host_id in dirty:
                        self._watch(host_id)
            finally:
                self._pumping = False
        if self._listener_paused and time.monotonic() - self._paused_at >= 1.0:
            self._resume_listener()  # descriptors may have been freed elsewhere: try again
        self.guest_work()

    def _apply(self, action: HostAction) -> None:
        if isinstance(action, ConnectHost):
            self._connect(action.host_id, action.port)
        elif isinstance(action, ShutdownHost):
            sock = self._socks.get(action.host_id)
            if sock is not None:
                how = (
                    socket.SHUT_RDWR
                    if action.read and action.write
                    else (socket.SHUT_RD if action.read else socket.SHUT_WR)
                )
                with contextlib.suppress(OSError):
                    sock.shutdown(how)
        elif isinstance(action, CloseHost):
            self._close(action.host_id)

    def _connect(self, host_id: int, port: int) -> None:
        target = f"{self.path}_{port}"
        try:
            # socket() too can fail (EMFILE: the guest opened as many connections as
            # we have descriptors): that refuses this connection, not the device.
            sock = socket.socket(socket.AF_UNIX,
                                 socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        except OSError as exc:
            log.info("vsock: guest connection to %s refused: %s", target, exc)
            self.bridge.host_connect_failed(host_id)
            return
        try:
            sock.connect(target)
        except OSError as exc:
            sock.close()
            if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                log.info("vsock: guest connection to %s failed: %s", target, exc)
            self.bridge.host_connect_failed(host_id)
            return
        self._socks[host_id] = sock
        self.bridge.host_connected(host_id)

    def _close(self, host_id: int) -> None:
        sock = self._socks.pop(host_id, None)
        self._events.pop(host_id, None)
        if sock is None:
            return
        if self._loop is not None:
            self._loop.unwatch(sock.fileno())
        sock.close()
        self._resume_listener()  # a descriptor is free again

    def _watch(self, host_id: int) -> None:
        sock = self._socks.get(host_id)
        if sock is None or self._loop is None:
            return
        events = 0
        if self.bridge.read_budget(host_id) > 0:
            events |= EVENT_READ
        if self.bridge.host_output(host_id):
            events |= EVENT_WRITE
        if events == self._events.get(host_id, 0):
            return
        if events:
            self._loop.watch(sock.fileno(), events, lambda ready: self._on_ready(host_id, ready))
            self._events[host_id] = events
        else:
            self._loop.unwatch(sock.fileno())
            del self._events[host_id]
