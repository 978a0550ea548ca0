"""Signing: the signature section's encoding, verification, PCR8, tampering."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import struct

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from virtio_nsm import cbor, cose
from virtio_nsm._strict_cbor import loads
from virtio_nsm.eif import EifError, SectionType, Signer, read_stream, sign_stream
from virtio_nsm.eif.signature import (
    PcrSignature,
    decode_signature_section,
    encode_signature_section,
    pcr_info_payload,
    uint_array,
)

from .test_vectors import AWS_SIGNATURE_SECTION, FACTS_PCR0


def _signature_section(data: bytes) -> tuple[int, bytes]:
    image = read_stream(io.BytesIO(data))
    section = next(s for s in image.sections if s.type is SectionType.SIGNATURE)
    start = section.offset + 12
    return start, data[start:start + section.size]


def test_signed_image_verifies_and_has_pcr8(make_image, signer, p384_pems) -> None:
    data = make_image(signer=signer)
    image = read_stream(io.BytesIO(data))
    assert image.crc_ok and image.is_signed
    assert image.measurements.pcr0.hex() == FACTS_PCR0  # the signature is not measured
    der = x509.load_pem_x509_certificate(p384_pems[1]).public_bytes(serialization.Encoding.DER)
    assert image.measurements.pcr8 == hashlib.sha384(bytes(48) + hashlib.sha384(der).digest()).digest()
    check = image.signature_check()
    assert check is not None and check.valid
    described = image.describe()
    assert described["SignatureCheck"] is True and described["IsSigned"] is True
    assert described["SigningCertificate"]["IssuerName"]["commonName"] == "eif test signer"
    assert list(described) == ["EifVersion", "Measurements", "IsSigned", "SigningCertificate",
                               "CheckCRC", "SignatureCheck"]


def test_signature_section_shape(make_image, signer, p384_pems) -> None:
    """Checked with the generic strict decoder and cryptography, not the module's own reader."""
    _, section = _signature_section(make_image(signer=signer))
    entries = loads(section)
    assert isinstance(entries, list) and len(entries) == 1
    entry = entries[0]
    assert list(entry) == ["signing_certificate", "signature"]
    assert bytes(entry["signing_certificate"]) == p384_pems[1]
    cose_bytes = bytes(entry["signature"])
    protected, unprotected, payload, signature = loads(cose_bytes)
    assert protected == b"\xa1\x01\x38\x22" and unprotected == {}  # {1: -35} ES384
    assert payload == pcr_info_payload(0, bytes.fromhex(FACTS_PCR0))
    decoded_payload = loads(payload)
    assert decoded_payload == {"register_index": 0, "register_value": list(bytes.fromhex(FACTS_PCR0))}
    key = x509.load_pem_x509_certificate(p384_pems[1]).public_key()
    r, s = int.from_bytes(signature[:48], "big"), int.from_bytes(signature[48:], "big")
    to_be_signed = (cbor.array_head(4) + cbor.tstr("Signature1") + cbor.bstr(protected) + cbor.bstr(b"")
                    + cbor.bstr(payload))
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    key.verify(encode_dss_signature(r, s), to_be_signed, ec.ECDSA(hashes.SHA384()))


@pytest.mark.parametrize(("curve", "protected", "size"), [
    (ec.SECP256R1(), b"\xa1\x01\x26", 64), (ec.SECP384R1(), b"\xa1\x01\x38\x22", 96),
    (ec.SECP521R1(), b"\xa1\x01\x38\x23", 132),
])
def test_every_cose_curve(make_image, make_cert, curve, protected, size) -> None:
    signer = Signer.from_pem(*make_cert(curve))
    data = make_image(signer=signer)
    image = read_stream(io.BytesIO(data))
    check = image.signature_check()
    assert check is not None and check.valid
    parts = loads(bytes(loads(_signature_section(data)[1])[0]["signature"]))
    assert parts[0] == protected and len(parts[3]) == size


def test_other_keys_are_refused(make_cert) -> None:
    key_pem, cert_pem = make_cert(ec.SECP256K1())
    with pytest.raises(ValueError, match="P-256, P-384 or P-521"):
        Signer.from_pem(key_pem, cert_pem)


def test_key_must_match_certificate(make_cert) -> None:
    key_pem, _ = make_cert(ec.SECP384R1())
    _, other_cert = make_cert(ec.SECP384R1())
    with pytest.raises(ValueError, match="does not belong"):
        Signer.from_pem(key_pem, other_cert)


def test_tampered_signature_is_reported(make_image, signer) -> None:
    data = make_image(signer=signer)
    start, section = _signature_section(data)
    entries = decode_signature_section(section)
    cose_bytes = bytearray(entries[0].signature)
    cose_bytes[-1] ^= 1  # last byte of s
    forged = encode_signature_section([PcrSignature(entries[0].signing_certificate, bytes(cose_bytes))])
    assert len(forged) == len(section)
    tampered = data[:start] + forged
    image = read_stream(io.BytesIO(tampered))
    assert not image.crc_ok
    assert image.describe()["SignatureCheck"] is False
    assert "does not verify" in image.signature_check().reason  # type: ignore[union-attr]


def test_signature_of_another_pcr0_is_reported(make_image, signer) -> None:
    data = make_image(signer=signer)
    start, _ = _signature_section(data)
    other = signer.signature_section(bytes(48))
    # a valid signature over a different PCR0 put in the image
    tampered = bytearray(data[:start] + other)
    struct.pack_into(">Q", tampered, 284 + 8 * 5, len(other))
    struct.pack_into(">Q", tampered, start - 8, len(other))
    image = read_stream(io.BytesIO(bytes(tampered)))
    check = image.signature_check()
    assert check is not None and not check.valid and "another PCR0" in check.reason


def test_tampered_image_data_fails_signature_check(make_image, signer) -> None:
    data = bytearray(make_image(signer=signer))
    data[548 + 12] ^= 0x20  # first kernel byte: PCR0 changes
    image = read_stream(io.BytesIO(bytes(data)))
    assert not image.crc_ok
    assert image.describe()["SignatureCheck"] is False


def test_sign_adds_then_replaces(make_image, signer, make_cert) -> None:
    unsigned = make_image()
    out = io.BytesIO()
    result = sign_stream(io.BytesIO(unsigned), out, signer)
    once = out.getvalue()
    # adding a signature appends it: the builder's layout with a signer
    assert once[548:].startswith(unsigned[548:])
    image = read_stream(io.BytesIO(once))
    assert [s.type for s in image.sections] == [s.type for s in read_stream(
        io.BytesIO(make_image(signer=signer))).sections]
    assert image.sections[-1].type is SectionType.SIGNATURE
    assert image.sections[-1].offset == len(unsigned)
    assert image.crc_ok and image.signature_check().valid  # type: ignore[union-attr]
    assert result.measurements == image.measurements
    other = Signer.from_pem(*make_cert(ec.SECP256R1(), cn="second signer"))
    out2 = io.BytesIO()
    sign_stream(io.BytesIO(once), out2, other)
    twice = read_stream(io.BytesIO(out2.getvalue()))
    assert twice.crc_ok and twice.signature_check().valid  # type: ignore[union-attr]
    assert [s.type for s in twice.sections] == [s.type for s in image.sections]
    assert twice.measurements.pcr8 != image.measurements.pcr8
    assert twice.measurements.pcr0 == image.measurements.pcr0


def test_sign_refuses_a_damaged_image(make_image, signer) -> None:
    data = bytearray(make_image())
    data[-1] ^= 1
    with pytest.raises(EifError, match="CRC is wrong"):
        sign_stream(io.BytesIO(bytes(data)), io.BytesIO(), signer)


def test_aws_signature_section_decodes() -> None:
    entries = decode_signature_section(bytes.fromhex(AWS_SIGNATURE_SECTION))
    assert entries[0].signing_certificate.startswith(b"-----BEGIN")
    assert len(entries[0].signature) == 10


@pytest.mark.parametrize(("section", "message"), [
    (b"", "not valid CBOR"),
    (b"\x80", "non-empty array"),
    (b"\xa0", "non-empty array"),
    (cbor.array_head(1) + cbor.map_head(1) + cbor.tstr("signature") + uint_array(b"x"), "is not a map"),
    # byte strings instead of arrays of uints (serde_cbor never writes them; QEMU refuses them)
    (cbor.array_head(1) + cbor.map_head(2) + cbor.tstr("signing_certificate") + cbor.bstr(b"x")
     + cbor.tstr("signature") + cbor.bstr(b"y"), "not an array of byte values"),
    (cbor.array_head(1) + cbor.map_head(2) + cbor.tstr("signing_certificate") + cbor.array_head(1)
     + cbor.uint(256) + cbor.tstr("signature") + uint_array(b"y"), "not a byte value"),
    (cbor.array_head(1) + cbor.map_head(2) + cbor.tstr("signing_certificate") + cbor.array_head(1)
     + b"\xf5" + cbor.tstr("signature") + uint_array(b"y"), "not a byte value"),
    # non-shortest integer, keys in the other order, indefinite length, a tag
    (cbor.array_head(1) + cbor.map_head(2) + cbor.tstr("signing_certificate") + cbor.array_head(1)
     + b"\x18\x05" + cbor.tstr("signature") + uint_array(b"y"), "serde_cbor's encoding"),
    (cbor.array_head(1) + cbor.map_head(2) + cbor.tstr("signature") + uint_array(b"y")
     + cbor.tstr("signing_certificate") + uint_array(b"x"), "serde_cbor's encoding"),
    (b"\x9f" + cbor.map_head(2) + cbor.tstr("signing_certificate") + uint_array(b"x")
     + cbor.tstr("signature") + uint_array(b"y") + b"\xff", "serde_cbor's encoding"),
    (b"\xd8\x1c" + cbor.array_head(1), "not valid CBOR"),  # shared-reference tag 28
    (b"\x9a\xff\xff\xff\xff", "not valid CBOR"),  # a length longer than the input
])
def test_malformed_signature_sections(section: bytes, message: str) -> None:
    with pytest.raises(EifError, match=message):
        decode_signature_section(section)


def test_signed_image_with_malformed_section_is_refused(make_image, signer) -> None:
    data = make_image(signer=signer)
    start, _ = _signature_section(data)
    broken = bytearray(data)
    broken[start] = 0x82  # the array claims two entries
    with pytest.raises(EifError, match="signature section"):
        read_stream(io.BytesIO(bytes(broken)))


def test_cose_primitives_sign_and_verify_each_curve() -> None:
    for curve in (ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1()):
        key = ec.generate_private_key(curve)
        algorithm = cose.ecdsa_algorithm(curve)
        parts = loads(cose.sign_ecdsa(key, b"payload"))
        assert parts[0] == algorithm.protected
        assert cose.verify_ecdsa(key.public_key(), algorithm.alg, parts[0], b"payload", parts[3])
        assert not cose.verify_ecdsa(key.public_key(), algorithm.alg, parts[0], b"other", parts[3])
        assert not cose.verify_ecdsa(key.public_key(), -1, parts[0], b"payload", parts[3])
        r, s = decode_dss_signature(key.sign(b"x", ec.ECDSA(algorithm.hash())))
        assert r and s


def test_expired_certificate_info(make_cert) -> None:
    from virtio_nsm.eif.signature import certificate_info
    start = dt.datetime(2026, 3, 5, 7, 8, 9, tzinfo=dt.UTC)
    _, pem = make_cert(ec.SECP384R1(), not_before=start, days=1)
    info = certificate_info(pem)
    assert info["NotBefore"] == "Mar  5 07:08:09 2026 GMT"
    assert info["NotAfter"] == "Mar  6 07:08:09 2026 GMT"
    assert info["Algorithm"] == "ecdsa-with-SHA384"
    assert set(info["IssuerName"]) == {"commonName", "countryName", "organizationName"}
    assert all(len(b) == 2 for b in info["Signature"].split(":"))
