"""``NSM_IOCTL_RAW`` through CUSE's retry protocol, against a fake kernel, beside a model of nsm.ko."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import cbor2
import pytest
from fake_kernel import FakeKernel, Memory, driver_ioctl, pack_raw
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_nsm.cuse.session import NSM_IOCTL_RAW, NSM_RAW, CuseSession
from virtio_nsm.durable import DurableNsm
from virtio_nsm.nsm.device import NsmDevice

ARG, REQ, RESP = 0x10_000, 0x20_000, 0x40_000


class Recorder:
    """A deterministic device: the answer's length depends on the request; calls are recorded."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []

    def __call__(self, request: bytes) -> bytes:
        self.calls.append(request)
        n = (len(request) * 37 + 5) % 0x3000 + 1
        return (hashlib.sha256(request).digest() * (n // 32 + 1))[:n]


def setup(handler: object, memory: Memory | None = None) -> tuple[FakeKernel, int]:
    session = CuseSession("nsm-test", handler)  # type: ignore[arg-type]
    kernel = FakeKernel(session, memory)
    kernel.init()
    return kernel, kernel.open()


def call(kernel: FakeKernel, fh: int, request: bytes, resp_size: int = 0x3000) -> bytes:
    mem = kernel.memory
    mem.map(REQ, request or b"\0")
    mem.map(RESP, resp_size)
    mem.map(ARG, pack_raw(REQ, len(request), RESP, resp_size))
    assert kernel.ioctl(fh, NSM_IOCTL_RAW, ARG) == 0
    n = NSM_RAW.unpack(mem.read(ARG, 32))[3]
    return mem.read(RESP, n)


def test_describe_nsm_through_three_calls_of_the_retry_protocol() -> None:
    dev = NsmDevice()
    kernel, fh = setup(dev.handle)
    answer = cbor2.loads(call(kernel, fh, cbor2.dumps("DescribeNSM")))
    assert answer["DescribeNSM"]["max_pcrs"] == 32
    assert kernel.ioctl_round_trips == 3  # struct, then request, then the answer


def test_extend_pcr_reaches_the_device_once() -> None:
    dev = NsmDevice()
    kernel, fh = setup(dev.handle)
    before = dev.state.pcrs
    r = cbor2.loads(call(kernel, fh, cbor2.dumps({"ExtendPCR": {"index": 16, "data": b"abc"}})))
    assert r["ExtendPCR"]["data"] == hashlib.sha384(bytes(48) + b"abc").digest()
    assert dev.state.pcrs != before
    r = cbor2.loads(call(kernel, fh, cbor2.dumps({"DescribePCR": {"index": 16}})))
    assert r["DescribePCR"]["data"] == hashlib.sha384(bytes(48) + b"abc").digest()


def test_response_is_truncated_to_the_caller_buffer_and_the_rest_untouched() -> None:
    rec = Recorder()
    kernel, fh = setup(rec)
    mem = kernel.memory
    request = b"q" * 100  # answer: 3706 bytes
    full = Recorder()(request)
    mem.map(REQ, request)
    mem.map(RESP, b"\xee" * 64)
    mem.map(ARG, pack_raw(REQ, 100, RESP, 16))
    assert kernel.ioctl(fh, NSM_IOCTL_RAW, ARG) == 0
    assert NSM_RAW.unpack(mem.read(ARG, 32)) == (REQ, 100, RESP, 16)
    assert mem.read(RESP, 64) == full[:16] + b"\xee" * 48


def test_huge_response_buffer_is_fine_and_only_the_answer_is_written() -> None:
    rec = Recorder()
    kernel, fh = setup(rec)
    mem = kernel.memory
    mem.map(REQ, b"x")
    mem.map(RESP, b"\xee" * 0x3100)  # the rest of the caller's 2**40 bytes is unmapped
    mem.map(ARG, pack_raw(REQ, 1, RESP, 2**40))
    assert kernel.ioctl(fh, NSM_IOCTL_RAW, ARG) == 0
    n = len(Recorder()(b"x"))
    assert NSM_RAW.unpack(mem.read(ARG, 32))[3] == n
    assert mem.read(RESP + n, 0x3100 - n) == b"\xee" * (0x3100 - n)


@pytest.mark.parametrize("size", [0x1001, 0x2000, 2**64 - 1])
def test_request_over_0x1000_is_emsgsize_and_never_reaches_the_device(size: int) -> None:
    rec = Recorder()
    kernel, fh = setup(rec)
    kernel.memory.map(REQ, 0x1001)
    kernel.memory.map(RESP, 0x3000)
    kernel.memory.map(ARG, pack_raw(REQ, size, RESP, 0x3000))
    with pytest.raises(OSError) as exc:
        kernel.ioctl(fh, NSM_IOCTL_RAW, ARG)
    assert exc.value.errno == errno.EMSGSIZE and rec.calls == []


def test_request_of_exactly_0x1000_bytes_is_served() -> None:
    rec = Recorder()
    kernel, fh = setup(rec)
    call(kernel, fh, b"r" * 0x1000)
    assert rec.calls == [b"r" * 0x1000]


@pytest.mark.parametrize("where", ["struct", "request", "response", "request-tail"])
def test_bad_pointers_are_efault_like_the_driver(where: str) -> None:
    for kind in ("cuse", "driver"):
        rec = Recorder()
        mem = Memory()
        mem.map(REQ, b"abcdef")
        mem.map(RESP, 0x3000)
        raw = pack_raw(REQ, 6, RESP, 0x3000)
        arg = ARG
        if where == "struct":
            arg = 0xDEAD_0000
        elif where == "request":
            raw = pack_raw(0xBAD_0000, 6, RESP, 0x3000)
        elif where == "request-tail":
            raw = pack_raw(REQ, 7, RESP, 0x3000)  # one byte past the mapping
        else:
            raw = pack_raw(REQ, 6, 0xBAD_0000, 0x3000)
        mem.map(ARG, raw)
        with pytest.raises(OSError) as exc:
            if kind == "cuse":
                kernel, fh = setup(rec, mem)
                kernel.ioctl(fh, NSM_IOCTL_RAW, arg)
            else:
                driver_ioctl(mem, NSM_IOCTL_RAW, arg, rec)
        assert exc.value.errno == errno.EFAULT, kind
        # the device saw the request only when the request itself was readable
        assert len(rec.calls) == (1 if where == "response" else 0), kind


@pytest.mark.parametrize("cmd", [0, 0x5451, 0xC0200A01, 0x80200A00, 0xC0100A00, 0xC0210A00, 0xFFFFFFFF])
def test_other_ioctl_numbers_are_einval(cmd: int) -> None:
    rec = Recorder()
    kernel, fh = setup(rec)
    kernel.memory.map(ARG, 32)
    with pytest.raises(OSError) as exc:
        kernel.ioctl(fh, cmd, ARG)
    assert exc.value.errno == errno.EINVAL and rec.calls == []


def test_empty_request_with_null_pointer_is_served_like_the_driver() -> None:
    rec = Recorder()
    kernel, fh = setup(rec)
    kernel.memory.map(RESP, 0x3000)
    kernel.memory.map(ARG, pack_raw(0, 0, RESP, 0x3000))
    assert kernel.ioctl(fh, NSM_IOCTL_RAW, ARG) == 0
    assert rec.calls == [b""]
    # and a zero-length response buffer at NULL: nothing written, length 0
    kernel.memory.map(ARG, pack_raw(0, 0, 0, 0))
    assert kernel.ioctl(fh, NSM_IOCTL_RAW, ARG) == 0
    assert NSM_RAW.unpack(kernel.memory.read(ARG, 32))[3] == 0


def test_compat_caller_addresses_beyond_4g_are_efault() -> None:
    rec = Recorder()
    kernel, fh = setup(rec)
    kernel.memory.map(ARG, pack_raw(2**33, 4, RESP, 0x3000))
    with pytest.raises(OSError) as exc:
        kernel.ioctl(fh, NSM_IOCTL_RAW, ARG, compat=True)
    assert exc.value.errno == errno.EFAULT and rec.calls == []
    kernel.memory.map(REQ, b"abcd")
    kernel.memory.map(RESP, 0x3000)
    kernel.memory.map(ARG, pack_raw(REQ, 4, RESP, 0x3000))
    assert kernel.ioctl(fh, NSM_IOCTL_RAW, ARG, compat=True) == 0 and rec.calls == [b"abcd"]


def test_struct_changed_between_steps_is_followed_not_trusted() -> None:
    """A caller thread rewriting its struct mid-ioctl: the lengths copied no longer match,
    so the session asks again for the new ranges instead of misreading the data."""
    rec = Recorder()
    session = CuseSession("nsm-test", rec)
    kernel = FakeKernel(session)
    kernel.init()
    fh = kernel.open()
    mem = kernel.memory
    mem.map(REQ, b"0123456789")
    mem.map(RESP, 0x3000)
    mem.map(ARG, pack_raw(REQ, 4, RESP, 0x3000))
    original = session.receive

    def racing(message: bytes | bytearray | memoryview) -> bytes | None:
        answer = original(message)
        if kernel.ioctl_round_trips == 2:  # after step 2 named 4 request bytes, grow to 10
            mem.write(ARG, pack_raw(REQ, 10, RESP, 0x3000))
        return answer

    session.receive = racing  # type: ignore[method-assign]
    assert kernel.ioctl(fh, NSM_IOCTL_RAW, ARG) == 0
    assert rec.calls == [b"0123456789"]


def test_concurrent_openers_interleaving_steps_each_get_their_own_answer() -> None:
    rec = Recorder()
    session = CuseSession("nsm-test", rec)
    kernel = FakeKernel(session)
    kernel.init()
    a, b = kernel.open(), kernel.open()
    assert a != b
    assert call(kernel, a, b"first") == Recorder()(b"first")
    assert call(kernel, b, b"second") == Recorder()(b"second")
    assert rec.calls == [b"first", b"second"]


@settings(max_examples=300, deadline=None)
@given(
    req=st.binary(max_size=64),
    req_len=st.one_of(st.integers(0, 80), st.sampled_from([0x1000, 0x1001, 2**64 - 1])),
    resp_len=st.one_of(st.integers(0, 0x3100), st.sampled_from([2**32, 2**64 - 1])),
    resp_map=st.integers(0, 0x3100),
    req_shift=st.sampled_from([0, 0xBAD_0000]),
    resp_shift=st.sampled_from([0, 0xBAD_0000]),
)
def test_same_observable_outcome_as_the_driver(req: bytes, req_len: int, resp_len: int,
                                               resp_map: int, req_shift: int,
                                               resp_shift: int) -> None:
    """Return value or errno, device calls and caller memory, beside drivers/misc/nsm.c.

    Known difference: when the response buffer faults, CUSE has already written
    the struct's response.len (the kernel copies out in iovec order); the driver has not."""
    outcomes = []
    for kind in ("cuse", "driver"):
        rec = Recorder()
        mem = Memory()
        mem.map(REQ, req or b"\0")
        mem.map(RESP, b"\xee" * resp_map if resp_map else b"\xee")
        mem.map(ARG, pack_raw(REQ + req_shift, req_len, RESP + resp_shift, resp_len))
        try:
            if kind == "cuse":
                kernel, fh = setup(rec, mem)
                result: int | str = kernel.ioctl(fh, NSM_IOCTL_RAW, ARG)
            else:
                result = driver_ioctl(mem, NSM_IOCTL_RAW, ARG, rec)
        except OSError as exc:
            result = errno.errorcode[exc.errno]
        snap = mem.snapshot()
        if result == "EFAULT":
            snap.pop(ARG)
        outcomes.append((result, rec.calls, snap))
    assert outcomes[0] == outcomes[1]


def test_durable_state_dir_keeps_a_change_made_through_cuse(tmp_path: Path) -> None:
    nsm = DurableNsm.open(tmp_path / "state")
    try:
        kernel, fh = setup(nsm.handle)
        r = cbor2.loads(call(kernel, fh, cbor2.dumps({"ExtendPCR": {"index": 20, "data": b"d"}})))
        assert "ExtendPCR" in r
        call(kernel, fh, cbor2.dumps({"LockPCR": {"index": 20}}))
    finally:
        nsm.close()
    again = DurableNsm.open(tmp_path / "state")
    try:
        kernel, fh = setup(again.handle)
        d = cbor2.loads(call(kernel, fh, cbor2.dumps({"DescribePCR": {"index": 20}})))
        assert d["DescribePCR"] == {"lock": True, "data": hashlib.sha384(bytes(48) + b"d").digest()}
    finally:
        again.close()
