"""Untrusted CBOR is decoded in linear time, without tag semantics (issue 11, D1).

CBOR shared references (tag 28 marks a value shareable, tag 29 refers back to
it) let ~300 bytes describe a structure that doubles per level. The device, the
client and the verifier decode with :mod:`virtio_nsm._strict_cbor`, which
refuses every tag where none belongs, never builds more items than it reads
bytes, and never renders a decoded value in full in an error message.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_nsm import NsmDevice, _strict_cbor, cose
from virtio_nsm.errors import ErrorCode, NsmError
from virtio_nsm.nsm import protocol as p
from virtio_nsm.verify import VerificationError, parse_unverified, verify_document

INVALID_OPERATION = bytes.fromhex("a1654572726f727049" + "6e76616c69644f7065726174696f6e")


def shared_key(depth: int) -> bytes:
    """``[28(h'78'), 28([29(0), 29(0)]), 28([29(1), 29(1)]), ...]``, ``depth`` elements.

    With shared-reference semantics element ``i`` is a tree of ``2**i`` leaves.
    """
    items = [b"\xd8\x1c\x41\x78"]
    for i in range(depth - 1):
        ref = b"\xd8\x1d" + cbor2.dumps(i)
        items.append(b"\xd8\x1c\x82" + ref + ref)
    return cbor2.dumps([0] * depth)[: -depth] + b"".join(items)


def shared_request(depth: int = 30) -> bytes:
    return b"\xa1" + shared_key(depth) + b"\xa0"


def shared_document(depth: int = 30) -> bytes:
    # A COSE_Sign1 whose unprotected header has the key.
    return b"\x84\x44\xa1\x01\x38\x22" + b"\xa1" + shared_key(depth) + b"\x00" + b"\x40" + bytes(97)


def test_reproducer_shapes() -> None:
    # The campaign's reproducers: a ~300-byte request and a ~500-byte document.
    assert len(shared_request(30)) < 300
    key = cbor2.loads(shared_key(5))  # cbor2 gives the tags their meaning: element i has 2**i leaves
    assert key[2] == [[b"x", b"x"], [b"x", b"x"]]
    assert key[4][0] is key[4][1] and key[4][0] is key[3]


def test_request_with_shared_references_is_invalid_operation() -> None:
    data = shared_request(30)
    with pytest.raises(p.RequestRejected) as info:
        p.decode_request(data)
    assert info.value.code is ErrorCode.InvalidOperation
    # Refused at the first tag (byte 3): nothing after it was decoded or expanded.
    assert "CBOR tag 28 is not allowed here (at byte 3)" in info.value.reason
    assert NsmDevice().handle(data) == INVALID_OPERATION


def test_shared_references_in_an_ignored_inner_field_are_refused() -> None:
    inner = b"\xa2\x65index\x10\x61x" + shared_key(30)
    data = b"\xa1\x6bDescribePCR" + inner
    assert NsmDevice().handle(data) == INVALID_OPERATION


def test_document_with_shared_references_in_unprotected_header() -> None:
    doc = shared_document(30)
    with pytest.raises(VerificationError) as info:
        verify_document(doc)
    assert info.value.reasons == ["not a COSE_Sign1: not valid CBOR: "
                                  "CBOR tag 28 is not allowed here (at byte 9)"]
    with pytest.raises(cose.CoseError):
        cose.decode_sign1(doc)
    assert parse_unverified(doc).problems


def test_client_refuses_a_response_with_shared_references() -> None:
    with pytest.raises(NsmError) as info:
        p.decode_response(b"\xa1\x69ExtendPCR\xa1\x61x" + shared_key(30))
    assert info.value.code is ErrorCode.InvalidResponse


def test_reproducers_answer_promptly_in_a_fresh_process() -> None:
    # Before the fix the request took ~45 s (it doubles per level: depth 30 is
    # minutes on a loaded machine) and the document more than 15 s. The timeout
    # is generous: the decode now stops at byte 3.
    script = textwrap.dedent(f"""
        from virtio_nsm import NsmDevice
        from virtio_nsm.verify import VerificationError, verify_document
        print(NsmDevice().handle(bytes.fromhex({shared_request(30).hex()!r})).hex())
        try:
            verify_document(bytes.fromhex({shared_document(30).hex()!r}))
        except VerificationError as exc:
            print(exc.reasons[0])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True).stdout.splitlines()
    assert out == [INVALID_OPERATION.hex(),
                   "not a COSE_Sign1: not valid CBOR: CBOR tag 28 is not allowed here (at byte 9)"]


# -- error messages never render attacker structures in full -----------------------

@pytest.mark.parametrize("data", [
    cbor2.dumps({"A" * 3000: {}}),  # unknown name
    cbor2.dumps("B" * 3000),  # unknown unit name
    b"\xa2" + cbor2.dumps("C" * 2000) + b"\x00" + cbor2.dumps("C" * 2000) + b"\x00",  # duplicate key
    cbor2.dumps({"Error": "D" * 3000}),
])
def test_error_messages_are_short(data: bytes) -> None:
    for decode in (p.decode_request, p.decode_response):
        try:
            decode(data)
        except (p.RequestRejected, NsmError) as exc:
            assert len(str(exc)) < 200, str(exc)


def test_verifier_messages_are_short() -> None:
    payload = cbor2.dumps({"digest": "S" * 5000, "pcrs": {"k" * 5000: b""}})
    doc = b"\x84\x44\xa1\x01\x38\x22\xa0" + cbor2.dumps(payload) + b"\x40"
    reasons = parse_unverified(doc).problems
    assert reasons and all(len(r) < 200 for r in reasons), reasons


def test_shown_caps_every_kind_of_value() -> None:
    assert _strict_cbor.shown("x" * 1000) == repr("x" * 40) + "…"
    assert _strict_cbor.shown(b"y" * 1000) == repr(b"y" * 40) + "…"
    assert _strict_cbor.shown([[1]] * 10**6) == "<list of 1000000>"
    assert _strict_cbor.shown(2**200).endswith("…")
    assert _strict_cbor.shown(5) == "5"


# -- the reader's bounds -----------------------------------------------------------

@pytest.mark.parametrize("data", [
    b"\x9b" + b"\xff" * 8,  # array of 2**64-1 elements
    b"\xbb" + b"\xff" * 8,  # map of 2**64-1 entries
    b"\x5b" + b"\xff" * 8,  # byte string of 2**64-1 bytes
    b"\x7a\x7f\xff\xff\xff",  # text string of 2 GB
    b"\x5f\x5b" + b"\xff" * 8 + b"\xff",  # same as a chunk
    b"\x81" * 100 + b"\x00",  # nesting beyond the limit
    b"\x9f" * 100 + b"\xff" * 100,
])
def test_lengths_and_depth_are_bounded_by_the_input(data: bytes) -> None:
    with pytest.raises(_strict_cbor.StrictCborError):
        _strict_cbor.loads(data, max_depth=64)


@settings(max_examples=200, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.binary(max_size=20)
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=30,
))
def test_never_more_items_than_bytes(value: object) -> None:
    data = cbor2.dumps(value)
    decoded, tag, items = _strict_cbor.decode(data, max_depth=64)
    assert decoded == value and tag is None
    assert items <= len(data)


def test_only_the_allowed_outer_tag() -> None:
    assert _strict_cbor.decode(b"\xd2\x80", tags=frozenset({18}))[:2] == ([], 18)
    for data in (b"\xd2\xd2\x80", b"\xd3\x80", b"\x81\xd2\x80", b"\xdf\x80"):
        with pytest.raises(_strict_cbor.StrictCborError):
            _strict_cbor.decode(data, tags=frozenset({18}))


def test_simple_values_only_where_allowed() -> None:
    # serde_cbor skips undefined in an ignored field; the device did before and still does.
    data = b"\xa1\x6bDescribePCR\xa2\x65index\x01\x61x\xf7"
    assert p.decode_request(data) == p.DescribePCR(1)
    with pytest.raises(p.RequestRejected):  # but no field takes it
        p.decode_request(b"\xa1\x6bAttestation\xa1\x65nonce\xf7")
    with pytest.raises(_strict_cbor.StrictCborError):
        _strict_cbor.loads(b"\xf7")
    assert _strict_cbor.loads(b"\xf8\x20", allow_simple=True) == _strict_cbor.Simple(32)
    with pytest.raises(_strict_cbor.StrictCborError):
        _strict_cbor.loads(b"\xf8\x10", allow_simple=True)
