"""The device's behaviour (facts §2), atomicity, and properties over arbitrary input."""

from __future__ import annotations

import hashlib

import cbor2
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from support import fuzz_settings

from virtio_nsm import ConfigurationError, Digest, ErrorCode, NsmDevice
from virtio_nsm.nsm import protocol as p
from virtio_nsm.nsm.device import Commit, DeviceState
from virtio_nsm.request import RequestToken


def call(device: NsmDevice, request: p.Request) -> p.Response:
    return p.decode_response(device.handle(p.encode_request(request)))


def err(code: ErrorCode) -> p.ErrorResponse:
    return p.ErrorResponse(code)


def test_extend_known_answer(device: NsmDevice) -> None:
    r = call(device, p.ExtendPCR(16, bytes.fromhex("0b00374863ff5c65")))
    assert r == p.ExtendPCRResponse(bytes.fromhex(
        "b33da05a0fdb71627c8c68fc4232281fc440edd6f0ac7467fa497bbb907db32d"
        "957b5fd393845fa02c264ad5ea233888"))


def test_extend_is_hash_of_old_and_data(device: NsmDevice) -> None:
    value = bytes(48)
    for data in (b"", b"a", b"\x00" * 3000):
        value = hashlib.sha384(value + data).digest()
        assert call(device, p.ExtendPCR(20, data)) == p.ExtendPCRResponse(value)
    assert call(device, p.DescribePCR(20)) == p.DescribePCRResponse(False, value)


def test_boot_state(device: NsmDevice) -> None:
    d = call(device, p.DescribeNSM())
    assert d == p.DescribeNSMResponse(1, 0, 0, "i-0123456789abcdef0-enc0123456789abcdef", 32,
                                      tuple(range(16)), "SHA384")
    for i in range(32):
        r = call(device, p.DescribePCR(i))
        assert isinstance(r, p.DescribePCRResponse)
        assert r.lock == (i < 16)
        assert len(r.data) == 48
        if i in (0, 1, 2, 3) or i >= 5:
            assert r.data == bytes(48), i  # debug-mode enclave: PCR0-2 zero
    pcr4 = call(device, p.DescribePCR(4))
    assert isinstance(pcr4, p.DescribePCRResponse) and pcr4.data != bytes(48)


# (request, expected response) in order, on one fresh device
SCENARIO: list[tuple[p.Request, p.Response]] = [
    (p.DescribePCR(31), p.DescribePCRResponse(False, bytes(48))),
    (p.DescribePCR(32), err(ErrorCode.InvalidIndex)),
    (p.DescribePCR(50), err(ErrorCode.InvalidIndex)),
    (p.DescribePCR(65535), err(ErrorCode.InvalidIndex)),
    (p.ExtendPCR(0, b"x"), err(ErrorCode.ReadOnlyIndex)),
    (p.ExtendPCR(15, b"x"), err(ErrorCode.ReadOnlyIndex)),
    (p.ExtendPCR(50, b"x"), err(ErrorCode.InvalidIndex)),
    (p.LockPCR(3), err(ErrorCode.ReadOnlyIndex)),
    (p.LockPCR(32), err(ErrorCode.InvalidIndex)),
    (p.LockPCR(16), p.LockPCRResponse()),
    (p.LockPCR(16), err(ErrorCode.ReadOnlyIndex)),
    (p.ExtendPCR(16, b"x"), err(ErrorCode.ReadOnlyIndex)),
    (p.LockPCRs(33), err(ErrorCode.InvalidIndex)),
    (p.LockPCRs(10), p.LockPCRsResponse()),  # all already locked: not an error
    (p.LockPCRs(0), p.LockPCRsResponse()),
    (p.ExtendPCR(31, b""), p.ExtendPCRResponse(hashlib.sha384(bytes(48)).digest())),
    (p.LockPCRs(32), p.LockPCRsResponse()),
    (p.ExtendPCR(31, b""), err(ErrorCode.ReadOnlyIndex)),
    (p.LockPCR(20), err(ErrorCode.ReadOnlyIndex)),
    (p.DescribePCR(31), p.DescribePCRResponse(True, hashlib.sha384(bytes(48)).digest())),
]


def test_behaviour_table(device: NsmDevice) -> None:
    for request, expected in SCENARIO:
        assert call(device, request) == expected, request
    d = call(device, p.DescribeNSM())
    assert isinstance(d, p.DescribeNSMResponse) and d.locked_pcrs == tuple(range(32))


def test_describe_nsm_follows_every_lock(device: NsmDevice) -> None:
    # The answer is kept per state (the hot path): a lock must show at once.
    first = device.handle(b"\x6bDescribeNSM")
    assert device.handle(b"\x6bDescribeNSM") == first
    assert call(device, p.LockPCR(20)) == p.LockPCRResponse()
    d = call(device, p.DescribeNSM())
    assert isinstance(d, p.DescribeNSMResponse) and d.locked_pcrs == (*range(16), 20)
    assert call(device, p.LockPCRs(32)) == p.LockPCRsResponse()
    d = call(device, p.DescribeNSM())
    assert isinstance(d, p.DescribeNSMResponse) and d.locked_pcrs == tuple(range(32))


def test_get_random(device: NsmDevice) -> None:
    a, b = device.handle(p.encode_request(p.GetRandom())), device.handle(b"\x69GetRandom")
    prefix = bytes.fromhex("a16947657452616e646f6da16672616e646f6d590100")
    assert a.startswith(prefix) and b.startswith(prefix)
    assert len(a) == len(prefix) + 256
    assert a != b


def test_input_too_large(device: NsmDevice) -> None:
    assert call(device, p.Attestation(public_key=b"k" * 4096)) == err(ErrorCode.InputTooLarge)
    assert device.handle(b"\x00" * 0x1001) == p.encode_error(ErrorCode.InputTooLarge)


def test_large_fields_fit(device: NsmDevice) -> None:
    device.handle(p.encode_request(p.LockPCRs(32)))
    r = call(device, p.Attestation(public_key=b"k" * 4050))
    assert isinstance(r, p.AttestationResponse)
    r = call(device, p.Attestation(user_data=b"u" * 1330, nonce=b"n" * 1330, public_key=b"k" * 1330))
    assert isinstance(r, p.AttestationResponse)


@pytest.mark.parametrize(("digest", "size", "hashname"),
                         [("SHA256", 32, "sha256"), ("SHA384", 48, "sha384"), ("SHA512", 64, "sha512")])
def test_digests(digest: str, size: int, hashname: str) -> None:
    device = NsmDevice(digest=digest)
    d = call(device, p.DescribeNSM())
    assert isinstance(d, p.DescribeNSMResponse) and d.digest == digest
    r = call(device, p.ExtendPCR(16, b"abc"))
    assert r == p.ExtendPCRResponse(hashlib.new(hashname, bytes(size) + b"abc").digest())


def test_boot_measurements_and_options() -> None:
    m = {0: b"\x01" * 48, 8: b"\x08" * 48}
    device = NsmDevice(module_id="i-1-enc2", boot_measurements=m)
    assert call(device, p.DescribePCR(0)) == p.DescribePCRResponse(True, b"\x01" * 48)
    assert call(device, p.DescribePCR(8)) == p.DescribePCRResponse(True, b"\x08" * 48)
    assert call(device, p.DescribePCR(4)) == p.DescribePCRResponse(True, bytes(48))
    with pytest.raises(ConfigurationError):
        NsmDevice(boot_measurements={16: b"\x00" * 48})
    with pytest.raises(ConfigurationError):
        NsmDevice(boot_measurements={0: b"\x00" * 32})
    with pytest.raises(ConfigurationError):
        NsmDevice(digest="MD5")
    with pytest.raises(ConfigurationError):
        NsmDevice(module_id="")


def test_generated_module_id_shape() -> None:
    import re

    ids = {NsmDevice().state.module_id for _ in range(3)}
    assert len(ids) == 3
    for module_id in ids:
        assert re.fullmatch(r"i-[0-9a-f]{17}-enc[0-9a-f]{16}", module_id)


def test_failed_commit_leaves_state_untouched(clock: object) -> None:
    committed: list[Commit] = []
    fail = True

    def commit(change: Commit) -> None:
        if fail:
            raise OSError("disk full")
        committed.append(change)

    device = NsmDevice(commit=commit)
    before = device.state
    for request in (p.ExtendPCR(16, b"x"), p.LockPCR(16), p.LockPCRs(32)):
        assert call(device, request) == err(ErrorCode.InternalError)
        assert device.state == before
    # reads still work
    assert isinstance(call(device, p.DescribePCR(16)), p.DescribePCRResponse)
    assert isinstance(call(device, p.Attestation()), p.AttestationResponse)
    fail = False
    request = p.encode_request(p.ExtendPCR(16, b"x"))
    response = device.handle(request, token=RequestToken(7, 1))
    assert isinstance(p.decode_response(response), p.ExtendPCRResponse)
    assert committed == [Commit(device.state, request, response, RequestToken(7, 1))]


def test_reads_do_not_commit() -> None:
    committed: list[Commit] = []
    device = NsmDevice(commit=committed.append)
    for request in (p.DescribePCR(1), p.DescribeNSM(), p.GetRandom(), p.Attestation(), p.LockPCRs(16)):
        call(device, request)
    assert committed == []


def test_snapshot_restore(device: NsmDevice) -> None:
    call(device, p.ExtendPCR(17, b"a"))
    call(device, p.LockPCR(17))
    snapshot = device.state
    call(device, p.ExtendPCR(18, b"b"))
    clone = NsmDevice(state=snapshot)
    assert call(clone, p.DescribePCR(17)) == call(device, p.DescribePCR(17))
    assert call(clone, p.DescribePCR(18)) == p.DescribePCRResponse(False, bytes(48))
    assert call(clone, p.DescribeNSM()) == call(NsmDevice(state=snapshot), p.DescribeNSM())


def test_random_source_failure_is_internal_error() -> None:
    device = NsmDevice(random_bytes=lambda n: b"short")
    assert call(device, p.GetRandom()) == err(ErrorCode.InternalError)


# -- properties and fuzz targets (README "Fuzzing": NSM_FUZZ_EXAMPLES for a long run) ----------
#
# The invariant of every target: whatever the bytes, handle() answers with a
# well-formed CBOR item that the AWS client (facts §1) would accept, never
# longer than the response buffer; an error answer (or a buffer too small for
# the answer) leaves the state exactly as it was; a success changes only what
# the request may change.

FUZZ = fuzz_settings(300)


def _well_formed(response: bytes, room: int = p.MAX_RESPONSE_SIZE) -> p.Response | None:
    assert len(response) <= min(room, p.MAX_RESPONSE_SIZE)
    if response == b"":  # not even BufferTooSmall fits
        assert room < len(p.encode_error(ErrorCode.BufferTooSmall))
        return None
    return p.decode_response(response)  # raises unless the AWS client would accept it


def _changed_only_as_allowed(before: DeviceState, after: DeviceState, response: p.Response | None) -> None:
    if response is None or isinstance(response, p.ErrorResponse):
        assert after is before
        return
    if isinstance(response, p.ExtendPCRResponse):
        changed = [i for i, (a, b) in enumerate(zip(before.pcrs.values, after.pcrs.values, strict=True))
                   if a != b]
        assert len(changed) <= 1 and after.pcrs.locked == before.pcrs.locked
        assert not changed or response.data == after.pcrs.values[changed[0]]
    elif isinstance(response, p.LockPCRResponse | p.LockPCRsResponse):
        assert after.pcrs.values == before.pcrs.values
        assert after.pcrs.locked & before.pcrs.locked == before.pcrs.locked
    else:
        assert after is before
    assert after.module_id == before.module_id and after.version == before.version


SHARED_DEVICE = NsmDevice()
#: One CA for the devices the targets make per case (generating one per case is slow).
FUZZ_CA = SHARED_DEVICE.ca
FUZZ_STATE = DeviceState.at_boot("i-1-enc1")


@FUZZ
@given(st.binary(max_size=0x1100))
def test_any_bytes_give_a_well_formed_answer(data: bytes) -> None:
    before = SHARED_DEVICE.state
    response = _well_formed(SHARED_DEVICE.handle(data))
    _changed_only_as_allowed(before, SHARED_DEVICE.state, response)


_NAMES = ["DescribePCR", "ExtendPCR", "LockPCR", "LockPCRs", "Attestation", "GetRandom", "DescribeNSM"]
_FIELDS = ["index", "data", "range", "nonce", "user_data", "public_key"]
cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.binary(max_size=64)
    | st.text(max_size=16) | st.sampled_from([*_FIELDS, *_NAMES]) | st.floats()
    | st.sampled_from([cbor2.undefined, cbor2.CBORSimpleValue(99)]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from([*_FIELDS, "x"]) | st.text(max_size=8), children, max_size=4)
    | st.builds(cbor2.CBORTag, st.sampled_from([0, 2, 18, 24, 28, 29, 55799]) | st.integers(0, 2**64 - 1),
                children),
    max_leaves=12,
)
request_like = st.one_of(
    cbor_values,
    st.builds(lambda name, inner: {name: inner}, st.sampled_from(_NAMES),
              st.dictionaries(st.sampled_from(_FIELDS), cbor_values, max_size=4)),
)
#: Response buffers: mostly Linux's, sometimes too small for the answer.
rooms = st.one_of(st.just(p.MAX_RESPONSE_SIZE), st.integers(0, 120))


def _dumps(value: object) -> bytes | None:
    try:
        return cbor2.dumps(value)
    except (ValueError, TypeError, cbor2.CBOREncodeError):
        return None  # e.g. a tag cbor2 will not encode with that content


@FUZZ
@given(request_like, rooms)
def test_structured_requests_answer_well_formed_and_atomically(value: object, room: int) -> None:
    data = _dumps(value)
    assume(data is not None)
    assert data is not None
    device = NsmDevice(state=FUZZ_STATE, ca=FUZZ_CA)
    response = _well_formed(device.handle(data, max_response=room), room)
    _changed_only_as_allowed(FUZZ_STATE, device.state, response)


valid_requests = st.one_of(
    st.builds(p.DescribePCR, st.integers(0, 40)),
    st.builds(p.ExtendPCR, st.integers(0, 40), st.binary(max_size=64)),
    st.builds(p.LockPCR, st.integers(0, 40)),
    st.builds(p.LockPCRs, st.integers(0, 40)),
    st.builds(p.Attestation, st.none() | st.binary(max_size=32), st.none() | st.binary(max_size=32),
              st.none() | st.binary(max_size=32)),
    st.just(p.DescribeNSM()),
    st.just(p.GetRandom()),
)
#: Bytes worth splicing in: tags (shared references among them), breaks, long heads.
_SPLICES = [b"\xd8\x1c", b"\xd8\x1d\x00", b"\xd2", b"\xc2", b"\xff", b"\x9f", b"\xbf", b"\x5f",
            b"\x1b" + b"\xff" * 8, b"\x5b" + b"\xff" * 8, b"\xf7", b"\xf8\x20", b"\x81" * 70]
mutations = st.lists(
    st.tuples(st.sampled_from(["flip", "insert", "delete", "splice", "truncate"]),
              st.integers(0, 1 << 16), st.integers(1, 255), st.binary(max_size=8) | st.sampled_from(_SPLICES)),
    min_size=1, max_size=4,
)


def _mutate(data: bytes, edits: list[tuple[str, int, int, bytes]]) -> bytes:
    out = bytearray(data)
    for kind, position, value, chunk in edits:
        at = position % (len(out) + 1)
        if kind == "flip" and at < len(out):
            out[at] ^= value
        elif kind == "insert":
            out[at:at] = bytes([value])
        elif kind == "delete":
            del out[at:at + value % 8 + 1]
        elif kind == "splice":
            out[at:at] = chunk
        elif kind == "truncate":
            del out[at:]
    return bytes(out)


_DETERMINISTIC = (p.DescribePCR, p.ExtendPCR, p.LockPCR, p.LockPCRs, p.DescribeNSM)


@FUZZ
@given(valid_requests, mutations, rooms)
def test_mutated_requests_answer_well_formed_and_atomically(
    request_: p.Request, edits: list[tuple[str, int, int, bytes]], room: int
) -> None:
    data = _mutate(p.encode_request(request_), edits)
    device = NsmDevice(state=FUZZ_STATE, ca=FUZZ_CA)
    answer = device.handle(data, max_response=room)
    response = _well_formed(answer, room)
    _changed_only_as_allowed(FUZZ_STATE, device.state, response)
    try:
        decoded = p.decode_request(data)
    except p.RequestRejected as exc:
        assert answer in (p.encode_error(exc.code), p.encode_error(ErrorCode.BufferTooSmall), b"")
        return
    if isinstance(decoded, _DETERMINISTIC):
        # Whatever the encoding, the answer is that of the canonical request.
        reference = NsmDevice(state=FUZZ_STATE, ca=FUZZ_CA)
        assert answer == reference.handle(p.encode_request(decoded), max_response=room)
        assert device.state == reference.state


class DeviceModel(RuleBasedStateMachine):
    """The device against a plain model of 32 PCRs; locks never go away."""

    def __init__(self) -> None:
        super().__init__()
        self.device = NsmDevice(digest=Digest.SHA384)
        self.values = [self.device.state.pcrs.values[i] for i in range(32)]
        self.locked = set(range(16))

    @rule(index=st.integers(0, 40), data=st.binary(max_size=40))
    def extend(self, index: int, data: bytes) -> None:
        r = call(self.device, p.ExtendPCR(index, data))
        if index >= 32:
            assert r == err(ErrorCode.InvalidIndex)
        elif index in self.locked:
            assert r == err(ErrorCode.ReadOnlyIndex)
        else:
            self.values[index] = hashlib.sha384(self.values[index] + data).digest()
            assert r == p.ExtendPCRResponse(self.values[index])

    @rule(index=st.integers(0, 40))
    def lock(self, index: int) -> None:
        r = call(self.device, p.LockPCR(index))
        if index >= 32:
            assert r == err(ErrorCode.InvalidIndex)
        elif index in self.locked:
            assert r == err(ErrorCode.ReadOnlyIndex)
        else:
            self.locked.add(index)
            assert r == p.LockPCRResponse()

    @rule(count=st.integers(0, 40))
    def lock_range(self, count: int) -> None:
        r = call(self.device, p.LockPCRs(count))
        if count > 32:
            assert r == err(ErrorCode.InvalidIndex)
        else:
            self.locked |= set(range(count))
            assert r == p.LockPCRsResponse()

    @precondition(lambda self: True)
    @rule(data=st.binary(max_size=200))
    def junk(self, data: bytes) -> None:
        _well_formed(self.device.handle(data))

    @invariant()
    def matches_model(self) -> None:
        d = call(self.device, p.DescribeNSM())
        assert isinstance(d, p.DescribeNSMResponse)
        assert set(d.locked_pcrs) == self.locked
        assert list(self.device.state.pcrs.values) == self.values


TestDeviceModel = DeviceModel.TestCase
TestDeviceModel.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
