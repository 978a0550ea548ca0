"""COSE structure and payload syntax: each rule, on correctly signed documents."""

from __future__ import annotations

from typing import Any

import pytest
from verify_support import T0, Pki, encode_payload, payload_fields, sign

from virtio_nsm import cbor, cose
from virtio_nsm.verify import VerificationError, parse_unverified, verify_document

_MISSING = object()


def signed(pki: Pki, **changes: Any) -> bytes:
    fields = payload_fields(pki)
    for name, value in changes.items():
        if value is _MISSING:
            del fields[name]
        else:
            fields[name] = value
    return sign(pki.leaf_key, encode_payload(fields))


def reasons_of(doc: bytes, pki: Pki) -> list[str]:
    with pytest.raises(VerificationError) as info:
        verify_document(doc, roots=[pki.root], at=T0)
    return info.value.reasons


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"module_id": ""}, "module_id is empty"),
        ({"module_id": b"i-0"}, "module_id is a byte string, not text"),
        ({"module_id": _MISSING}, "payload has no module_id"),
        ({"digest": "SHA1"}, "digest is 'SHA1', not one of SHA256, SHA384, SHA512"),
        ({"digest": 384}, "digest is an integer, not one of SHA256, SHA384, SHA512"),
        ({"digest": "SHA256"}, "PCR0 is 48 bytes but digest SHA256 gives 32"),
        ({"timestamp": 0}, "timestamp is 0"),
        ({"timestamp": -5}, "timestamp is an integer, not an unsigned integer"),
        ({"timestamp": True}, "timestamp is a bool, not an unsigned integer"),
        ({"timestamp": "1725719859545"}, "timestamp is a text string, not an unsigned integer"),
        ({"timestamp": None}, "timestamp is null"),
        ({"pcrs": {}}, "pcrs has 0 entries, must have 1 to 32"),
        ({"pcrs": {i: bytes(48) for i in range(33)}}, "pcrs has 33 entries, must have 1 to 32"),
        ({"pcrs": {32: bytes(48)}}, "pcrs has an invalid index 32"),
        ({"pcrs": {-1: bytes(48)}}, "pcrs has an invalid index -1"),
        ({"pcrs": {"0": bytes(48)}}, "pcrs has an invalid index '0'"),
        ({"pcrs": {0: bytes(47)}}, "PCR0 is 47 bytes, not 32, 48 or 64"),
        ({"pcrs": {0: "00" * 48}}, "PCR0 is a text string, not bytes"),
        ({"pcrs": [bytes(48)]}, "pcrs is an array, not a map"),
        ({"certificate": b""}, "certificate is 0 bytes, must be 1 to 1024"),
        ({"certificate": b"\x30" * 1025}, "certificate is 1025 bytes, must be 1 to 1024"),
        ({"certificate": b"\x30\x03abc"}, "certificate is not a DER X.509 certificate"),
        ({"certificate": [b"x"]}, "certificate is an array, not bytes"),
        ({"cabundle": []}, "cabundle has 0 entries, must have 1 to 16"),
        ({"cabundle": None}, "cabundle is null"),
        ({"cabundle": b"x"}, "cabundle is a byte string, not an array"),
        ({"cabundle": [b""]}, "cabundle[0] is 0 bytes, must be 1 to 1024"),
        ({"cabundle": ["abc"]}, "cabundle[0] is a text string, not bytes"),
        ({"cabundle": [b"\x01" * 10] * 17}, "cabundle has 17 entries, must have 1 to 16"),
        ({"public_key": "pem"}, "public_key is a text string, not bytes or null"),
        ({"user_data": 5}, "user_data is an integer, not bytes or null"),
        ({"nonce": [b""]}, "nonce is an array, not bytes or null"),
    ],
)
def test_payload_field_rules(pki: Pki, changes: dict[str, Any], expected: str) -> None:
    reasons = reasons_of(signed(pki, **changes), pki)
    assert any(r.startswith(expected) for r in reasons), reasons


def test_every_problem_is_listed(pki: Pki) -> None:
    doc = signed(pki, module_id="", digest="MD5", timestamp=0, nonce=7)
    reasons = reasons_of(doc, pki)
    for expected in ("module_id is empty", "digest is 'MD5'", "timestamp is 0", "nonce is a"):
        assert any(r.startswith(expected) for r in reasons), reasons


def test_optional_fields_absent_or_null(pki: Pki) -> None:
    for value in (None, _MISSING):
        doc = signed(pki, public_key=value, user_data=value, nonce=value)
        result = verify_document(doc, roots=[pki.root], at=T0)
        assert (result.public_key, result.user_data, result.nonce) == (None, None, None)


def test_empty_and_large_optional_fields(pki: Pki) -> None:
    doc = signed(pki, public_key=b"", user_data=b"u" * 4000, nonce=b"\x00")
    result = verify_document(doc, roots=[pki.root], at=T0)
    assert result.public_key == b""
    assert result.user_data == b"u" * 4000
    assert result.nonce == b"\x00"


def test_any_key_order_and_unknown_fields(pki: Pki) -> None:
    fields = payload_fields(pki, nonce=b"n")
    shuffled = dict(reversed(list(fields.items())))
    shuffled["future_field"] = [1, "two", {"three": 3.0}]
    for indefinite in (False, True):
        doc = sign(pki.leaf_key, encode_payload(shuffled, indefinite=indefinite))
        assert verify_document(doc, roots=[pki.root], at=T0).nonce == b"n"


def test_pcrs_are_returned_sorted_and_read_only(pki: Pki) -> None:
    doc = signed(pki, pcrs={16: b"\x10" * 48, 3: b"\x03" * 48})
    result = verify_document(doc, roots=[pki.root], at=T0)
    assert list(result.pcrs) == [3, 16]
    with pytest.raises(TypeError):
        result.pcrs[3] = bytes(48)  # type: ignore[index]


def _raw_payload_doc(pki: Pki, replace: tuple[bytes, bytes]) -> bytes:
    payload = encode_payload(payload_fields(pki))
    assert payload.count(replace[0]) == 1
    return sign(pki.leaf_key, payload.replace(*replace))


def test_duplicate_key_is_rejected(pki: Pki) -> None:
    payload = encode_payload(payload_fields(pki))
    # Nine entries become ten with a second "digest".
    assert payload[0] == 0xA9
    dup = b"\xaa" + payload[1:] + cbor.tstr("digest") + cbor.tstr("SHA512")
    reasons = reasons_of(sign(pki.leaf_key, dup), pki)
    assert any("duplicate map key 'digest'" in r for r in reasons), reasons


def test_tag_inside_payload_is_rejected(pki: Pki) -> None:
    ts = payload_fields(pki)["timestamp"]
    old = cbor.tstr("timestamp") + cbor.uint(ts)
    new = cbor.tstr("timestamp") + b"\xc2" + cbor.bstr(ts.to_bytes(8, "big"))  # bignum tag
    reasons = reasons_of(_raw_payload_doc(pki, (old, new)), pki)
    assert any("CBOR tag 2 is not allowed" in r for r in reasons), reasons


def test_true_is_not_pcr_1(pki: Pki) -> None:
    old = cbor.uint(1) + cbor.bstr(b"\x01" * 48)
    reasons = reasons_of(_raw_payload_doc(pki, (old, b"\xf5" + cbor.bstr(b"\x01" * 48))), pki)
    assert any("pcrs has an invalid index True" in r for r in reasons), reasons


def test_trailing_bytes_in_payload(pki: Pki) -> None:
    payload = encode_payload(payload_fields(pki)) + b"\x00"
    reasons = reasons_of(sign(pki.leaf_key, payload), pki)
    assert any("1 trailing bytes after the item" in r for r in reasons), reasons


def test_payload_not_a_map(pki: Pki) -> None:
    reasons = reasons_of(sign(pki.leaf_key, cbor.array_head(0)), pki)
    assert reasons == ["payload is an array, not a map"]


@pytest.mark.parametrize(
    "protected",
    [
        b"",
        b"\xa0",
        b"\xa1\x01\x26",  # ES256
        b"\xa1\x01\x38\x23",  # ES512
        b"\xa1\x01\x39\x00\x22",  # ES384, non-shortest integer
        b"\xa2\x01\x38\x22\x04\x41\x00",  # ES384 plus a kid
        b"\xbf\x01\x38\x22\xff",
    ],
)
def test_protected_header_must_be_exactly_es384(pki: Pki, protected: bytes) -> None:
    doc = sign(pki.leaf_key, encode_payload(payload_fields(pki)), protected=protected)
    reasons = reasons_of(doc, pki)
    assert any(r.startswith("protected header must be exactly {1: -35}") for r in reasons)


def test_cose_structure_problems(pki: Pki) -> None:
    payload = encode_payload(payload_fields(pki))
    good = sign(pki.leaf_key, payload)
    sign1 = cose.decode_sign1(good)
    short_sig = cose.encode_sign1(sign1.protected, sign1.payload, sign1.signature[:95])
    assert "signature is 95 bytes, ES384 needs 96" in reasons_of(short_sig, pki)
    assert reasons_of(good + b"\x00", pki) == ["not a COSE_Sign1: 1 trailing bytes after the COSE_Sign1"]
    three = cbor.array_head(3) + cbor.bstr(sign1.protected) + b"\xa0" + cbor.bstr(payload)
    assert reasons_of(three, pki) == ["not a COSE_Sign1: a COSE_Sign1 is an array of 4 elements"]
    nested = (
        cbor.array_head(4)
        + cbor.bstr(sign1.protected)
        + b"\xa0"
        + cbor.tstr("x")
        + cbor.bstr(sign1.signature)
    )
    assert any("payload is not a byte string" in r for r in reasons_of(nested, pki))
    assert reasons_of(b"", pki)[0].startswith("not a COSE_Sign1: not valid CBOR")


def test_non_empty_unprotected_header_is_ignored(pki: Pki) -> None:
    payload = encode_payload(payload_fields(pki))
    sign1 = cose.decode_sign1(sign(pki.leaf_key, payload))
    doc = (
        cbor.array_head(4)
        + cbor.bstr(sign1.protected)
        + b"\xa1\x04\x41\x00"
        + cbor.bstr(payload)
        + cbor.bstr(sign1.signature)
    )
    verify_document(doc, roots=[pki.root], at=T0)


def test_parse_unverified_never_raises_and_reports(pki: Pki) -> None:
    unverified = parse_unverified(b"\xff\x00")
    assert unverified.problems and unverified.module_id is None
    good = parse_unverified(signed(pki, nonce=b"abc"))
    assert good.problems == ()
    assert good.nonce == b"abc" and good.leaf is not None and len(good.bundle) == 4


def test_verified_document_is_frozen(pki: Pki) -> None:
    import dataclasses

    result = verify_document(signed(pki), roots=[pki.root], at=T0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.nonce = b"x"  # type: ignore[misc]


def test_unsigned_framing_may_vary(pki: Pki) -> None:
    # Documented: tag 18, unprotected contents and outer head widths are not signed.
    payload = encode_payload(payload_fields(pki))
    sign1 = cose.decode_sign1(sign(pki.leaf_key, payload))
    wide = (
        b"\x98\x04"  # array(4) with a 1-byte length
        + b"\x58\x04"
        + sign1.protected
        + b"\xa0"
        + b"\x5a"
        + len(payload).to_bytes(4, "big")
        + payload
        + b"\x58\x60"
        + sign1.signature
    )
    verify_document(wide, roots=[pki.root], at=T0)
