"""A CUSE session serving the Linux NSM ioctl: messages in, replies out (sans-IO).

:class:`CuseSession` answers every message the kernel writes on a ``/dev/cuse``
channel: CUSE_INIT (device name, unrestricted ioctls), OPEN, RELEASE, READ and
WRITE (refused with EINVAL, as ``nsm.ko``'s ``/dev/nsm``, which has no read or
write method), POLL (ENOSYS: the kernel then reports the default mask, as for a
device without poll), INTERRUPT (no reply: every request is answered at once),
DESTROY, and FUSE_IOCTL, where :func:`nsm_ioctl` runs ``NSM_IOCTL_RAW``.

``NSM_IOCTL_RAW`` passes a pointer to ``struct nsm_raw`` {``request``,
``response``: {u64 addr; u64 len}}, which points at more caller memory, so it is
an *unrestricted* ioctl: the kernel cannot know what to copy and calls us again
each time we name caller memory (``FUSE_IOCTL_RETRY`` with in and out iovecs).
Each call is a separate message; which step it is follows from the message
itself (no state is kept between them):

1. nothing copied in yet (``in_size`` 0): ask for the 32-byte ``struct nsm_raw``
   at ``arg`` (a bad ``arg`` fails the ioctl with EFAULT in the kernel);
2. the struct alone, no out space yet (``out_size`` 0): a request over 0x1000
   bytes fails with EMSGSIZE, as in the driver; else ask for the struct and the
   request bytes in, and for the struct and ``min(response.len, 0x3000)``
   bytes of the response buffer out (a bad request pointer fails with EFAULT
   before the device sees anything, as in the driver);
3. struct and request bytes, and out space for struct and response: the device
   answers; the reply is the struct with ``response.len`` set to the answer's
   length truncated to the caller's buffer, then that many response bytes
   (the kernel copies them out; a bad response pointer fails with EFAULT after
   the device answered, as in the driver).

If the caller changed its struct between two steps, the lengths no longer agree
with what was copied and step 2 starts again from the new struct.
"""

from __future__ import annotations

import errno
import logging
import struct
from collections.abc import Callable
from typing import Final

from ..nsm.protocol import MAX_REQUEST_SIZE, MAX_RESPONSE_SIZE
from .protocol import (
    FUSE_DESTROY,
    FUSE_IOCTL,
    FUSE_IOCTL_COMPAT,
    FUSE_IOCTL_RETRY,
    FUSE_IOCTL_UNRESTRICTED,
    FUSE_KERNEL_VERSION,
    FUSE_MIN_MINOR,
    FUSE_OUR_MINOR,
    FUSE_POLL,
    NO_REPLY_OPCODES,
    CuseInit,
    Interrupt,
    Ioctl,
    Open,
    Other,
    ProtocolError,
    Read,
    Release,
    Write,
    parse_request,
    reply,
    reply_cuse_init,
    reply_error,
    reply_open,
)

log = logging.getLogger("virtio_nsm.cuse")

#: ``_IOWR(0x0A, 0, struct nsm_raw)``: the one ioctl of Linux's ``/dev/nsm``.
NSM_IOCTL_RAW: Final = 0xC0200A00
#: ``struct nsm_raw`` {``struct nsm_iovec`` {u64 addr; u64 len;} request, response;}
NSM_RAW: Final = struct.Struct("<QQQQ")
_COMPAT_MAX: Final = 0xFFFF_FFFF

Handler = Callable[[bytes], bytes]


#: One FUSE_IOCTL message's fixed part: ``fuse_in_header`` then ``fuse_ioctl_in`` (72 bytes).
_IOCTL_MSG: Final = struct.Struct("<IIQQIIIHHQIIQII")
#: Replies with ``fuse_out_header`` + ``fuse_ioctl_out`` + one or four iovecs, or + the struct.
_RETRY_1: Final = struct.Struct("<IiQiIIIQQ")
_RETRY_4: Final = struct.Struct("<IiQiIIIQQQQQQQQ")
_FINAL: Final = struct.Struct("<IiQiIIIQQQQ")


def nsm_ioctl(msg: Ioctl, handler: Handler) -> bytes:
    """The reply to one FUSE_IOCTL message (one step of the retry protocol above)."""
    return nsm_ioctl_step(msg.header.unique, msg.flags, msg.cmd, msg.arg, msg.out_size,
                          msg.data, handler)


def nsm_ioctl_step(unique: int, flags: int, cmd: int, arg: int, out_size: int, data: bytes,
                   handler: Handler) -> bytes:
    """:func:`nsm_ioctl` on the message's fields (``data``: the ``in_size`` bytes copied in).

    The three replies are packed in one go each: every retry costs a round trip
    through the kernel and two context switches, and Python time on top counts."""
    if cmd != NSM_IOCTL_RAW:
        return reply_error(unique, errno.EINVAL)  # nsm_dev_ioctl: any other cmd
    if not flags & FUSE_IOCTL_UNRESTRICTED:
        # a restricted ioctl cannot fetch the request bytes (never the case after our INIT)
        return reply_error(unique, errno.EIO)
    size = NSM_RAW.size
    n_in = len(data)
    if n_in == 0:
        return _RETRY_1.pack(_RETRY_1.size, 0, unique, 0, FUSE_IOCTL_RETRY, 1, 0, arg, size)
    if n_in < size:
        return reply_error(unique, errno.EIO)  # not what we asked for
    req_addr, req_len, resp_addr, resp_len = NSM_RAW.unpack_from(data)
    if req_len > MAX_REQUEST_SIZE:
        return reply_error(unique, errno.EMSGSIZE)
    resp_cap = resp_len if resp_len < MAX_RESPONSE_SIZE else MAX_RESPONSE_SIZE
    if out_size == size + resp_cap and n_in == size + req_len:
        try:
            response = handler(data[size:])
        except Exception:  # the device never raises; if it did, fail this ioctl only
            log.exception("the NSM device failed on a request")
            return reply_error(unique, errno.EIO)
        n = min(resp_cap, len(response))
        return _FINAL.pack(_FINAL.size + n, 0, unique, 0, 0, 0, 0, req_addr, req_len, resp_addr,
                           n) + response[:n]
    # step 2 (or the caller's struct changed since the last step): name the memory.
    # An empty range is never touched (copy_from_user(.., 0) succeeds whatever the address).
    req_base = req_addr if req_len else 0
    resp_base = resp_addr if resp_cap else 0
    if flags & FUSE_IOCTL_COMPAT and (req_base + req_len > _COMPAT_MAX + 1
                                      or resp_base + resp_cap > _COMPAT_MAX + 1):
        return reply_error(unique, errno.EFAULT)  # beyond a 32-bit caller's address space
    return _RETRY_4.pack(_RETRY_4.size, 0, unique, 0, FUSE_IOCTL_RETRY, 2, 2,
                         arg, size, req_base, req_len, arg, size, resp_base, resp_cap)


class CuseSession:
    """One ``/dev/cuse`` channel: call :meth:`receive` with each message read, write what it returns.

    ``handler`` answers one NSM request (bytes in, bytes out); it is called for one
    request at a time, in the order the kernel delivers them.
    """

    def __init__(self, name: str, handler: Handler) -> None:
        self.name = name
        self.handler = handler
        #: The kernel's protocol version, once CUSE_INIT arrived.
        self.kernel_version: tuple[int, int] | None = None
        #: The minor version both sides use.
        self.minor = 0
        self.initialized = False
        self.destroyed = False
        self.open_files: set[int] = set()
        self._next_fh = 1
        #: Messages received, ioctl calls (all steps) and NSM requests answered.
        self.messages = 0
        self.ioctl_calls = 0
        self.requests = 0
        self.malformed = 0

    def _handle(self, request: bytes) -> bytes:
        self.requests += 1
        return self.handler(request)

    def receive(self, message: bytes | bytearray | memoryview) -> bytes | None:
        """The reply to one message (``None``: the message takes no reply)."""
        self.messages += 1
        if len(message) >= _IOCTL_MSG.size:  # the hot path: FUSE_IOCTL without objects
            (length, opcode, unique, _node, _uid, _gid, _pid, _ext, _pad,
             fh, flags, cmd, arg, in_size, out_size) = _IOCTL_MSG.unpack_from(message)
            if opcode == FUSE_IOCTL and length == len(message) == _IOCTL_MSG.size + in_size:
                self.ioctl_calls += 1
                if fh not in self.open_files:
                    return reply_error(unique, errno.EBADF)
                return nsm_ioctl_step(unique, flags, cmd, arg, out_size,
                                      bytes(message[_IOCTL_MSG.size:]), self._handle)
        try:
            msg = parse_request(message)
        except ProtocolError as exc:
            self.malformed += 1
            log.warning("malformed message from the kernel: %s", exc)
            if exc.unique is None or exc.opcode in NO_REPLY_OPCODES:
                return None
            return reply_error(exc.unique, errno.EIO)
        unique = msg.header.unique
        if isinstance(msg, Ioctl):
            self.ioctl_calls += 1
            if msg.fh not in self.open_files:
                return reply_error(unique, errno.EBADF)
            return nsm_ioctl(msg, self._handle)
        if isinstance(msg, CuseInit):
            return self._init(msg)
        if isinstance(msg, Interrupt):
            return None  # the interrupted request is already answered (one at a time)
        if not self.initialized:
            if msg.header.opcode in NO_REPLY_OPCODES:
                return None
            return reply_error(unique, errno.EIO)
        if isinstance(msg, Open):
            fh = self._next_fh
            self._next_fh += 1
            self.open_files.add(fh)
            return reply_open(unique, fh)
        if isinstance(msg, Release):
            self.open_files.discard(msg.fh)
            return reply(unique)
        if isinstance(msg, Read | Write):
            return reply_error(unique, errno.EINVAL)  # /dev/nsm has no read or write
        assert isinstance(msg, Other)
        op = msg.header.opcode
        if op in NO_REPLY_OPCODES:
            return None
        if op == FUSE_DESTROY:
            self.destroyed = True
            return reply(unique)
        if op == FUSE_POLL:
            return reply_error(unique, errno.ENOSYS)  # default poll mask, as nsm.ko
        return reply_error(unique, errno.ENOSYS)

    def _init(self, msg: CuseInit) -> bytes:
        unique = msg.header.unique
        if self.initialized:
            return reply_error(unique, errno.EIO)
        self.kernel_version = (msg.major, msg.minor)
        if msg.major != FUSE_KERNEL_VERSION or msg.minor < FUSE_MIN_MINOR:
            log.error("kernel speaks FUSE %d.%d; need %d.%d or later 7.x", msg.major, msg.minor,
                      FUSE_KERNEL_VERSION, FUSE_MIN_MINOR)
            return reply_error(unique, errno.EPROTO)
        self.minor = min(msg.minor, FUSE_OUR_MINOR)
        self.initialized = True
        return reply_cuse_init(unique, self.minor, self.name)
