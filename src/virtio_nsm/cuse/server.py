"""The ``/dev/cuse`` loop: one channel, one device node, one request at a time.

All protocol decisions are in :class:`~virtio_nsm.cuse.session.CuseSession`;
this module only reads messages from the channel, writes the replies back, and
looks after the device node (mode and group; a node of its own when ``/dev``
has no devtmpfs). Closing the channel makes the kernel remove the device.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from .protocol import check_device_name
from .session import CuseSession, Handler

log = logging.getLogger("virtio_nsm.cuse")

CUSE_CHANNEL = "/dev/cuse"
SYSFS_CLASS = "/sys/class/cuse"
#: One read holds one whole message; ours are at most ~4.2 KiB (an ioctl with the
#: struct and a 0x1000-byte request, or a 4 KiB write); the kernel wants >= 8 KiB.
READ_BUFFER = 64 * 1024


class CuseUnavailable(Exception):
    """The device cannot be created; the message is one line for the user."""


class _Stop(Exception):
    pass


def open_channel(path: str = CUSE_CHANNEL) -> int:
    """Open the CUSE channel; :class:`CuseUnavailable` with the reason if that fails."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CuseUnavailable(
            f"{path} does not exist: this kernel has no CUSE loaded (load it with "
            "`modprobe cuse`; in a container, pass the host's /dev/cuse in)") from None
    except PermissionError:
        raise CuseUnavailable(
            f"cannot open {path}: permission denied (nsm cuse needs root, or read-write "
            f"access to {path})") from None
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENXIO):
            raise CuseUnavailable(
                f"{path} has no driver behind it: load the CUSE module (`modprobe cuse`)") from None
        raise CuseUnavailable(f"cannot open {path}: {exc.strerror}") from None


class CuseServer:
    """Serve ``handler`` as the NSM character device ``/dev/<name>``.

    ``start()`` opens the channel, answers CUSE_INIT and sets up the node;
    ``serve_forever()`` answers requests until :meth:`stop` (signal-safe), a
    DESTROY, or the kernel closing the channel; ``close()`` removes the device.
    """

    def __init__(self, name: str, handler: Handler, *, mode: int = 0o600, gid: int | None = None,
                 dev_dir: str | os.PathLike[str] = "/dev", channel: str | None = None,
                 sysfs_class: str | os.PathLike[str] = SYSFS_CLASS,
                 opener: Callable[[str], int] | None = None) -> None:
        try:
            check_device_name(name)
        except ValueError as exc:
            raise CuseUnavailable(str(exc)) from None
        if not 0 <= mode <= 0o777:
            raise CuseUnavailable(f"invalid mode {mode:o}")
        self.name = name
        self.session = CuseSession(name, handler)
        self.mode = mode
        self.gid = gid
        self.node = Path(dev_dir) / name
        self.channel = channel or CUSE_CHANNEL
        self._opener = opener or open_channel
        self.sysfs = Path(sysfs_class) / name
        self.devt: int | None = None
        self.fd: int | None = None
        self._made_node = False
        self._stopping = False
        self._in_read = False
        self._buf = bytearray(READ_BUFFER)
        self._view = memoryview(self._buf)

    # -- set-up ----------------------------------------------------------------------

    def start(self, timeout: float = 5.0) -> None:
        if os.path.lexists(self.node):
            raise CuseUnavailable(f"{self.node} already exists (another device, or another "
                                  "nsm cuse); choose another --name")
        self.fd = self._opener(self.channel)
        try:
            self._initialize(timeout)
        except BaseException:
            self.close()
            raise

    def _initialize(self, timeout: float) -> None:
        assert self.fd is not None
        while not self.session.initialized:
            try:
                n = os.readv(self.fd, [self._buf])
            except OSError as exc:
                raise CuseUnavailable(f"reading {self.channel} failed: {exc.strerror}") from None
            answer = self.session.receive(self._view[:n])
            if answer is not None:
                os.write(self.fd, answer)
            if self.session.kernel_version is not None and not self.session.initialized:
                major, minor = self.session.kernel_version
                raise CuseUnavailable(f"the kernel's FUSE protocol {major}.{minor} is too old "
                                      "for CUSE with unrestricted ioctls (7.16 or later needed)")
        # the kernel creates the device while it takes our CUSE_INIT reply
        deadline = time.monotonic() + timeout
        while (devt := self._read_devt()) is None:
            if time.monotonic() > deadline:
                raise CuseUnavailable(f"the kernel did not create the CUSE device {self.name!r} "
                                      "(is the name already taken by another CUSE device?)")
            time.sleep(0.01)
        self.devt = devt
        self._setup_node(deadline)

    def _read_devt(self) -> int | None:
        """The device number from sysfs ``dev`` ("MAJOR:MINOR"), or None while it is not
        there (or not yet complete)."""
        try:
            text = (self.sysfs / "dev").read_text()
        except FileNotFoundError:
            return None
        major, sep, minor = text.strip().partition(":")
        if not (sep and major.isdigit() and minor.isdigit()):
            return None
        return os.makedev(int(major), int(minor))

    def _setup_node(self, deadline: float) -> None:
        """Wait for devtmpfs/udev to make ``/dev/<name>`` (make it ourselves if nothing does),
        then give it our mode and group."""
        assert self.devt is not None
        while True:
            try:
                st = os.lstat(self.node)
            except FileNotFoundError:
                if time.monotonic() > deadline:
                    os.mknod(self.node, stat.S_IFCHR | 0o600, self.devt)
                    self._made_node = True
                    continue
                time.sleep(0.01)
                continue
            if not stat.S_ISCHR(st.st_mode) or st.st_rdev != self.devt:
                raise CuseUnavailable(f"{self.node} is not our device (char "
                                      f"{os.major(self.devt)}:{os.minor(self.devt)})")
            break
        if self.gid is not None:
            os.chown(self.node, -1, self.gid)
        os.chmod(self.node, self.mode)

    # -- serving ---------------------------------------------------------------------

    def stop(self) -> None:
        """Stop serving (safe to call from a signal handler)."""
        self._stopping = True
        if self._in_read:
            self._in_read = False
            raise _Stop

    def serve_forever(self) -> None:
        fd = self.fd
        if fd is None:
            raise RuntimeError("start() first")
        buf, view, receive = self._buf, self._view, self.session.receive
        readv, write = os.readv, os.write
        while not self._stopping:
            try:
                self._in_read = True
                if self._stopping:
                    break
                n = readv(fd, [buf])
                self._in_read = False
            except _Stop:
                break
            except OSError as exc:
                self._in_read = False
                if exc.errno == errno.ENOENT:  # the request went away before we read it
                    continue
                if exc.errno == errno.ENODEV:
                    log.error("the kernel closed the CUSE channel of %s", self.node)
                    break
                raise
            if n == 0:  # not something /dev/cuse does; a closed channel in any case
                log.error("the CUSE channel of %s was closed", self.node)
                break
            answer = receive(view[:n])
            if answer is not None:
                try:
                    write(fd, answer)
                except OSError as exc:
                    # ENOENT: the caller was killed or interrupted meanwhile: nothing to answer
                    if exc.errno == errno.ENODEV:
                        log.error("the kernel closed the CUSE channel of %s", self.node)
                        break
                    if exc.errno != errno.ENOENT:
                        log.error("the kernel refused our reply: %s", exc.strerror)
            if self.session.destroyed:
                break
        self._in_read = False

    def close(self) -> None:
        """Close the channel: the kernel removes the device (and its node)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)
        if self._made_node:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.node)
            self._made_node = False
