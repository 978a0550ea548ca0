"""A stand-in for Linux's side of a CUSE channel, and a model of ``nsm.ko``'s ioctl.

:class:`FakeKernel` turns file operations of a caller into the FUSE messages
Linux writes on ``/dev/cuse`` and applies the replies as Linux does
(``fs/fuse/ioctl.c``'s ``fuse_do_ioctl`` with its retry loop and checks,
``fs/fuse/cuse.c``'s INIT reply processing), against a fake user address space.
:func:`driver_ioctl` is ``drivers/misc/nsm.c``'s ``nsm_dev_ioctl`` on the same
address space, for side-by-side comparisons.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field

from virtio_nsm.cuse import protocol as p
from virtio_nsm.cuse.session import NSM_IOCTL_RAW, NSM_RAW, CuseSession

PAGE = 4096
#: CUSE connections keep FUSE's default of 32 pages per request.
MAX_PAGES = 32
REQUEST_MAX = 0x1000
RESPONSE_MAX = 0x3000


class Fault(Exception):
    """An access to unmapped user memory."""


@dataclass
class Memory:
    """A user address space: mapped regions of bytes; any other address faults."""

    regions: dict[int, bytearray] = field(default_factory=dict)

    def map(self, addr: int, data: bytes | int) -> int:
        self.regions[addr] = bytearray(data if isinstance(data, bytes) else bytes(data))
        return addr

    def _locate(self, addr: int) -> tuple[bytearray, int] | None:
        for start, buf in self.regions.items():
            if start <= addr < start + len(buf):
                return buf, addr - start
        return None

    def read(self, addr: int, n: int) -> bytes:
        out = bytearray()
        for a in range(addr, addr + n):
            hit = self._locate(a)
            if hit is None:
                raise Fault(a)
            out.append(hit[0][hit[1]])
        return bytes(out)

    def write(self, addr: int, data: bytes) -> None:
        """Byte by byte, as copy_to_user: bytes before a fault stay written."""
        for i, b in enumerate(data):
            hit = self._locate(addr + i)
            if hit is None:
                raise Fault(addr + i)
            hit[0][hit[1]] = b

    def snapshot(self) -> dict[int, bytes]:
        return {a: bytes(b) for a, b in self.regions.items()}


class FakeKernel:
    """Linux's CUSE side, talking to ``session`` in bytes only."""

    def __init__(self, session: CuseSession, memory: Memory | None = None) -> None:
        self.session = session
        self.memory = memory if memory is not None else Memory()
        self.unique = 0
        self.unrestricted = False
        self.minor = 0
        self.devname: str | None = None
        #: every (message, reply) that crossed the channel
        self.trace: list[tuple[bytes, bytes | None]] = []
        self.ioctl_round_trips = 0

    def send(self, opcode: int, body: bytes, *, pid: int = 1234) -> bytes | None:
        self.unique += 2
        msg = p.IN_HEADER.pack(p.IN_HEADER.size + len(body), opcode, self.unique, 0, 0, 0, pid,
                               0, 0) + body
        answer = self.session.receive(msg)
        self.trace.append((msg, answer))
        return answer

    def _result(self, answer: bytes | None) -> bytes:
        """The payload of a successful reply to the last message; OSError for an error reply."""
        assert answer is not None, "no reply"
        length, error, unique = p.OUT_HEADER.unpack_from(answer)
        assert length == len(answer), "reply length field disagrees with the write"
        assert unique == self.unique, "reply to another request"
        if error:
            assert error < 0 and length == p.OUT_HEADER.size
            raise OSError(-error, errno.errorcode.get(-error, "?"))
        return answer[p.OUT_HEADER.size:]

    # -- CUSE_INIT, as cuse_send_init / cuse_process_init_reply ------------------------

    def init(self, minor: int = 41) -> None:
        payload = self._result(self.send(p.CUSE_INIT, p.CUSE_INIT_IN.pack(
            7, minor, 0, p.CUSE_UNRESTRICTED_IOCTL)))
        if len(payload) < p.CUSE_INIT_OUT.size or len(payload) > p.CUSE_INIT_OUT.size + 4096:
            raise OSError(errno.EINVAL, "bad CUSE_INIT reply size")
        major, rminor, _u, flags, _mr, _mw, _dmaj, _dmin = p.CUSE_INIT_OUT.unpack_from(payload)
        if major != 7 or rminor < 11:
            raise OSError(errno.EPROTO, "init refused")
        self.minor = rminor
        self.unrestricted = bool(flags & p.CUSE_UNRESTRICTED_IOCTL)
        info = payload[p.CUSE_INIT_OUT.size:]
        assert info.endswith(b"\0"), "device info not NUL-terminated"
        pairs = dict(kv.split(b"=", 1) for kv in info.split(b"\0") if kv)
        self.devname = pairs[b"DEVNAME"].decode()

    # -- file operations -----------------------------------------------------------------

    def open(self) -> int:
        payload = self._result(self.send(p.FUSE_OPEN, p.OPEN_IN.pack(2, 0)))
        fh, _flags, _pad = p.OPEN_OUT.unpack_from(payload)
        return int(fh)

    def release(self, fh: int) -> None:
        self._result(self.send(p.FUSE_RELEASE, p.RELEASE_IN.pack(fh, 2, 0, 0)))

    def read(self, fh: int, size: int) -> bytes:
        return self._result(self.send(p.FUSE_READ, p.READ_IN.pack(fh, 0, size, 0, 0, 2, 0)))

    def write(self, fh: int, data: bytes) -> int:
        self._result(self.send(p.FUSE_WRITE, p.WRITE_IN.pack(fh, 0, len(data), 0, 0, 2, 0) + data))
        return len(data)

    def ioctl(self, fh: int, cmd: int, arg: int, *, compat: bool = False) -> int:
        """``fuse_do_ioctl``: the retry loop, its limits and its copies (OSError on failure)."""
        flags = (p.FUSE_IOCTL_UNRESTRICTED if self.unrestricted else 0) | (
            p.FUSE_IOCTL_COMPAT if compat else 0)
        in_iov: list[tuple[int, int]] = []
        out_iov: list[tuple[int, int]] = []
        if not self.unrestricted:
            size = (cmd >> 16) & 0x3FFF
            if cmd >> 30 & 1:
                in_iov = [(arg, size)]
            if cmd >> 31 & 1:
                out_iov = [(arg, size)]
        limit = MAX_PAGES * PAGE
        for _ in range(64):  # the kernel loops as long as the server asks; we stop a runaway
            in_size = sum(n for _, n in in_iov)
            out_size = sum(n for _, n in out_iov)
            if max(in_size, out_size, PAGE) > limit:
                raise OSError(errno.ENOMEM, "ENOMEM")
            try:
                data = b"".join(self.memory.read(a, n) for a, n in in_iov)
            except Fault:
                raise OSError(errno.EFAULT, "EFAULT") from None
            self.ioctl_round_trips += 1
            body = p.IOCTL_IN.pack(fh, flags, cmd, arg, in_size, out_size) + data
            payload = self._result(self.send(p.FUSE_IOCTL, body))
            if len(payload) < p.IOCTL_OUT.size:
                raise OSError(errno.EIO, "short ioctl reply")
            result, oflags, n_in, n_out = p.IOCTL_OUT.unpack_from(payload)
            rest = payload[p.IOCTL_OUT.size:]
            if oflags & p.FUSE_IOCTL_RETRY:
                if not self.unrestricted:
                    raise OSError(errno.EIO, "retry on a restricted ioctl")
                if n_in > 256 or n_out > 256 or n_in + n_out > 256:
                    raise OSError(errno.ENOMEM, "too many iovecs")
                if len(rest) != (n_in + n_out) * p.IOVEC.size:
                    raise OSError(errno.EIO, "iovec array size")
                iovs = [p.IOVEC.unpack_from(rest, i * p.IOVEC.size) for i in range(n_in + n_out)]
                for base, n in iovs:
                    if compat and (base > 0xFFFFFFFF or n > 0xFFFFFFFF):
                        raise OSError(errno.EIO, "compat iovec out of range")
                for group in (iovs[:n_in], iovs[n_in:]):
                    room = limit
                    for _base, n in group:
                        if n > room:
                            raise OSError(errno.ENOMEM, "iovecs too long")
                        room -= n
                in_iov, out_iov = iovs[:n_in], iovs[n_in:]
                continue
            if len(rest) > out_size:
                raise OSError(errno.EIO, "more out data than out space")
            pos = 0
            try:
                for base, n in out_iov:
                    chunk = rest[pos:pos + n]
                    self.memory.write(base, chunk)
                    pos += len(chunk)
                    if pos >= len(rest):
                        break
            except Fault:
                raise OSError(errno.EFAULT, "EFAULT") from None
            return int(result)
        raise AssertionError("the server keeps asking for retries")


def driver_ioctl(memory: Memory, cmd: int, arg: int, handler: Callable[[bytes], bytes]) -> int:
    """``nsm_dev_ioctl`` of drivers/misc/nsm.c on ``memory`` (OSError on failure)."""
    if cmd != NSM_IOCTL_RAW:
        raise OSError(errno.EINVAL, "EINVAL")
    try:
        raw = memory.read(arg, NSM_RAW.size)
    except Fault:
        raise OSError(errno.EFAULT, "EFAULT") from None
    req_addr, req_len, resp_addr, resp_len = NSM_RAW.unpack(raw)
    if req_len > REQUEST_MAX:
        raise OSError(errno.EMSGSIZE, "EMSGSIZE")
    try:
        request = memory.read(req_addr, req_len)
    except Fault:
        raise OSError(errno.EFAULT, "EFAULT") from None
    response = handler(request)
    n = min(resp_len, len(response))
    try:
        memory.write(resp_addr, response[:n])
        memory.write(arg, NSM_RAW.pack(req_addr, req_len, resp_addr, n))
    except Fault:
        raise OSError(errno.EFAULT, "EFAULT") from None
    return 0


def pack_raw(req_addr: int, req_len: int, resp_addr: int, resp_len: int) -> bytes:
    return NSM_RAW.pack(req_addr, req_len, resp_addr, resp_len)


