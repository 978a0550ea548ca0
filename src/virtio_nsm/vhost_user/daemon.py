"""The vhost-user daemon: the event loop that serves one device.

Event loop
----------
:class:`VhostUserDaemon` listens on a Unix socket (mode 0600) and serves one
frontend at a time; further connections wait in the backlog until the current one
ends.  One ``epoll`` loop watches the listening socket, the connection, every
vring's kick eventfd, the descriptors the device registered (:class:`~.device.EventLoop`:
the daemon is the device's event loop, given to :meth:`~.device.VhostUserDevice.attach`
when the daemon binds) and a wake-up pipe used by :meth:`VhostUserDaemon.stop`
(signal- and thread-safe).  The device (a :class:`~.device.VhostUserDevice`; the
NSM's holds PCRs and locks) belongs to the daemon and outlives every connection
and reset.

The frontend's descriptors are hostile by assumption: every eventfd is used
non-blocking (see :mod:`.backend`), a kick fd is unwatched just before the backend
closes it, and a readiness event for a kick fd that a message earlier in the same
batch replaced or closed is ignored.  Kick fds are watched edge-triggered
(``EPOLLET``) and never read: an eventfd reports every write once, whatever its
counter holds, so a wake-up costs one system call (``epoll_wait``) instead of two,
and a counter the frontend leaves or drains cannot make the loop block or spin; a
kick fd that reports a hang-up or an error stops its ring.  Every wait for the
frontend (the rest of a message, room for a reply, a device state load) is sliced so
that :meth:`stop` takes effect within a fraction of a second.

Adaptive polling
----------------
Waking up on a kick costs the guest a notification (a VM exit and an eventfd
write in QEMU) and costs us a trip through the scheduler and ``epoll``, many
times the work of the request itself.  So after answering, the loop keeps
looking at the available rings for ``poll_us`` microseconds (a window renewed
by every request served) and, for that long, tells the driver that it need not
kick (``avail_event`` left behind with ``VIRTIO_RING_F_EVENT_IDX``, else
``VIRTQ_USED_F_NO_NOTIFY``).  A driver that keeps sending is then served
without any notification in either direction but the interrupt it asked for
(with EVENT_IDX: only when ``used_event`` says so).  When the window passes
with nothing new, kicks are asked for again, the rings are looked at once more
(a chain added just before that is not lost) and the loop blocks in
``select`` again: no CPU is used while the device is idle.  Every slice of
``POLL_SLICE_NS`` the socket and the other descriptors are looked at too, so
vhost-user messages are never starved.  ``poll_us=0`` disables polling (every
request then waits for its kick).

Spinning takes a CPU that the guest's vCPU thread and QEMU's main loop may need
to bring the next request, so polling is not always a gain: a spin that loses
the CPU backs off, and :class:`~.polling.PollPolicy` keeps polling only while
trials show that it shortens the period of back-to-back requests
(``adaptive_polling=False`` polls after every answer).

Optionally (``cpu_qos``, ``nsm serve --cpu-latency-qos``) the loop holds a CPU
latency request of 0 µs while requests flow and releases it ``linger`` after
the last answer (:mod:`.cpu_qos`): wake-ups of QEMU's threads and ours then find
idle CPUs polling instead of halted.

Statistics: every answer after an interrupt we sent adds a *turnaround* sample,
from that interrupt to the moment we noticed the guest's next request (the share
of a round trip spent in QEMU and the guest).  :meth:`VhostUserDaemon.request_stats`
(``nsm serve``: SIGUSR1) logs the counters and the turnaround since the last call.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import selectors
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .backend import BackendError, VhostUserBackend
from .connection import Connection, ConnectionClosed
from .cpu_qos import CpuLatencyQos, QosUnavailable
from .device import VhostUserDevice
from .histogram import LatencyHistogram
from .message import MessageError
from .polling import PollPolicy

__all__ = [
    "DEFAULT_POLL_US",
    "VhostUserDaemon",
]

log = logging.getLogger("virtio_nsm.vhost_user")

#: ``nsm serve``'s polling window after activity, in microseconds (module docstring).
#: The class itself does not poll unless asked: a daemon run in a thread of a process
#: that also runs its frontend (``nsm demo``, tests) would spin against it for the GIL.
DEFAULT_POLL_US = 200
#: Longest stretch of polling between two looks at the other descriptors.
POLL_SLICE_NS = 2_000_000
#: A look at the rings that took this long means the CPU was taken from us.
PREEMPTED_NS = 50_000
#: Turnarounds longer than this are pauses of the guest, not back-to-back traffic.
TURNAROUND_GAP_NS = 20_000_000
#: A kick fd reporting any of these is unusable for good (see ``_on_kick``).
_KICK_BROKEN = select.EPOLLHUP | select.EPOLLERR
_monotonic_ns = time.monotonic_ns  # bound once: the per-request path



class _Poller:
    """``epoll`` with one tag per descriptor: what the loop needs of :mod:`selectors`.

    :class:`selectors.EpollSelector` costs about 2 µs more per wake-up (its keys,
    its mask conversion), as much as a third of the rest of a request's pass.
    Like it, :meth:`select` resolves each ready descriptor's tag when ``epoll``
    reports it, so a descriptor replaced while a batch is handled keeps its old tag
    for that batch, and :meth:`unregister` of a descriptor that was closed meanwhile
    (which ``epoll`` forgot by itself) only forgets it here.
    """

    __slots__ = ("_epoll", "_tags")

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._tags: dict[int, object] = {}

    def register(self, fd: int, events: int, tag: object, *, edge: bool = False) -> None:
        """Watch ``fd`` for ``events`` (``selectors.EVENT_*``); KeyError if already watched.

        ``edge``: edge-triggered (``EPOLLET``): reported once per change, not while it lasts.
        """
        if fd in self._tags:
            raise KeyError(f"fd {fd} is already registered")
        mask = (select.EPOLLIN if events & selectors.EVENT_READ else 0) | (
            select.EPOLLOUT if events & selectors.EVENT_WRITE else 0) | (select.EPOLLET if edge else 0)
        self._epoll.register(fd, mask)
        self._tags[fd] = tag

    def unregister(self, fd: int) -> None:
        """Stop watching ``fd``; KeyError if it was not watched."""
        del self._tags[fd]
        with contextlib.suppress(OSError):  # closed already: epoll dropped it itself
            self._epoll.unregister(fd)

    def select(self, timeout: float | None) -> list[tuple[int, object, int]]:
        """Wait up to ``timeout`` seconds (None: forever); ``(fd, tag, epoll mask)`` per ready fd."""
        if timeout is None:
            timeout = -1
        elif timeout <= 0:
            timeout = 0  # a deadline already passed: look, do not block
        else:
            timeout = -(-timeout * 1000 // 1) / 1000  # whole ms up, as selectors does: no busy loop
        tags = self._tags
        events = self._epoll.poll(timeout, len(tags) or 1)
        if len(events) == 1:  # the usual wake-up: one kick
            fd, mask = events[0]
            tag = tags.get(fd)
            return [] if tag is None else [(fd, tag, mask)]
        return [(fd, tags[fd], mask) for fd, mask in events if fd in tags]

    def close(self) -> None:
        self._tags.clear()
        self._epoll.close()


def _ready(mask: int) -> int:
    """An epoll mask as ``selectors.EVENT_*`` (errors and hang-ups wake both, as in selectors)."""
    ready = 0
    if mask & ~select.EPOLLIN:
        ready |= selectors.EVENT_WRITE
    if mask & ~select.EPOLLOUT:
        ready |= selectors.EVENT_READ
    return ready


@dataclass(eq=False, slots=True)
class _Watch:
    """A descriptor the device asked the loop to watch (see :meth:`VhostUserDaemon.watch`)."""

    fd: int
    events: int
    callback: Callable[[int], None]


class VhostUserDaemon:
    """Serve a device as a vhost-user backend on a Unix socket.

    It is also the device's :class:`~.device.EventLoop` (:meth:`watch`,
    :meth:`unwatch`, :meth:`serve_queue`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: VhostUserDevice,
        *,
        message_timeout: float = 5.0,
        poll_us: int = 0,
        adaptive_polling: bool = True,
        cpu_qos: CpuLatencyQos | None = None,
        allow_file_memory: bool = False,
    ) -> None:
        self.path = Path(path)
        self.device = device
        self.message_timeout = message_timeout
        self.poll_us = poll_us
        #: Whether to poll, and when to stop (see :mod:`.polling`).
        self.policy = PollPolicy(poll_us, adaptive=adaptive_polling)
        #: Counters for the log and the tests: wake-ups by a kick, polling windows
        #: opened, and passes in which polling found requests without a kick.
        self.kick_wakeups = 0
        self.poll_windows = 0
        self.poll_hits = 0
        self._poll_deadline: int | None = None
        #: Engaged while requests flow, if given (see :mod:`.cpu_qos`); closed with the daemon.
        self.cpu_qos = cpu_qos
        #: From an interrupt we sent to the next request we noticed: the guest's and
        #: QEMU's share of each round trip (back-to-back traffic only).
        self.turnaround = LatencyHistogram()
        self._turnaround_from: int | None = None
        self._stats_requested = False
        self._stats_mark: tuple[int, ...] = ()
        self.backend = VhostUserBackend(device, allow_file_memory=allow_file_memory)
        self.backend.interrupted = self._is_stopping
        self.backend.kick_closing = self._forget_kick
        self.connections_served = 0
        self._listener: socket.socket | None = None
        self._conn: Connection | None = None
        self._conn_fd = -1
        self._selector = _Poller()
        self._kicks: dict[int, int] = {}
        self._watches: dict[int, _Watch] = {}
        self._attached = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False

    def __repr__(self) -> str:
        state = "connected" if self._conn else "listening" if self._listener else "idle"
        return f"<VhostUserDaemon {str(self.path)!r} {state}>"

    # -- the device's event loop (see .device.EventLoop) ----------------------------------

    def watch(self, fd: int, events: int, callback: Callable[[int], None]) -> None:
        """Call ``callback(ready)`` when ``fd`` is ready for ``events`` (replacing any earlier watch)."""
        self.unwatch(fd)
        watch = _Watch(fd, events, callback)
        self._selector.register(fd, events, watch)
        self._watches[fd] = watch

    def unwatch(self, fd: int) -> None:
        """Stop watching a device descriptor (call before closing it)."""
        if self._watches.pop(fd, None) is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(fd)

    def serve_queue(self, index: int) -> bool:
        """Serve ring ``index`` now, as on a kick (False if it is not running)."""
        return self.backend.kick(index)

    def _on_device_fd(self, watch: _Watch, ready: int) -> None:
        if self._watches.get(watch.fd) is not watch:
            return  # unwatched (or replaced) earlier in this batch of events
        try:
            watch.callback(ready)
        except Exception:
            # A bug in the device: stop watching the fd rather than fail again on every pass.
            log.exception("device callback for fd %d failed; fd no longer watched", watch.fd)
            self.unwatch(watch.fd)

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
        self._selector.register(sock.fileno(), selectors.EVENT_READ, "listen")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        log.info("listening on %s", self.path)
        self.device.attach(self)
        self._attached = True

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
        if self._attached:
            self._attached = False
            self.device.detach()
        for fd in list(self._watches):
            self.unwatch(fd)
        if self.cpu_qos is not None:
            self.cpu_qos.close()
        if self._listener is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self._listener.fileno())
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
            try:
                self.bind()
            except BaseException:  # __exit__ will not run: release the poller and wake pipe
                self.close()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def serve_forever(self) -> None:
        if self._listener is None:
            self.bind()
        while not self._stopping:
            # While a polling window is open, only peek at the other descriptors.
            qos = self.cpu_qos
            timeout: float | None = 0
            if self._poll_deadline is None:
                timeout = None if qos is None else qos.timeout(time.monotonic_ns())
            for fd, tag, mask in self._selector.select(timeout):
                if self._stopping:
                    break
                try:
                    if tag.__class__ is int:  # a kick: the hot path
                        self._on_kick(fd, tag, mask)
                    elif tag == "listen":
                        self._accept()
                    elif isinstance(tag, Connection):
                        self._on_message(tag)
                    elif tag == "wake":
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 64)
                    elif isinstance(tag, _Watch):
                        self._on_device_fd(tag, _ready(mask) & tag.events)
                except Exception:
                    # A bug of ours must not take the device (PCRs, locks) down with it.
                    log.exception("internal error while serving the frontend")
                    self._drop_connection("internal error")
                    break  # the selector's key set changed
            if self._poll_deadline is not None and not self._stopping:
                try:
                    self._poll()
                except Exception:
                    log.exception("internal error while polling the rings")
                    self._drop_connection("internal error")
            if qos is not None and qos.engaged:
                self._qos(qos.expire, time.monotonic_ns())
            if self._stats_requested:
                self._log_stats()
        if self.turnaround.count:
            log.info("turnaround since the last stats: %s", self._turnaround_text())
        log.info(
            "stopped (%d kick wake-ups, %d polling windows, %d passes serving requests "
            "found by polling, %d back-offs, polling chosen by %d of %d trials, "
            "%d interrupts)",
            self.kick_wakeups,
            self.poll_windows,
            self.poll_hits,
            self.policy.backoffs,
            self.policy.polling_won,
            self.policy.trials,
            self.backend.interrupts,
        )

    # -- events ----------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(True)
        conn = self._conn = Connection(sock, timeout=self.message_timeout, interrupted=self._is_stopping)
        self.connections_served += 1
        # One frontend at a time: later ones wait in the backlog.
        self._selector.unregister(self._listener.fileno())
        self._conn_fd = sock.fileno()  # kept: the socket may be closed before it is unwatched
        self._selector.register(self._conn_fd, selectors.EVENT_READ, conn)
        log.info("frontend connected (connection %d)", self.connections_served)

    def _is_stopping(self) -> bool:
        return self._stopping

    def _on_message(self, tag: Connection) -> None:
        conn = self._conn
        if conn is None or conn is not tag:
            return  # stale: the connection ended earlier in this batch of events
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

    def _on_kick(self, fd: int, index: int, mask: int) -> None:
        backend = self.backend
        vrings = backend.vrings
        vring = vrings[index] if index < len(vrings) else None
        if vring is None or vring.kick_fd != fd or self._kicks.get(fd) != index:
            # Stale: a message handled earlier in this batch of events replaced or
            # closed this kick fd (SET_VRING_KICK, GET_VRING_BASE, a reset).
            return
        # Kick fds are edge-triggered and never read (see _sync_kicks): each write to
        # the eventfd is one report, whatever its counter holds.  A hang-up or an error
        # (a pipe whose writer closed, an eventfd counter overflowed) stays reported
        # for good, so the ring stops listening to that fd.
        if mask & _KICK_BROKEN:
            log.error("vring %d: kick fd closed by the frontend (or in error); ring stopped", index)
            self.backend.drop_kick(index)  # stops watching it too (_forget_kick)
            return
        self.kick_wakeups += 1
        start = _monotonic_ns()
        if self._poll_deadline is not None:  # a kick sent before it saw we poll
            if backend.process(vring):
                self._answered(start, _monotonic_ns())
                self._open_window()
            return
        if not self.poll_us or not self.policy.may_poll(start):
            if backend.process(vring):
                self._answered(start)
            return
        # Tell the driver not to kick before it hears the answer, so that its next
        # request finds us polling without a notification.  Nothing to answer (a
        # spurious kick): ask for kicks again, which looks at the rings once more.
        backend.set_polling(True)
        if backend.kick(index) or backend.set_polling(False):
            self._answered(start, time.monotonic_ns())
            self._open_window()

    def _answered(self, start: int, end: int | None = None) -> None:
        """A pass that noticed requests at ``start`` answered them by ``end`` (ns; None:
        now, read only if needed)."""
        since = self._turnaround_from
        if since is not None and 0 <= start - since <= TURNAROUND_GAP_NS:
            self.turnaround.add(start - since)
        sent = self.backend.last_interrupt_ns
        self._turnaround_from = sent if sent is not None and sent >= start else None
        policy, qos = self.policy, self.cpu_qos
        if policy.window_ns or qos is not None:
            if end is None:
                end = _monotonic_ns()
            if policy.window_ns:  # without a window the policy has nothing to learn
                policy.answered(start, end)
            if qos is not None:
                self._qos(qos.engage, end)

    def _qos(self, call: Callable[[int], None], now: int) -> None:
        """Engage or expire the CPU latency request; a device that fails is given up, logged."""
        assert self.cpu_qos is not None
        try:
            call(now)
        except QosUnavailable as exc:
            log.error("%s; CPU latency QoS given up", exc)
            self.cpu_qos.close()
            self.cpu_qos = None

    # -- statistics --------------------------------------------------------------------

    def request_stats(self) -> None:
        """Ask the loop to log what happened since the last such request (signal-safe)."""
        self._stats_requested = True
        wake = self._wake_w
        if wake >= 0:
            with contextlib.suppress(OSError):
                os.write(wake, b"s")

    def _counters(self) -> tuple[int, ...]:
        qos = self.cpu_qos.engagements if self.cpu_qos is not None else 0
        return (self.kick_wakeups, self.poll_windows, self.poll_hits, self.policy.backoffs,
                self.backend.interrupts, qos)

    def _log_stats(self) -> None:
        self._stats_requested = False
        now = self._counters()
        mark = self._stats_mark or (0,) * len(now)
        kicks, windows, hits, backoffs, interrupts, qos = (a - b for a, b in zip(now, mark, strict=True))
        self._stats_mark = now
        log.info(
            "stats: %d kick wake-ups, %d polling windows, %d passes found by polling, "
            "%d back-offs, %d interrupts, %d QoS engagements; turnaround %s",
            kicks, windows, hits, backoffs, interrupts, qos, self._turnaround_text(),
        )
        self.turnaround.reset()

    def _turnaround_text(self) -> str:
        turn = self.turnaround
        if not turn.count:
            return "no samples"
        return (f"p10 {turn.percentile(0.1)} / p50 {turn.percentile(0.5)} / "
                f"p90 {turn.percentile(0.9)} us over {turn.count}")

    # -- polling ---------------------------------------------------------------------

    def _open_window(self) -> None:
        """A request was answered: poll the rings for ``poll_us`` from now."""
        if self._poll_deadline is None:
            self.poll_windows += 1
        if not self.backend.polling:
            self.backend.set_polling(True)
        self._poll_deadline = time.monotonic_ns() + self.poll_us * 1000

    def _poll(self) -> None:
        """Serve the rings without kicks until the window passes or the slice ends."""
        deadline = self._poll_deadline
        assert deadline is not None
        window = self.poll_us * 1000
        clock = time.monotonic_ns
        poll = self.backend.poll
        policy = self.policy
        answered = self._answered
        now = clock()
        slice_end = now + POLL_SLICE_NS
        while True:
            before = now
            if poll():
                self.poll_hits += 1
                now = clock()
                answered(before, now)
                if not policy.may_poll(now):  # a trial's next block waits for kicks
                    self._end_window()
                    return
                deadline = now + window
            else:
                now = clock()
                if now - before > PREEMPTED_NS:
                    # The CPU was taken from us while we spun: it is wanted, maybe by
                    # the very thread that brings the next request.  Block instead.
                    policy.preempted(now)
                    self._end_window()
                    return
                if now >= deadline:
                    policy.undisturbed()
                    self._end_window()
                    return
            if now >= slice_end:
                self._poll_deadline = deadline
                return

    def _end_window(self) -> None:
        """Ask for kicks again; a request that slipped in meanwhile may reopen the window."""
        self._poll_deadline = None
        start = time.monotonic_ns()
        if self.backend.set_polling(False):
            self.poll_hits += 1
            now = time.monotonic_ns()
            self._answered(start, now)
            if self.policy.may_poll(now):
                self._open_window()

    def _forget_kick(self, fd: int) -> None:
        """The backend is about to close kick fd ``fd``: stop watching it while it is open."""
        if self._kicks.pop(fd, None) is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(fd)

    def _sync_kicks(self) -> None:
        # Re-register everything: a replaced kick fd may have reused the old number,
        # and closing the old one silently removed it from epoll.
        for fd in self._kicks:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(fd)
        self._kicks.clear()
        for fd, index in self.backend.kick_fds().items():
            try:
                # Edge-triggered: a kick is reported once per eventfd write, so the
                # counter needs no read (one system call fewer per wake-up); it cannot
                # reach its limit (2**64 - 2) at any real rate.  A fd that is ready
                # when watched (kicks sent before, or an old counter) is reported once.
                self._selector.register(fd, selectors.EVENT_READ, index, edge=True)
            except (OSError, ValueError, KeyError) as exc:
                log.error("vring %d: cannot watch kick fd %d: %s", index, fd, exc)
                continue
            self._kicks[fd] = index

    def _drop_connection(self, reason: str, *, error: bool = True) -> None:
        self._poll_deadline = None
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
            self._selector.unregister(self._conn_fd)
        self._conn.close()
        self._conn = None
        self.backend.disconnect()
        if self._listener is not None and not self._stopping:
            self._selector.register(self._listener.fileno(), selectors.EVENT_READ, "listen")
