"""Fixtures for the EIF tests: signing keys and certificates, small images."""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from virtio_nsm.eif import Signer, build_stream


def make_certificate(curve: ec.EllipticCurve, *, days: int = 30, cn: str = "eif test signer",
                     not_before: dt.datetime | None = None) -> tuple[bytes, bytes]:
    """(private key PEM, self-signed certificate PEM) on ``curve``."""
    key = ec.generate_private_key(curve)
    name = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "virtio-nsm tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .sign(key, hashes.SHA384())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, certificate.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="session")
def p384_pems() -> tuple[bytes, bytes]:
    return make_certificate(ec.SECP384R1())


@pytest.fixture(scope="session")
def signer(p384_pems: tuple[bytes, bytes]) -> Signer:
    return Signer.from_pem(*p384_pems)


ImageFactory = Callable[..., bytes]


def image_bytes(kernel: bytes = b"KERNEL", cmdline: str | bytes = "console=ttyS0",
                ramdisks: tuple[bytes, ...] = (b"RAMDISK1", b"RAMDISK2"),
                metadata: bytes | None = b"{}", signer: Signer | None = None) -> bytes:
    out = io.BytesIO()
    build_stream(out, kernel=io.BytesIO(kernel), cmdline=cmdline,
                 ramdisks=[io.BytesIO(r) for r in ramdisks], metadata=metadata, signer=signer)
    return out.getvalue()


@pytest.fixture(scope="session")
def make_image() -> ImageFactory:
    """Builds an image in memory (default: the facts sheet's 645-byte image)."""
    return image_bytes


@pytest.fixture(scope="session")
def make_cert() -> Callable[..., tuple[bytes, bytes]]:
    return make_certificate
