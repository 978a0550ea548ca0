"""Verifier test helpers: the real AWS documents (tests/data/aws), and a local test PKI shaped like
AWS's with a document builder on top of it.

root (no pathLen, decades) → regional (pathLen 2, 20 days) → zonal (pathLen 1,
6 days) → instance (pathLen 0, 1 day) → leaf (CA:FALSE, digitalSignature, 3 h),
all P-384 and ecdsa-with-SHA384, as in facts §4. Each knob of :func:`issue`
exists so a test can break exactly one property of one certificate.
"""

from __future__ import annotations

import base64
import datetime as dt
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from virtio_nsm import cbor, cose

T0 = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def new_key(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP384R1())


@dataclass(frozen=True)
class CertSpec:
    """Everything about one certificate a test may want to get wrong."""

    cn: str
    not_before: dt.datetime
    not_after: dt.datetime
    ca: bool
    path_length: int | None = None
    bc_critical: bool = True
    with_bc: bool = True
    key_cert_sign: bool | None = None  # default: same as ca
    digital_signature: bool = True
    with_ku: bool = True
    hash: hashes.HashAlgorithm = field(default_factory=hashes.SHA384)
    extra_critical: bool = False


def issue(
    spec: CertSpec,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test"),
            x509.NameAttribute(NameOID.COMMON_NAME, spec.cn),
        ]
    )
    issuer_name = name if issuer is None else issuer[0].subject
    signing_key = key if issuer is None else issuer[1]
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(spec.not_before)
        .not_valid_after(spec.not_after)
    )
    if spec.with_bc:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=spec.ca, path_length=spec.path_length),
            critical=spec.bc_critical,
        )
    if spec.with_ku:
        kcs = spec.ca if spec.key_cert_sign is None else spec.key_cert_sign
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=spec.digital_signature,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=kcs,
                crl_sign=spec.ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=spec.ca,
        )
    if spec.ca:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        if issuer is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()),
                critical=False,
            )
    if spec.extra_critical:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"),
            critical=True,
        )
    return builder.sign(signing_key, spec.hash)


def default_specs(t: dt.datetime = T0) -> list[CertSpec]:
    """root, regional, zonal, instance, leaf — valid around ``t``."""
    h = dt.timedelta(hours=1)
    return [
        CertSpec("test.nitro-enclaves", t - 365 * 24 * h, t + 20 * 365 * 24 * h, ca=True),
        CertSpec("regional.test", t - 5 * 24 * h, t + 15 * 24 * h, ca=True, path_length=2),
        CertSpec("zonal.test", t - 2 * 24 * h, t + 4 * 24 * h, ca=True, path_length=1),
        CertSpec("instance.test", t - 2 * h, t + 22 * h, ca=True, path_length=0),
        CertSpec(
            "i-0123456789abcdef0-enc0123456789abcdef.test",
            t - dt.timedelta(seconds=30),
            t + 3 * h - dt.timedelta(seconds=30),
            ca=False,
        ),
    ]


@dataclass(frozen=True)
class Pki:
    keys: tuple[ec.EllipticCurvePrivateKey, ...]  # root, regional, zonal, instance, leaf
    certs: tuple[x509.Certificate, ...]

    @property
    def root(self) -> x509.Certificate:
        return self.certs[0]

    @property
    def leaf(self) -> x509.Certificate:
        return self.certs[-1]

    @property
    def leaf_key(self) -> ec.EllipticCurvePrivateKey:
        return self.keys[-1]

    def cabundle(self) -> list[bytes]:
        """AWS order: root first, leaf's issuer last."""
        return [der(c) for c in self.certs[:-1]]


def make_pki(
    specs: list[CertSpec] | None = None,
    keys: list[ec.EllipticCurvePrivateKey] | None = None,
) -> Pki:
    specs = specs or default_specs()
    keys = keys or [new_key() for _ in specs]
    certs: list[x509.Certificate] = []
    for i, (spec, key) in enumerate(zip(specs, keys, strict=True)):
        issuer = None if i == 0 else (certs[i - 1], keys[i - 1])
        certs.append(issue(spec, key, issuer))
    return Pki(tuple(keys), tuple(certs))


def reissue(pki: Pki, index: int, specs: list[CertSpec], **changes: Any) -> Pki:
    """``pki`` with certificate ``index`` (and everything below it) re-issued."""
    specs = list(specs)
    specs[index] = replace(specs[index], **changes)
    return make_pki(specs, list(pki.keys))


def _encode(value: Any) -> bytes:
    """Deterministic encoder for test payloads (keys in the given order)."""
    if value is None:
        return cbor.NULL
    if isinstance(value, bool):
        return cbor.TRUE if value else cbor.FALSE
    if isinstance(value, int):
        return cbor.uint(value) if value >= 0 else cbor.head(cbor.MAJOR_NINT, -1 - value)
    if isinstance(value, float):
        return b"\xfb" + struct.pack(">d", value)
    if isinstance(value, bytes):
        return cbor.bstr(value)
    if isinstance(value, str):
        return cbor.tstr(value)
    if isinstance(value, list):
        return cbor.array_head(len(value)) + b"".join(_encode(v) for v in value)
    if isinstance(value, Mapping):
        return cbor.map_head(len(value)) + b"".join(_encode(k) + _encode(v) for k, v in value.items())
    raise TypeError(type(value))


def encode_payload(fields: Mapping[str, Any], *, indefinite: bool = False) -> bytes:
    if not indefinite:
        return _encode(fields)
    return b"\xbf" + b"".join(_encode(k) + _encode(v) for k, v in fields.items()) + b"\xff"


def payload_fields(
    pki: Pki,
    *,
    timestamp: dt.datetime = T0,
    pcrs: Mapping[int, bytes] | None = None,
    public_key: bytes | None = None,
    user_data: bytes | None = None,
    nonce: bytes | None = None,
) -> dict[str, Any]:
    if pcrs is None:
        pcrs = {i: bytes([i]) * 48 for i in range(16)}
    return {
        "module_id": "i-0123456789abcdef0-enc0123456789abcdef",
        "digest": "SHA384",
        "timestamp": int(timestamp.timestamp() * 1000),
        "pcrs": dict(pcrs),
        "certificate": der(pki.leaf),
        "cabundle": pki.cabundle(),
        "public_key": public_key,
        "user_data": user_data,
        "nonce": nonce,
    }


def sign(
    key: ec.EllipticCurvePrivateKey, payload: bytes, *, protected: bytes = cose.PROTECTED_ES384
) -> bytes:
    """An untagged COSE_Sign1 over ``payload`` (any protected header)."""
    if protected == cose.PROTECTED_ES384:
        return cose.sign_es384(key, payload)
    der_sig = key.sign(cose.sig_structure(protected, payload), ec.ECDSA(hashes.SHA384()))
    return cose.encode_sign1(protected, payload, cose.der_to_raw(der_sig))


def document(pki: Pki, *, indefinite: bool = False, **kwargs: Any) -> bytes:
    return sign(pki.leaf_key, encode_payload(payload_fields(pki, **kwargs), indefinite=indefinite))


# -- the real AWS documents ---------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
#: Real documents shipped with the tests (sources and verdicts: AWS_DATA/NOTICE.md).
AWS_DATA = REPO / "tests" / "data" / "aws"


@dataclass(frozen=True)
class AwsDocument:
    name: str
    raw: bytes
    #: The verification time NOTICE.md pins (the document's own timestamp).
    at: dt.datetime
    valid: bool


def _ms(ms: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=ms)


# Verdicts and pinned times as listed in AWS_DATA/NOTICE.md (a test checks they agree).
AWS_EXPECTED = {
    "nitrite_production.b64": (_ms(1725719859545), True),
    "nitrite_debug.b64": (_ms(1725719886508), True),
    "evervault_debug.b64": (_ms(1694102161556), True),
    # timestamp field is in seconds; pin to when its leaf is valid instead.
    "nitrite_selfsigned_invalid.b64": (_ms(1713379906 * 1000), False),
}


def load_aws(name: str) -> AwsDocument:
    path = AWS_DATA / name
    at, valid = AWS_EXPECTED[name]
    return AwsDocument(name, base64.b64decode(path.read_bytes()), at, valid)


def aws_names() -> list[str]:
    return sorted(AWS_EXPECTED)
