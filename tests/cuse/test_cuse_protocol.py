"""The FUSE/CUSE message codec and the session's answers to hostile or unexpected messages."""

from __future__ import annotations

import errno

import pytest
from fake_kernel import FakeKernel
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_nsm.cuse import protocol as p
from virtio_nsm.cuse.session import NSM_IOCTL_RAW, CuseSession


def header(opcode: int, body: bytes = b"", unique: int = 7, length: int | None = None) -> bytes:
    n = p.IN_HEADER.size + len(body) if length is None else length
    return p.IN_HEADER.pack(n, opcode, unique, 0, 0, 0, 99, 0, 0) + body


def out(answer: bytes | None) -> tuple[int, int, bytes]:
    assert answer is not None
    length, error, unique = p.OUT_HEADER.unpack_from(answer)
    assert length == len(answer)
    return error, unique, answer[p.OUT_HEADER.size:]


def ready_session() -> tuple[CuseSession, FakeKernel, int]:
    s = CuseSession("nsm-test", lambda req: b"\xa0")
    k = FakeKernel(s)
    k.init()
    return s, k, k.open()


# --------------------------------------------------------------------------- codec


def test_header_layout_is_40_and_16_bytes() -> None:
    assert p.IN_HEADER.size == 40 and p.OUT_HEADER.size == 16
    assert p.IOCTL_IN.size == 32 and p.IOCTL_OUT.size == 16 and p.IOVEC.size == 16
    assert p.CUSE_INIT_IN.size == 16 and p.CUSE_INIT_OUT.size == 72
    assert p.OPEN_OUT.size == 16 and p.RELEASE_IN.size == 24 and p.READ_IN.size == 40


@pytest.mark.parametrize("n", [0, 1, 16, 39])
def test_short_read_is_refused_without_a_unique(n: int) -> None:
    with pytest.raises(p.ProtocolError) as exc:
        p.parse_request(header(p.FUSE_OPEN, b"\0" * 8)[:n])
    assert exc.value.unique is None


@pytest.mark.parametrize("claimed", [0, 39, 41, 48 + 1, 2**32 - 1])
def test_length_field_must_match_the_read(claimed: int) -> None:
    msg = header(p.FUSE_OPEN, b"\0" * 8, length=claimed)
    with pytest.raises(p.ProtocolError) as exc:
        p.parse_request(msg)
    assert exc.value.unique == 7


@pytest.mark.parametrize("opcode,size", [(p.CUSE_INIT, 16), (p.FUSE_OPEN, 8), (p.FUSE_RELEASE, 24),
                                         (p.FUSE_READ, 40), (p.FUSE_WRITE, 40), (p.FUSE_IOCTL, 32),
                                         (p.FUSE_INTERRUPT, 8)])
def test_truncated_arguments_are_refused(opcode: int, size: int) -> None:
    with pytest.raises(p.ProtocolError, match="needed"):
        p.parse_request(header(opcode, b"\0" * (size - 1)))
    p.parse_request(header(opcode, b"\0" * size))  # exactly enough parses


def test_ioctl_in_size_must_match_the_data() -> None:
    body = p.IOCTL_IN.pack(1, 2, NSM_IOCTL_RAW, 0x1000, 32, 0)
    with pytest.raises(p.ProtocolError, match="in_size 32"):
        p.parse_request(header(p.FUSE_IOCTL, body + b"\0" * 31))
    with pytest.raises(p.ProtocolError):
        p.parse_request(header(p.FUSE_IOCTL, body + b"\0" * 33))
    big = p.IOCTL_IN.pack(1, 2, NSM_IOCTL_RAW, 0x1000, 2**32 - 1, 0)  # oversized length
    with pytest.raises(p.ProtocolError):
        p.parse_request(header(p.FUSE_IOCTL, big + b"\0" * 64))
    msg = p.parse_request(header(p.FUSE_IOCTL, body + b"x" * 32))
    assert isinstance(msg, p.Ioctl) and msg.data == b"x" * 32 and msg.arg == 0x1000


def test_write_size_must_match_the_data() -> None:
    body = p.WRITE_IN.pack(1, 0, 10, 0, 0, 0, 0)
    with pytest.raises(p.ProtocolError):
        p.parse_request(header(p.FUSE_WRITE, body + b"\0" * 9))
    assert isinstance(p.parse_request(header(p.FUSE_WRITE, body + b"\0" * 10)), p.Write)


def test_unknown_opcode_parses_as_other() -> None:
    msg = p.parse_request(header(12345, b"abc"))
    assert isinstance(msg, p.Other) and msg.header.opcode == 12345 and msg.body == b"abc"


def test_cuse_init_reply_bytes() -> None:
    answer = p.reply_cuse_init(5, 31, "nsm")
    err, unique, payload = out(answer)
    assert (err, unique) == (0, 5)
    assert p.CUSE_INIT_OUT.unpack_from(payload) == (7, 31, 0, 1, 4096, 4096, 0, 0)
    assert payload[72:] == b"DEVNAME=nsm\0"


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "a/b", "nsm\0x", "n sm", "x" * 65,
                                  "ü", "a=b"])
def test_bad_device_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="invalid device name"):
        p.device_info(name)


def test_retry_reply_refuses_what_the_kernel_would_reject() -> None:
    with pytest.raises(ValueError):
        p.reply_ioctl_retry(1, [(0, 1)] * 200, [(0, 1)] * 57)
    with pytest.raises(ValueError):
        p.reply_ioctl_retry(1, [(2**32, 1)], [], compat=True)
    with pytest.raises(ValueError):
        p.reply_error(1, 0)


# --------------------------------------------------------------------------- session


def test_init_negotiates_minor_unrestricted_and_name() -> None:
    s = CuseSession("nsm-x", lambda r: r)
    k = FakeKernel(s)
    k.init(minor=41)
    assert k.minor == p.FUSE_OUR_MINOR and k.unrestricted and k.devname == "nsm-x"
    assert s.initialized
    k2 = FakeKernel(CuseSession("n", lambda r: r))
    k2.init(minor=20)
    assert k2.minor == 20  # the kernel's, when older than ours


@pytest.mark.parametrize("major,minor", [(8, 0), (6, 99), (7, 15), (7, 0)])
def test_init_from_an_unsupported_kernel_is_refused(major: int, minor: int) -> None:
    s = CuseSession("nsm", lambda r: r)
    err, _, _ = out(s.receive(header(p.CUSE_INIT, p.CUSE_INIT_IN.pack(major, minor, 0, 1))))
    assert err == -errno.EPROTO and not s.initialized


def test_second_init_and_requests_before_init_get_eio() -> None:
    s = CuseSession("nsm", lambda r: r)
    err, unique, _ = out(s.receive(header(p.FUSE_OPEN, p.OPEN_IN.pack(2, 0), unique=9)))
    assert (err, unique) == (-errno.EIO, 9)
    FakeKernel(s).init()
    err, _, _ = out(s.receive(header(p.CUSE_INIT, p.CUSE_INIT_IN.pack(7, 41, 0, 1))))
    assert err == -errno.EIO


def test_unknown_opcodes_get_enosys_and_no_reply_ones_get_none() -> None:
    s, _k, _fh = ready_session()
    for op in (3, 25, 20, 4095, 99999):
        err, unique, _ = out(s.receive(header(op, b"\0" * 8, unique=44)))
        assert (err, unique) == (-errno.ENOSYS, 44)
    for op in (p.FUSE_FORGET, p.FUSE_BATCH_FORGET, p.FUSE_NOTIFY_REPLY):
        assert s.receive(header(op, b"\0" * 16)) is None
    assert s.receive(header(p.FUSE_INTERRUPT, p.INTERRUPT_IN.pack(12))) is None


def test_malformed_messages_get_eio_when_answerable() -> None:
    s, _k, _fh = ready_session()
    err, unique, _ = out(s.receive(header(p.FUSE_IOCTL, b"\0" * 5, unique=66)))
    assert (err, unique) == (-errno.EIO, 66)
    assert s.receive(b"\0" * 12) is None  # no header: nothing to answer
    assert s.receive(header(p.FUSE_INTERRUPT, b"\0" * 3)) is None  # takes no reply, even malformed
    assert s.malformed == 3


def test_read_and_write_are_refused_like_nsm_ko() -> None:
    _s, k, fh = ready_session()
    with pytest.raises(OSError) as exc:
        k.read(fh, 100)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError) as exc:
        k.write(fh, b"DescribeNSM")
    assert exc.value.errno == errno.EINVAL


def test_poll_gets_enosys_so_the_kernel_uses_the_default_mask() -> None:
    s, _k, fh = ready_session()
    err, _, _ = out(s.receive(header(p.FUSE_POLL, struct_poll(fh))))
    assert err == -errno.ENOSYS


def struct_poll(fh: int) -> bytes:
    import struct

    return struct.pack("<QQII", fh, 0, 0, 0)


def test_open_release_track_handles_and_ioctl_on_unknown_handle_is_ebadf() -> None:
    s, k, fh = ready_session()
    fh2 = k.open()
    assert fh != fh2 and s.open_files == {fh, fh2}
    k.release(fh)
    assert s.open_files == {fh2}
    with pytest.raises(OSError) as exc:
        k.ioctl(fh, NSM_IOCTL_RAW, 0x1000)
    assert exc.value.errno == errno.EBADF


def test_destroy_is_answered_and_ends_the_session() -> None:
    s, _k, _fh = ready_session()
    err, unique, _ = out(s.receive(header(p.FUSE_DESTROY, unique=70)))
    assert (err, unique) == (0, 70) and s.destroyed


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 5000), st.booleans())
def test_arbitrary_bytes_never_crash_the_session(tail: bytes, opcode: int, fix_len: bool) -> None:
    s, _k, _fh = ready_session()
    msg = header(opcode, tail) if fix_len else (header(opcode) + tail)[: 40 + len(tail) // 2]
    answer = s.receive(msg)
    if answer is not None:
        length, error, _unique = p.OUT_HEADER.unpack_from(answer)
        assert length == len(answer) and error <= 0
