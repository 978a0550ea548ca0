"""Certificate-chain rules, each broken on purpose with the local test PKI."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from verify_support import (
    T0,
    Pki,
    default_specs,
    der,
    document,
    encode_payload,
    make_pki,
    new_key,
    payload_fields,
    reissue,
    sign,
)

from virtio_nsm import cose
from virtio_nsm.verify import VerificationError, verify_document


def reasons_of(doc: bytes, **kwargs: Any) -> list[str]:
    with pytest.raises(VerificationError) as info:
        verify_document(doc, **kwargs)
    return info.value.reasons


def test_valid_document(pki: Pki) -> None:
    result = verify_document(document(pki), roots=[pki.root], at=T0)
    assert [der(c) for c in result.chain] == [der(c) for c in reversed(pki.certs)]


def test_our_documents_are_not_trusted_by_default(pki: Pki) -> None:
    reasons = reasons_of(document(pki), at=T0)
    assert "cabundle[0] is neither a trusted root nor issued by one" in reasons


def test_resigned_with_foreign_key(pki: Pki) -> None:
    payload = encode_payload(payload_fields(pki))
    forged = sign(new_key(), payload)
    reasons = reasons_of(forged, roots=[pki.root], at=T0)
    assert reasons == ["COSE signature does not verify with the leaf certificate's key"]


def test_foreign_leaf_in_place_of_ours(pki: Pki, other_pki: Pki) -> None:
    # A leaf from another PKI signs correctly but does not chain to our bundle.
    fields = payload_fields(pki)
    fields["certificate"] = der(other_pki.leaf)
    doc = sign(other_pki.leaf_key, encode_payload(fields))
    reasons = reasons_of(doc, roots=[pki.root], at=T0)
    assert any(r.startswith("leaf certificate is not issued by cabundle[3]") for r in reasons)


def test_bundle_in_wrong_order(pki: Pki) -> None:
    fields = payload_fields(pki)
    fields["cabundle"] = list(reversed(fields["cabundle"]))
    reasons = reasons_of(sign(pki.leaf_key, encode_payload(fields)), roots=[pki.root], at=T0)
    assert any("is not issued by" in r for r in reasons)


def test_bundle_missing_an_intermediate(pki: Pki) -> None:
    fields = payload_fields(pki)
    del fields["cabundle"][2]  # the zonal CA
    reasons = reasons_of(sign(pki.leaf_key, encode_payload(fields)), roots=[pki.root], at=T0)
    assert any("cabundle[2] is not issued by cabundle[1]" in r for r in reasons)


def test_bundle_without_the_root(pki: Pki) -> None:
    # cabundle[0] may also be an intermediate issued directly by a trusted root.
    fields = payload_fields(pki)
    fields["cabundle"] = fields["cabundle"][1:]
    result = verify_document(sign(pki.leaf_key, encode_payload(fields)), roots=[pki.root], at=T0)
    assert [der(c) for c in result.chain] == [der(c) for c in reversed(pki.certs)]


def test_root_not_trusted_even_if_bundled(pki: Pki, other_pki: Pki) -> None:
    reasons = reasons_of(document(pki), roots=[other_pki.root], at=T0)
    assert "cabundle[0] is neither a trusted root nor issued by one" in reasons


SPECS = default_specs()


@pytest.mark.parametrize(
    ("index", "changes", "expected"),
    [
        (4, {"ca": True}, "leaf certificate is a CA certificate"),
        (4, {"digital_signature": False}, "leaf certificate lacks the digitalSignature key usage"),
        (4, {"with_ku": False}, "leaf certificate lacks the digitalSignature key usage"),
        (3, {"bc_critical": False}, "cabundle[3] has a non-critical basicConstraints"),
        (3, {"with_bc": False}, "cabundle[3] is not a CA certificate"),
        (3, {"ca": False, "path_length": None, "key_cert_sign": True}, "cabundle[3] is not a CA"),
        (2, {"key_cert_sign": False}, "cabundle[2] lacks the keyCertSign key usage"),
        (2, {"path_length": 0}, "cabundle[2] allows 0 CA(s) below it, the chain has 1"),
        (1, {"path_length": 1}, "cabundle[1] allows 1 CA(s) below it, the chain has 2"),
        (0, {"path_length": 1}, "cabundle[0] allows 1 CA(s) below it, the chain has 3"),
        (4, {"hash": hashes.SHA256()}, "leaf certificate is not signed with ecdsa-with-SHA384"),
        (2, {"hash": hashes.SHA512()}, "cabundle[2] is not signed with ecdsa-with-SHA384"),
        (4, {"extra_critical": True}, "leaf certificate has an unsupported critical extension"),
        (
            4,
            {"not_before": T0 + dt.timedelta(seconds=1)},
            "leaf certificate is not valid before",
        ),
        (3, {"not_after": T0 - dt.timedelta(seconds=1)}, "cabundle[3] expired at"),
        (0, {"not_after": T0 - dt.timedelta(days=1)}, "cabundle[0] expired at"),
    ],
)
def test_broken_certificate(index: int, changes: dict[str, Any], expected: str) -> None:
    base = make_pki(SPECS)
    broken = reissue(base, index, SPECS, **changes)
    doc = document(broken, timestamp=T0)
    reasons = reasons_of(doc, roots=[broken.root], at=T0)
    assert any(r.startswith(expected) for r in reasons), reasons


def test_leaf_timestamp_outside_validity_but_certs_valid_now() -> None:
    pki = make_pki(SPECS)
    # Document timestamp before the leaf was issued, verified while all are valid.
    doc = document(pki, timestamp=T0 - dt.timedelta(minutes=5))
    reasons = reasons_of(doc, roots=[pki.root], at=T0)
    assert len(reasons) == 1
    assert "outside the leaf certificate's validity" in reasons[0]


@pytest.mark.parametrize(
    ("position", "curve", "expected"),
    [
        (4, ec.SECP256R1(), "leaf certificate does not have an ECDSA P-384 key"),
        (3, ec.SECP521R1(), "cabundle[3] does not have an ECDSA P-384 key"),
    ],
)
def test_non_p384_keys(position: int, curve: ec.EllipticCurve, expected: str) -> None:
    keys = [new_key() for _ in SPECS]
    keys[position] = new_key(curve)
    pki = make_pki(SPECS, keys)
    # The COSE signature stays ES384-shaped (96 bytes) whatever the leaf key is.
    payload = encode_payload(payload_fields(pki))
    der_sig = pki.leaf_key.sign(cose.sig_structure(cose.PROTECTED_ES384, payload), ec.ECDSA(hashes.SHA384()))
    doc = cose.encode_sign1(cose.PROTECTED_ES384, payload, cose.der_to_raw(der_sig, 48))
    reasons = reasons_of(doc, roots=[pki.root], at=T0)
    assert expected in reasons, reasons


def test_certificate_signature_bit_string_must_be_der() -> None:
    # cryptography ignores the unused-bits byte of the signature BIT STRING when
    # the padding bit is zero: one certificate, two encodings. We refuse that.
    for _ in range(20):
        pki = make_pki(SPECS)
        zonal = der(pki.certs[2])
        if zonal[-1] & 1 == 0:
            break
    else:
        pytest.skip("no certificate with an even last signature byte in 20 tries")
    fields = payload_fields(pki)
    pos = len(zonal) - len(pki.certs[2].signature) - 1
    assert zonal[pos] == 0
    fields["cabundle"][2] = zonal[:pos] + b"\x01" + zonal[pos + 1 :]
    reasons = reasons_of(sign(pki.leaf_key, encode_payload(fields)), roots=[pki.root], at=T0)
    assert reasons == ["cabundle[2] is not DER: its signature has unused bits"]
