"""Wire format: golden vectors (facts §1) and the decoding rules of the real device (facts §2)."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_nsm import ErrorCode, NsmError
from virtio_nsm.nsm import protocol as p

# facts §1, verbatim
VECTORS = {
    "describe_pcr_0": "a16b4465736372696265504352a165696e64657800",
    "extend_pcr_16": "a169457874656e64504352a265696e64657810646461746143010203",
    "lock_pcrs_32": "a1684c6f636b50435273a16572616e67651820",
    "error_invalid_index": "a1654572726f726c496e76616c6964496e646578",
    "describe_pcr_resp": "a16b4465736372696265504352a2646c6f636bf564646174614400000000",
}


def test_request_vectors() -> None:
    assert p.encode_request(p.DescribePCR(0)).hex() == VECTORS["describe_pcr_0"]
    assert p.encode_request(p.ExtendPCR(16, b"\x01\x02\x03")).hex() == VECTORS["extend_pcr_16"]
    assert p.encode_request(p.LockPCRs(32)).hex() == VECTORS["lock_pcrs_32"]
    assert p.encode_request(p.GetRandom()).hex() == "6947657452616e646f6d"


def test_response_vectors() -> None:
    assert p.encode_error(ErrorCode.InvalidIndex).hex() == VECTORS["error_invalid_index"]
    assert p.encode_response(p.DescribePCRResponse(True, bytes(4))).hex() == VECTORS["describe_pcr_resp"]
    random = bytes(range(256))
    encoded = p.encode_response(p.GetRandomResponse(random))
    assert encoded == bytes.fromhex("a16947657452616e646f6da16672616e646f6d590100") + random


# Every message against an independent encoder (cbor2: shortest heads,
# definite lengths, insertion order -- the serde_cbor shape).
REQUESTS = [
    (p.DescribePCR(300), {"DescribePCR": {"index": 300}}),
    (p.ExtendPCR(65535, b"x" * 300), {"ExtendPCR": {"index": 65535, "data": b"x" * 300}}),
    (p.LockPCR(17), {"LockPCR": {"index": 17}}),
    (p.LockPCRs(0), {"LockPCRs": {"range": 0}}),
    (p.DescribeNSM(), "DescribeNSM"),
    (p.GetRandom(), "GetRandom"),
    (p.Attestation(), {"Attestation": {"user_data": None, "nonce": None, "public_key": None}}),
    (p.Attestation(b"u", b"n" * 24, b"k" * 70000),
     {"Attestation": {"user_data": b"u", "nonce": b"n" * 24, "public_key": b"k" * 70000}}),
]


@pytest.mark.parametrize(("request_", "value"), REQUESTS)
def test_request_encoding_matches_serde_shape(request_: p.Request, value: object) -> None:
    encoded = p.encode_request(request_)
    assert encoded == cbor2.dumps(value)
    if len(encoded) <= p.MAX_REQUEST_SIZE:
        assert p.decode_request(encoded) == request_


RESPONSES = [
    (p.DescribePCRResponse(False, b"\x11" * 48), {"DescribePCR": {"lock": False, "data": b"\x11" * 48}}),
    (p.ExtendPCRResponse(b"\x22" * 48), {"ExtendPCR": {"data": b"\x22" * 48}}),
    (p.LockPCRResponse(), "LockPCR"),
    (p.LockPCRsResponse(), "LockPCRs"),
    (p.DescribeNSMResponse(1, 0, 0, "i-0123456789abcdef0-enc0123456789abcdef", 32, (0, 1, 15, 31), "SHA384"),
     {"DescribeNSM": {"version_major": 1, "version_minor": 0, "version_patch": 0,
                      "module_id": "i-0123456789abcdef0-enc0123456789abcdef", "max_pcrs": 32,
                      "locked_pcrs": [0, 1, 15, 31], "digest": "SHA384"}}),
    (p.AttestationResponse(b"d" * 5000), {"Attestation": {"document": b"d" * 5000}}),
    (p.GetRandomResponse(b"r" * 256), {"GetRandom": {"random": b"r" * 256}}),
] + [(p.ErrorResponse(code), {"Error": code.name}) for code in ErrorCode if code is not ErrorCode.Success]


@pytest.mark.parametrize(("response", "value"), RESPONSES)
def test_response_encoding_matches_serde_shape(response: p.Response, value: object) -> None:
    encoded = p.encode_response(response)
    assert encoded == cbor2.dumps(value)
    assert p.decode_response(encoded) == response


def test_error_codes_numbering() -> None:
    assert [c.name for c in ErrorCode] == [
        "Success", "InvalidArgument", "InvalidIndex", "InvalidResponse", "ReadOnlyIndex",
        "InvalidOperation", "BufferTooSmall", "InputTooLarge", "InternalError"]
    assert [c.value for c in ErrorCode] == list(range(9))


# -- request decoding rules ---------------------------------------------------

def enc(value: object) -> bytes:
    return cbor2.dumps(value)


INVALID_OPERATION = [
    b"",
    b"\xff",
    b"\xa1",  # truncated
    enc("describeNSM"),
    enc("Error"),
    enc(5),
    enc(None),
    enc(["DescribeNSM"]),
    enc({"DescribePCR": {"index": 0}, "GetRandom": None}),  # two entries, one valid
    enc({"DescribeNSM": None}),  # unit variants are bare text
    enc({"Unknown": {"index": 0}}),
    enc({"DescribePCR": {}}),
    enc({"DescribePCR": {"idx": 1}}),
    enc({"DescribePCR": {"index": "0"}}),
    enc({"DescribePCR": {"index": None}}),
    enc({"DescribePCR": {"index": b"\x00"}}),
    enc({"DescribePCR": {"index": True}}),
    enc({"DescribePCR": {"index": 1.0}}),
    enc({"DescribePCR": {"index": -1}}),
    enc({"DescribePCR": {"index": 65536}}),
    enc({"DescribePCR": {"index": 2**32}}),
    enc({"DescribePCR": {"index": 2**64 - 1}}),
    enc({"DescribePCR": 0}),
    enc({"DescribePCR": None}),
    enc({"ExtendPCR": {"index": 16}}),
    enc({"ExtendPCR": {"index": 16, "data": None}}),
    enc({"ExtendPCR": {"index": 16, "data": 7}}),
    enc({"ExtendPCR": {"data": b""}}),
    enc({"LockPCR": {"index": -5}}),
    enc({"LockPCRs": {"index": 3}}),
    enc({"LockPCRs": {"range": "32"}}),
    enc({"Attestation": None}),
    enc({"Attestation": 5}),
    enc({"Attestation": [b"", b"", b""]}),
    enc({"Attestation": {"nonce": 5}}),
    enc({"Attestation": {"user_data": {"a": 1}}}),
    enc({"Attestation": {"public_key": [1, 2]}}),
    enc({"Attestation": {"nonce": False}}),
    enc("GetRandom") + b"\x00",  # trailing byte
    enc({"DescribePCR": {"index": 0}}) + b"\xf6",
    bytes.fromhex("a16b4465736372696265504352a265696e6465780165696e64657802"),  # duplicate field
    bytes.fromhex("a16b4465736372696265504352a165696e646578c24105"),  # bignum tag around 5
    bytes.fromhex("d9d9f76b44657363726962654e534d"),  # self-describe tag
    bytes.fromhex("a16b4465736372696265504352a165696e64657861ff"),  # invalid UTF-8 in value? (text 0xff)
]


@pytest.mark.parametrize("data", INVALID_OPERATION, ids=lambda d: d.hex()[:40] or "empty")
def test_invalid_operation(data: bytes) -> None:
    with pytest.raises(p.RequestRejected) as info:
        p.decode_request(data)
    assert info.value.code is ErrorCode.InvalidOperation


ACCEPTED = [
    (enc({"DescribePCR": {"index": 1, "extra": [1, 2], "other": None}}), p.DescribePCR(1)),
    (enc({"DescribePCR": {"index": 65535}}), p.DescribePCR(65535)),  # range check is the device's
    (bytes.fromhex("a16b4465736372696265504352a165696e6465781a00000005"), p.DescribePCR(5)),  # long head
    (bytes.fromhex("bf6b4465736372696265504352bf65696e64657803ffff"), p.DescribePCR(3)),  # indefinite
    (enc({"ExtendPCR": {"data": b"\x01", "index": 17}}), p.ExtendPCR(17, b"\x01")),  # any order
    (enc({"ExtendPCR": {"index": 17, "data": "héllo"}}), p.ExtendPCR(17, "héllo".encode())),
    (enc({"ExtendPCR": {"index": 17, "data": b""}}), p.ExtendPCR(17, b"")),
    (enc({"Attestation": {}}), p.Attestation()),
    (enc({"Attestation": {"nonce": None, "user_data": b"", "public_key": "pk"}}),
     p.Attestation(user_data=b"", nonce=None, public_key=b"pk")),
    (enc({"Attestation": {"nonce": b"n", "unknown": 5}}), p.Attestation(nonce=b"n")),
    (enc({"LockPCRs": {"range": 0}}), p.LockPCRs(0)),
]


@pytest.mark.parametrize(("data", "expected"), ACCEPTED, ids=lambda v: v.hex()[:40] if isinstance(v, bytes) else "")
def test_accepted(data: bytes, expected: p.Request) -> None:
    assert p.decode_request(data) == expected


def test_request_size_limit() -> None:
    with pytest.raises(p.RequestRejected) as info:
        p.decode_request(b"\x00" * (p.MAX_REQUEST_SIZE + 1))
    assert info.value.code is ErrorCode.InputTooLarge
    # exactly at the limit is fine
    head = p.encode_request(p.Attestation(public_key=b""))
    pad = p.MAX_REQUEST_SIZE - len(head) - 2  # the bstr head grows from 1 to 3 bytes
    exact = p.encode_request(p.Attestation(public_key=b"k" * pad))
    assert len(exact) == p.MAX_REQUEST_SIZE
    assert p.decode_request(exact) == p.Attestation(public_key=b"k" * pad)


def test_fast_path_agrees_with_general_decoder() -> None:
    for index in range(0, 300):
        data = p.encode_request(p.DescribePCR(index))
        assert p.decode_request(data) == p.DescribePCR(index)
    # a non-shortest head must not be misread by the fast path
    assert p.decode_request(bytes.fromhex("a16b4465736372696265504352a165696e6465781805")) == p.DescribePCR(5)


# -- response decoding: the AWS client's rules ----------------------------------

def test_response_any_field_order_and_unknown_fields() -> None:
    data = enc({"DescribePCR": {"data": b"\x00" * 48, "new": 1, "lock": False}})
    assert p.decode_response(data) == p.DescribePCRResponse(False, bytes(48))


def test_response_indefinite_inner_map() -> None:
    data = b"\xa1" + enc("ExtendPCR") + b"\xbf" + enc("data") + enc(b"\x01") + b"\xff"
    assert p.decode_response(data) == p.ExtendPCRResponse(b"\x01")


@pytest.mark.parametrize("data", [
    b"",
    b"\xbf" + enc("LockPCR") + enc(None) + b"\xff",  # indefinite outer map
    b"\xa2" + enc("Error") + enc("InvalidIndex") + enc("x") + enc(1),
    enc({"Error": "InvalidIndex"}) + b"\x00",  # trailing byte
    enc({"Error": "NoSuchError"}),
    enc({"Error": "Success"}),
    enc("Unknown"),
    enc({"Teapot": {}}),
    enc({"DescribeNSM": {"version_major": 1, "version_minor": 0, "version_patch": 0, "module_id": "m",
                         "max_pcrs": 32, "locked_pcrs": [], "digest": "MD5"}}),
    enc({"DescribePCR": {"data": b""}}),
    enc({"GetRandom": {"random": "text"}}),
])
def test_response_rejected(data: bytes) -> None:
    with pytest.raises(NsmError) as info:
        p.decode_response(data)
    assert info.value.code is ErrorCode.InvalidResponse


def _general(data: bytes) -> tuple[int, bytes] | None:
    """What the general decoder reads from ``data`` if it is an ExtendPCR."""
    try:
        item = p.load_exact(data)
    except ValueError:
        return None
    if not (isinstance(item, dict) and list(item) == ["ExtendPCR"] and isinstance(item["ExtendPCR"], dict)):
        return None
    fields = item["ExtendPCR"]
    return fields.get("index"), fields.get("data")


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 0xFFFF), st.binary(max_size=300), st.integers(-4, 4), st.binary(max_size=3))
def test_extend_fast_path_agrees_with_general_decoder(index: int, data: bytes, cut: int, tail: bytes) -> None:
    canonical = p.encode_request(p.ExtendPCR(index, data))
    assert p.canonical_extend(canonical) == (index, data) == _general(canonical)
    assert p.decode_request(canonical) == p.ExtendPCR(index, data)
    # Shortened or lengthened bytes: the fast path reads them as the decoder does, or declines.
    for variant in (canonical[:len(canonical) + cut] if cut < 0 else canonical, canonical + tail):
        fast = p.canonical_extend(variant)
        assert fast is None or fast == _general(variant)


def test_extend_fast_path_declines_other_shapes() -> None:
    wide_index = bytes.fromhex("a169457874656e64504352a265696e6465781a00000010646461746141ff")
    assert p.canonical_extend(wide_index) is None and p.decode_request(wide_index) == p.ExtendPCR(16, b"\xff")
    data_first = enc({"ExtendPCR": {"data": b"\x01", "index": 17}})
    assert p.canonical_extend(data_first) is None
    text_data = enc({"ExtendPCR": {"index": 17, "data": "t"}})
    assert p.canonical_extend(text_data) is None and p.decode_request(text_data) == p.ExtendPCR(17, b"t")
    assert p.canonical_extend(enc({"DescribePCR": {"index": 1}})) is None
