"""The EIF signature section: encoding, strict decoding, signing and checking.

The section is what AWS's builder gets from serde_cbor for a
``Vec<PcrSignature>``: an array of maps ``{signing_certificate, signature}``
whose two byte vectors are CBOR *arrays of unsigned integers* (serde_cbor
writes ``Vec<u8>`` that way; QEMU's loader accepts nothing else). Today it
holds one entry, for PCR0: ``signing_certificate`` is the PEM text and
``signature`` an untagged COSE_Sign1 whose payload is serde_cbor's encoding of
``PcrInfo {register_index: 0, register_value: PCR0}`` (again a map whose value
is an array of uints), protected header ``{1: alg}`` after the key's curve.

Decoding is strict: the bytes must be exactly what that encoder writes
(definite lengths, shortest heads, fields in declaration order) -- checked by
decoding with the project's tag-free strict reader and encoding again -- and
the section is bounded in size.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .. import cbor, cose
from .._strict_cbor import StrictCborError, loads
from .format import EifError

#: Largest signature section read (a certificate chain of a few KiB takes about
#: twice its size as an array of uints).
MAX_SIGNATURE_SECTION: Final = 1 << 20

_UINT8: Final = tuple(cbor.uint(i) for i in range(256))
_CERT_KEY: Final = "signing_certificate"
_SIG_KEY: Final = "signature"


def uint_array(data: bytes) -> bytes:
    """serde_cbor's encoding of a ``Vec<u8>``: an array of unsigned integers."""
    return cbor.array_head(len(data)) + b"".join(_UINT8[b] for b in data)


def pcr_info_payload(index: int, value: bytes) -> bytes:
    """serde_cbor of ``PcrInfo {register_index, register_value}``: what an EIF signature signs."""
    head = cbor.uint(index) if index >= 0 else cbor.head(cbor.MAJOR_NINT, -1 - index)
    return (cbor.map_head(2) + cbor.tstr("register_index") + head
            + cbor.tstr("register_value") + uint_array(value))


@dataclass(frozen=True)
class PcrSignature:
    """One entry of the signature section: PEM certificate and COSE_Sign1 bytes."""

    signing_certificate: bytes
    signature: bytes


def encode_signature_section(entries: Sequence[PcrSignature]) -> bytes:
    out = [cbor.array_head(len(entries))]
    for entry in entries:
        out += [cbor.map_head(2), cbor.tstr(_CERT_KEY), uint_array(entry.signing_certificate),
                cbor.tstr(_SIG_KEY), uint_array(entry.signature)]
    return b"".join(out)


def _byte_vector(value: Any, what: str) -> bytes:
    if not isinstance(value, list):
        raise EifError(f"signature section: {what} is not an array of byte values")
    if not all(type(v) is int and 0 <= v <= 255 for v in value):
        raise EifError(f"signature section: {what} holds an element that is not a byte value (0-255)")
    return bytes(value)


def decode_signature_section(data: bytes) -> list[PcrSignature]:
    """The entries of a signature section; :class:`EifError` unless it is well-formed."""
    if len(data) > MAX_SIGNATURE_SECTION:
        raise EifError(f"signature section of {len(data)} bytes is larger than the "
                       f"{MAX_SIGNATURE_SECTION}-byte limit")
    try:
        value = loads(data, max_depth=4)
    except StrictCborError as exc:
        raise EifError(f"signature section is not valid CBOR: {exc}") from None
    if not isinstance(value, list) or not value:
        raise EifError("signature section is not a non-empty array of {signing_certificate, signature}")
    entries = []
    for n, item in enumerate(value):
        if not isinstance(item, dict) or set(item) != {_CERT_KEY, _SIG_KEY}:
            raise EifError(f"signature section: entry {n} is not a map "
                           f"{{{_CERT_KEY}, {_SIG_KEY}}}")
        entries.append(PcrSignature(_byte_vector(item[_CERT_KEY], f"entry {n} {_CERT_KEY}"),
                                    _byte_vector(item[_SIG_KEY], f"entry {n} {_SIG_KEY}")))
    if encode_signature_section(entries) != data:
        raise EifError("signature section is not in serde_cbor's encoding (definite lengths, "
                       "shortest integers, signing_certificate before signature)")
    return entries


def load_certificate(pem: bytes, what: str = "signing certificate") -> x509.Certificate:
    try:
        certificate = x509.load_pem_x509_certificate(pem)
        # cryptography parses fields lazily: touch every one used later so a
        # damaged certificate fails here, with this message
        _ = (certificate.issuer, certificate.subject, certificate.not_valid_before_utc,
             certificate.not_valid_after_utc, certificate.signature_algorithm_oid,
             certificate.signature)
        certificate.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise EifError(f"{what} is not a usable PEM X.509 certificate ({exc})") from None
    return certificate


def certificate_der(pem: bytes) -> bytes:
    return load_certificate(pem).public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True)
class Signer:
    """An ECDSA private key and the PEM certificate of its public key."""

    key: ec.EllipticCurvePrivateKey
    certificate_pem: bytes

    @classmethod
    def from_pem(cls, key_pem: bytes, certificate_pem: bytes) -> Signer:
        certificate = load_certificate(certificate_pem)
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"private key is not an unencrypted PEM key ({exc})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("only ECDSA keys sign enclave images (P-256, P-384 or P-521)")
        cose.ecdsa_algorithm(key.curve)  # refuses other curves
        public = certificate.public_key()
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if public.public_bytes(serialization.Encoding.DER, spki) != key.public_key().public_bytes(
            serialization.Encoding.DER, spki
        ):
            raise ValueError("the private key does not belong to the signing certificate")
        return cls(key, certificate_pem)

    @property
    def certificate_der(self) -> bytes:
        return certificate_der(self.certificate_pem)

    def sign_pcr0(self, pcr0: bytes) -> PcrSignature:
        return PcrSignature(self.certificate_pem, cose.sign_ecdsa(self.key, pcr_info_payload(0, pcr0)))

    def signature_section(self, pcr0: bytes) -> bytes:
        return encode_signature_section([self.sign_pcr0(pcr0)])


@dataclass(frozen=True)
class SignatureCheck:
    """Whether entry 0 signs the image's PCR0 with its certificate's key; why not if not."""

    valid: bool
    reason: str


def _decode_cose(data: bytes) -> tuple[bytes, int, bytes, bytes]:
    """(protected, alg, payload, signature) of a COSE_Sign1, untagged or tag 18."""
    sign1 = cose.decode_sign1(data)  # the strict reader: no tags inside, linear cost; CoseError
    try:
        header = loads(sign1.protected, max_depth=2)
    except StrictCborError as exc:
        raise ValueError(f"the COSE protected header is not valid CBOR ({exc})") from None
    alg = header.get(1) if isinstance(header, dict) else None
    if type(alg) is not int:
        raise ValueError("the COSE protected header has no algorithm")
    return sign1.protected, alg, sign1.payload, sign1.signature


def check_signature(entry: PcrSignature, pcr0: bytes) -> SignatureCheck:
    """Verify ``entry`` (the PCR0 signature) against the image's measured PCR0."""
    try:
        certificate = load_certificate(entry.signing_certificate)
        protected, alg, payload, signature = _decode_cose(entry.signature)
    except (EifError, ValueError) as exc:
        return SignatureCheck(False, str(exc))
    key = certificate.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return SignatureCheck(False, "the signing certificate's key is not an ECDSA key")
    if not cose.verify_ecdsa(key, alg, protected, payload, signature):
        return SignatureCheck(False, "the COSE signature does not verify with the certificate's key")
    if payload != pcr_info_payload(0, pcr0):
        return SignatureCheck(False, "the signature is valid but signs another PCR0 than the image's")
    return SignatureCheck(True, "the certificate's key signs the image's PCR0")


# --- nitro-cli's SigningCertificate object ---------------------------------


def _openssl_time(when: dt.datetime) -> str:
    # OpenSSL's ASN1_TIME_print, which nitro-cli prints: "Nov  9 20:00:00 2026 GMT"
    return f"{when:%b} {when.day:2d} {when:%H:%M:%S} {when.year} GMT"


def certificate_info(pem: bytes) -> dict[str, Any]:
    """The ``SigningCertificate`` object of ``nitro-cli describe-eif``."""
    certificate = load_certificate(pem)
    issuer = {}
    for attribute in certificate.issuer:
        name = getattr(attribute.oid, "_name", None) or attribute.oid.dotted_string
        value = attribute.value
        issuer[name] = value if isinstance(value, str) else value.hex()
    algorithm = certificate.signature_algorithm_oid
    return {
        "IssuerName": dict(sorted(issuer.items())),
        "Algorithm": getattr(algorithm, "_name", None) or algorithm.dotted_string,
        "NotBefore": _openssl_time(certificate.not_valid_before_utc),
        "NotAfter": _openssl_time(certificate.not_valid_after_utc),
        "Signature": ":".join(f"{b:02X}" for b in certificate.signature),
    }
