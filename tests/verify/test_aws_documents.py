"""Real AWS documents shipped in tests/data/aws, with the verdicts its NOTICE.md lists."""

from __future__ import annotations

import datetime as dt
import hashlib
import re

import cbor2
import pytest
from verify_support import AWS_DATA, AWS_EXPECTED, AwsDocument, Pki, aws_names, der, load_aws

from virtio_nsm import cose
from virtio_nsm.verify import (
    AWS_NITRO_ROOT_SHA256,
    VerificationError,
    aws_nitro_root,
    parse_unverified,
    verify_document,
)


def test_every_shipped_document_has_an_expected_verdict() -> None:
    assert sorted(p.name for p in AWS_DATA.glob("*.b64")) == aws_names()


def test_expected_verdicts_are_the_ones_notice_lists() -> None:
    # NOTICE.md is the human-readable source of the verdicts; the tests must agree with it.
    rows = {}
    for line in (AWS_DATA / "NOTICE.md").read_text().splitlines():
        m = re.match(r"\| `([^`]+\.b64)` \| [^|]+ \| (.+) \|$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    assert sorted(rows) == aws_names()
    for name, (at, valid) in AWS_EXPECTED.items():
        verdict = rows[name]
        assert verdict.startswith("valid") == valid, name
        if valid:
            ms = int(re.search(r"(\d{13}) ms", verdict).group(1))  # type: ignore[union-attr]
            assert round(at.timestamp() * 1000) == ms, name


def test_shipped_root_is_the_published_one() -> None:
    from cryptography import x509

    root = aws_nitro_root()
    assert hashlib.sha256(der(root)).hexdigest() == AWS_NITRO_ROOT_SHA256
    shipped = AWS_DATA / "aws_nitro_enclaves_root_g1.pem"
    assert der(x509.load_pem_x509_certificate(shipped.read_bytes())) == der(root)


@pytest.mark.parametrize("name", aws_names())
def test_verdict_at_pinned_time(name: str) -> None:
    doc = load_aws(name)
    if doc.valid:
        result = verify_document(doc.raw, at=doc.at)
        assert result.time == doc.at
        assert result.digest == "SHA384"
        assert result.module_id.startswith("i-")
        assert len(result.chain) == 5
        assert der(result.chain[-1]) == der(aws_nitro_root())
        assert sorted(result.pcrs) == list(range(16))
    else:
        with pytest.raises(VerificationError):
            verify_document(doc.raw, at=doc.at)


@pytest.mark.parametrize("name", aws_names())
def test_invalid_three_hours_later(name: str) -> None:
    doc = load_aws(name)
    with pytest.raises(VerificationError) as info:
        verify_document(doc.raw, at=doc.at + dt.timedelta(hours=3))
    if doc.valid:
        assert any("leaf certificate expired" in r for r in info.value.reasons)


@pytest.mark.parametrize("name", aws_names())
def test_invalid_with_wrong_root(name: str, pki: Pki) -> None:
    doc = load_aws(name)
    with pytest.raises(VerificationError) as info:
        verify_document(doc.raw, roots=[pki.root], at=doc.at)
    if doc.valid:
        assert any("neither a trusted root nor issued by one" in r for r in info.value.reasons)


def test_aws_root_among_several_roots(production: AwsDocument, pki: Pki) -> None:
    doc = production
    verify_document(doc.raw, roots=[pki.root, aws_nitro_root()], at=doc.at)


def test_contents_of_production_document(production: AwsDocument) -> None:
    doc = production
    result = verify_document(doc.raw, at=doc.at)
    assert result.timestamp == 1725719859545
    assert result.module_id == "i-0a22e5c5f24d22174-enc0191cceb4289903f"
    assert len(result.public_key or b"") == 1024
    assert len(result.user_data or b"") == 1024
    assert len(result.nonce or b"") == 1024
    assert all(len(v) == 48 for v in result.pcrs.values())
    assert any(v != bytes(48) for i, v in result.pcrs.items() if i in (0, 1, 2))
    assert len(result.cabundle) == 4
    assert result.certificate == der(result.chain[0])


def test_evervault_null_public_key() -> None:
    doc = load_aws("evervault_debug.b64")
    result = verify_document(doc.raw, at=doc.at)
    assert result.public_key is None
    assert len(result.user_data or b"") == 91
    assert len(result.nonce or b"") == 256


def test_debug_document_has_zero_pcr0_to_2() -> None:
    doc = load_aws("nitrite_debug.b64")
    result = verify_document(doc.raw, at=doc.at)
    assert all(result.pcrs[i] == bytes(48) for i in (0, 1, 2))
    assert result.pcrs[4] != bytes(48)


def test_tagged_document_is_accepted(production: AwsDocument) -> None:
    doc = production
    tagged = b"\xd2" + doc.raw
    assert cose.decode_sign1(tagged).tagged
    verify_document(tagged, at=doc.at)


def test_other_tag_is_rejected(production: AwsDocument) -> None:
    doc = production
    with pytest.raises(VerificationError, match="unexpected CBOR tag 17"):
        verify_document(b"\xd1" + doc.raw, at=doc.at)


def test_before_leaf_validity(production: AwsDocument) -> None:
    doc = production
    with pytest.raises(VerificationError) as info:
        verify_document(doc.raw, at=doc.at - dt.timedelta(minutes=5))
    assert any("leaf certificate is not valid before" in r for r in info.value.reasons)
    # The document is also from the future relative to that time.
    assert any("after the verification time" in r for r in info.value.reasons)


def test_self_signed_document_lists_every_reason() -> None:
    doc = load_aws("nitrite_selfsigned_invalid.b64")
    unverified = parse_unverified(doc.raw)
    assert unverified.leaf is not None
    for at in (doc.at, unverified.leaf.not_valid_before_utc + dt.timedelta(days=1)):
        with pytest.raises(VerificationError) as info:
            verify_document(doc.raw, at=at)
        reasons = info.value.reasons
        assert "cabundle is null" in reasons
        assert "unprotected header is not a map" in reasons
        assert any("outside the leaf certificate's validity" in r for r in reasons)
        assert str(info.value).count(";") == len(reasons) - 1


def test_indefinite_payload_map_decodes_like_definite(production: AwsDocument) -> None:
    # Re-encode a real payload as an indefinite-length map: the syntax layer must
    # read the same fields (the signature then fails, since AWS signed the other bytes).
    doc = production
    sign1 = cose.decode_sign1(doc.raw)
    fields = cbor2.loads(sign1.payload)
    body = b"".join(cbor2.dumps(k) + cbor2.dumps(v) for k, v in reversed(fields.items()))
    payload = b"\xbf" + body + b"\xff"
    mutated = cose.encode_sign1(sign1.protected, payload, sign1.signature)
    unverified = parse_unverified(mutated)
    assert unverified.problems == ()
    assert unverified.pcrs == fields["pcrs"]
    with pytest.raises(VerificationError) as info:
        verify_document(mutated, at=doc.at)
    assert info.value.reasons == ["COSE signature does not verify with the leaf certificate's key"]


def test_tampered_shipped_root_fails_the_import_check(monkeypatch: pytest.MonkeyPatch) -> None:
    import virtio_nsm.verify as v

    monkeypatch.setattr(v, "AWS_NITRO_ROOT_SHA256", "00" * 32)
    with pytest.raises(ImportError, match="shipped AWS Nitro root"):
        v._load_aws_root()
