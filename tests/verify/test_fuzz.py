"""Fuzzing: whatever the bytes, the verifier answers with a verdict, never a crash.

One invariant throughout: ``verify_document`` returns a VerifiedDocument or
raises VerificationError, and no reason is the fail-closed "internal error".
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import fuzz_settings
from verify_support import T0, Pki, encode_payload, make_pki, payload_fields, sign

from virtio_nsm import _strict_cbor
from virtio_nsm.verify import VerificationError, VerifiedDocument, parse_unverified, verify_document

PKI: Pki = make_pki()
FIELDS = payload_fields(PKI, nonce=b"nonce", user_data=b"user")
VALID = sign(PKI.leaf_key, encode_payload(FIELDS))

#: NSM_FUZZ_EXAMPLES (README, "Fuzzing") sets the cases of every target for a long run;
#: VERIFY_FUZZ_EXAMPLES, the older name, still works for this module.
FUZZ = fuzz_settings(int(os.environ.get("VERIFY_FUZZ_EXAMPLES", "300")))


def verdict(doc: bytes, **kwargs: Any) -> VerifiedDocument | VerificationError:
    try:
        return verify_document(doc, roots=[PKI.root], at=T0, **kwargs)
    except VerificationError as exc:
        assert exc.reasons
        assert not any("internal error" in r for r in exc.reasons), exc.reasons
        return exc


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes(data: bytes) -> None:
    assert isinstance(verdict(data), VerificationError)
    parse_unverified(data)


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_behind_cose_prefix(data: bytes) -> None:
    # Get past the outer array and protected header so the payload decoder is hit.
    prefix = b"\x84\x44\xa1\x01\x38\x22\xa0"
    assert isinstance(verdict(prefix + data), VerificationError)


@FUZZ
@given(
    st.integers(0, len(VALID)),
    st.integers(0, 64),
    st.binary(max_size=64),
)
def test_splices_of_valid_document(start: int, length: int, insert: bytes) -> None:
    mutated = VALID[:start] + insert + VALID[start + length :]
    result = verdict(mutated)
    if mutated not in (VALID, b"\xd2" + VALID):  # adding tag 18 is the one harmless edit
        assert isinstance(result, VerificationError)


#: Where a document's untrusted CBOR starts: the unprotected header and the payload.
_UNPROTECTED_AT = VALID.index(b"\xa0", 6)
_SHARED = [b"\xd8\x1c", b"\xd8\x1d\x00", b"\xd8\x1d\x01", b"\xd2", b"\xd9\xd9\xf7", b"\xc0",
           b"\x82\xd8\x1c\x41\x78\xd8\x1d\x00", b"\x9f", b"\xff"]


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID)), st.sampled_from(_SHARED)), min_size=1, max_size=6),
       st.booleans())
def test_tags_spliced_anywhere_are_refused(splices: list[tuple[int, bytes]], in_header: bool) -> None:
    # Tags (shared references 28/29 among them) anywhere but a leading 18: a verdict,
    # never a crash, and never a valid document.
    mutated = bytearray(VALID)
    for at, chunk in sorted(splices, reverse=True):
        at = _UNPROTECTED_AT + at % 2 if in_header else at
        mutated[at:at] = chunk
    result = verdict(bytes(mutated))
    if bytes(mutated) not in (VALID, b"\xd2" + VALID):
        assert isinstance(result, VerificationError)


cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.binary(max_size=80)
    | st.text(max_size=20)
    | st.floats(allow_nan=False),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.integers(-2, 40) | st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@FUZZ
@given(
    st.dictionaries(st.sampled_from([*FIELDS, "extra"]), cbor_values, max_size=4),
    st.sets(st.sampled_from(list(FIELDS)), max_size=3),
    st.booleans(),
)
def test_signed_payloads_with_random_fields(
    overrides: dict[str, Any], removed: set[str], indefinite: bool
) -> None:
    # The signature is valid, so every field check is exercised for real.
    fields = {**FIELDS, **overrides}
    for name in removed:
        fields.pop(name, None)
    payload = cbor2.dumps(fields)
    if indefinite:
        payload = b"\xbf" + b"".join(cbor2.dumps(k) + cbor2.dumps(v) for k, v in fields.items())
        payload += b"\xff"
    result = verdict(sign(PKI.leaf_key, payload))
    if isinstance(result, VerifiedDocument):
        assert result.module_id == fields["module_id"]
        assert result.timestamp == fields["timestamp"]


@FUZZ
@given(cbor_values)
def test_strict_decoder_agrees_with_cbor2(value: Any) -> None:
    encoded = cbor2.dumps(value)
    try:
        decoded = _strict_cbor.loads(encoded)
    except _strict_cbor.StrictCborError as exc:
        # Only keys that Python considers equal (1 and True, 1 and 1.0) are refused.
        assert "duplicate map key" in str(exc)
        return
    assert decoded == cbor2.loads(encoded)


@FUZZ
@given(st.binary(max_size=300))
def test_strict_decoder_raises_only_its_error(data: bytes) -> None:
    with contextlib.suppress(_strict_cbor.StrictCborError):
        _strict_cbor.loads(data)


@pytest.mark.parametrize(
    "data",
    [
        b"\x5b\x7f\xff\xff\xff\xff\xff\xff\xff",  # 2^63-byte string
        b"\x9b\x7f\xff\xff\xff\xff\xff\xff\xff",  # 2^63-element array
        b"\xbb\x7f\xff\xff\xff\xff\xff\xff\xff",  # 2^63-entry map
        b"\x81" * 10_000,  # deep nesting
        b"\x9f" * 10_000,
        b"\x5f\x41\x00",  # unterminated indefinite string
        b"\xd9\xd9\xf7\x80",  # self-describe tag
        b"\xf7",  # undefined
    ],
)
def test_hostile_payloads(data: bytes) -> None:
    with pytest.raises(_strict_cbor.StrictCborError):
        _strict_cbor.loads(data)
    assert isinstance(verdict(sign(PKI.leaf_key, data)), VerificationError)
    prefix = b"\x84\x44\xa1\x01\x38\x22\xa0"
    assert isinstance(verdict(prefix + data), VerificationError)


def test_valid_reference_document() -> None:
    result = verdict(VALID)
    assert isinstance(result, VerifiedDocument)
    assert result.time == T0


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(VALID) - 1), st.integers(1, 255), st.booleans())
def test_cli_inspect_and_verify_never_crash(pos: int, mask: int, as_json: bool) -> None:
    from click.testing import CliRunner

    from virtio_nsm.cli import main

    mutated = bytearray(VALID)
    mutated[pos] ^= mask
    flags = ["--json"] if as_json else []
    for command in (["inspect", "-"], ["verify", "-"]):
        result = CliRunner().invoke(main, [*command, *flags], input=bytes(mutated))
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        assert result.exit_code in (0, 1)
