"""A local certificate hierarchy shaped like AWS's Nitro PKI.

AWS signs attestation documents with a short-lived leaf issued through four
levels::

    root (pathLen none, decades)
      -> regional CA (pathLen 2, ~20 days)
        -> zonal CA (pathLen 1, ~6 days)
          -> instance CA (pathLen 0, 1 day)
            -> leaf (CA:FALSE, digitalSignature, 3 hours)

:class:`CertificateAuthority` is the root: generated in memory or built from
PEM (a user's own key and certificate; :func:`virtio_nsm.persist.load_ca` reads
a directory made by ``nsm ca init``). :class:`SigningChain` keeps the three
intermediates and the leaf, and renews each one before a certificate below it
could outlive it. Time is always a parameter; nothing here touches files.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..errors import ConfigurationError

ROOT_LIFETIME: Final = dt.timedelta(days=30 * 365)
REGIONAL_LIFETIME: Final = dt.timedelta(days=20)
ZONAL_LIFETIME: Final = dt.timedelta(days=6)
INSTANCE_LIFETIME: Final = dt.timedelta(days=1)
LEAF_LIFETIME: Final = dt.timedelta(hours=3)
#: How long one leaf signs documents before a fresh one is issued. Any
#: document therefore stays verifiable for at least LEAF_LIFETIME - LEAF_REUSE.
LEAF_REUSE: Final = dt.timedelta(minutes=1)

_HASH: Final = hashes.SHA384()


def _name(*parts: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in parts])


def _second(t: dt.datetime) -> dt.datetime:
    return t.replace(microsecond=0)


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False,
    )


def _check_p384_key(key: object, what: str) -> None:
    if not isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) or not (
        isinstance(key.curve, ec.SECP384R1)
    ):
        raise ConfigurationError(f"{what} must be an ECDSA P-384 key")


class CertificateAuthority:
    """The root of a local attestation PKI (a P-384 key and its self-signed certificate)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        _check_p384_key(key, "the root key")
        _check_p384_key(certificate.public_key(), "the root certificate's key")
        public = certificate.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        if public.public_numbers() != key.public_key().public_numbers():
            raise ConfigurationError("the root key does not belong to the root certificate")
        try:
            bc = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            raise ConfigurationError("the root certificate has no basicConstraints") from None
        if not bc.ca:
            raise ConfigurationError("the root certificate is not a CA certificate")
        self.key = key
        self.certificate = certificate
        self.certificate_der = certificate.public_bytes(serialization.Encoding.DER)

    @classmethod
    def generate(
        cls,
        now: dt.datetime | None = None,
        common_name: str = "virtio-nsm.local-root",
    ) -> CertificateAuthority:
        """A fresh root, valid for 30 years from ``now``."""
        now = _second(now or dt.datetime.now(dt.UTC))
        key = ec.generate_private_key(ec.SECP384R1())
        subject = _name(
            (NameOID.COUNTRY_NAME, "US"),
            (NameOID.ORGANIZATION_NAME, "virtio-nsm"),
            (NameOID.ORGANIZATIONAL_UNIT_NAME, "local"),
            (NameOID.COMMON_NAME, common_name),
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + ROOT_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(_ca_key_usage(), critical=True)
            .sign(key, _HASH)
        )
        return cls(key, cert)

    @classmethod
    def from_pem(cls, certificate_pem: bytes, key_pem: bytes) -> CertificateAuthority:
        """Bring your own root: a PEM certificate and its PEM (PKCS#8 or SEC1) key."""
        try:
            cert = x509.load_pem_x509_certificate(certificate_pem)
        except ValueError as exc:
            raise ConfigurationError(f"cannot read the root certificate: {exc}") from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"cannot read the root key: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigurationError("the root key must be an ECDSA P-384 key")
        return cls(key, cert)

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        """The root key, unencrypted PKCS#8 PEM: keep it private."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


@dataclass(frozen=True)
class _Issued:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    der: bytes

    @property
    def not_before(self) -> dt.datetime:
        return self.certificate.not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc


@dataclass(frozen=True)
class Signer:
    """What a document is signed with: the leaf key, its DER and the bundle above it."""

    key: ec.EllipticCurvePrivateKey
    certificate: bytes
    cabundle: tuple[bytes, ...]


@dataclass(frozen=True)
class _Level:
    lifetime: dt.timedelta
    path_length: int | None  # None marks the leaf


_LEVELS: Final = (
    _Level(REGIONAL_LIFETIME, 2),
    _Level(ZONAL_LIFETIME, 1),
    _Level(INSTANCE_LIFETIME, 0),
    _Level(LEAF_LIFETIME, None),
)


class SigningChain:
    """Regional, zonal and instance CAs plus the leaf, renewed on demand.

    ``signer(now)`` returns a leaf valid at ``now`` for at least
    ``LEAF_LIFETIME - LEAF_REUSE`` more, with every CA above it valid for the
    leaf's whole life (clamped to the root's own expiry).
    """

    def __init__(self, ca: CertificateAuthority, module_id: str, region: str = "local") -> None:
        self.ca = ca
        self.module_id = module_id
        self.region = region
        self._issued: list[_Issued] = []
        self._signer: Signer | None = None
        self._usable_from = self._renew_at = dt.datetime.min.replace(tzinfo=dt.UTC)

    def _subject(self, depth: int) -> x509.Name:
        tag = secrets.token_hex(8)
        instance = self.module_id.split("-enc", 1)[0]
        cn = (
            f"{tag}.{self.region}.virtio-nsm",
            f"{tag}.zonal.{self.region}.virtio-nsm",
            f"{instance}.{self.region}.virtio-nsm",
            f"{self.module_id}.{self.region}.virtio-nsm",
        )[depth]
        return _name(
            (NameOID.COUNTRY_NAME, "US"),
            (NameOID.ORGANIZATION_NAME, "virtio-nsm"),
            (NameOID.ORGANIZATIONAL_UNIT_NAME, "local"),
            (NameOID.COMMON_NAME, cn),
        )

    def _needs_renewal(self, depth: int, now: dt.datetime) -> bool:
        if depth >= len(self._issued):
            return True
        cert = self._issued[depth]
        if now < cert.not_before:
            return True
        if depth + 1 < len(_LEVELS):
            # A CA must outlive a child issued now.
            needed = min(now + _LEVELS[depth + 1].lifetime, self._parent_expiry(depth))
            return cert.not_after < needed
        return now >= cert.not_before + LEAF_REUSE or now >= cert.not_after

    def _parent_expiry(self, depth: int) -> dt.datetime:
        if depth == 0:
            return self.ca.certificate.not_valid_after_utc
        return self._issued[depth - 1].not_after

    def _issue(self, depth: int, now: dt.datetime) -> _Issued:
        level = _LEVELS[depth]
        if depth == 0:
            parent_key, parent_cert = self.ca.key, self.ca.certificate
        else:
            parent = self._issued[depth - 1]
            parent_key, parent_cert = parent.key, parent.certificate
        # Back-dated by a second so that a document dated within the first
        # second of a leaf is already outside that leaf's life 3 h later, even
        # for verifiers that compare at whole seconds.
        start = max(_second(now) - dt.timedelta(seconds=1), parent_cert.not_valid_before_utc)
        if start >= parent_cert.not_valid_after_utc or now < parent_cert.not_valid_before_utc:
            raise ConfigurationError(
                f"the CA certificate {parent_cert.subject.rfc4514_string()} is not valid at {now}"
            )
        end = min(start + level.lifetime, parent_cert.not_valid_after_utc)
        key = ec.generate_private_key(ec.SECP384R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(self._subject(depth))
            .issuer_name(parent_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
        )
        if level.path_length is None:
            builder = builder.add_extension(
                x509.BasicConstraints(ca=False, path_length=None), critical=True
            ).add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=True, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=False,
            )
        else:
            builder = (
                builder.add_extension(
                    x509.BasicConstraints(ca=True, path_length=level.path_length), critical=True
                )
                .add_extension(_ca_key_usage(), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(parent_key.public_key()),
                    critical=False,
                )
            )
        cert = builder.sign(parent_key, _HASH)
        return _Issued(key, cert, cert.public_bytes(serialization.Encoding.DER))

    def signer(self, now: dt.datetime) -> Signer:
        """The leaf to sign a document dated ``now`` with, renewing what must be renewed."""
        if self._signer is not None and self._usable_from <= now < self._renew_at:
            return self._signer
        renewed = False
        for depth in range(len(_LEVELS)):
            if renewed or self._needs_renewal(depth, now):
                del self._issued[depth:]
                self._issued.append(self._issue(depth, now))
                renewed = True
        leaf = self._issued[-1]
        if renewed or self._signer is None:
            bundle = (self.ca.certificate_der, *(i.der for i in self._issued[:-1]))
            self._signer = Signer(leaf.key, leaf.der, bundle)
        # Until this instant nothing needs renewal (the earliest of every
        # level's deadline); before _usable_from the clock went backwards.
        self._usable_from = max(i.not_before for i in self._issued)
        deadlines = [leaf.not_before + LEAF_REUSE, leaf.not_after]
        for depth in range(len(_LEVELS) - 1):
            cert = self._issued[depth]
            child = _LEVELS[depth + 1].lifetime
            if cert.not_after < self._parent_expiry(depth):
                deadlines.append(cert.not_after - child)
        self._renew_at = min(deadlines)
        return self._signer

    @property
    def chain(self) -> Sequence[x509.Certificate]:
        """The certificates issued so far, regional CA first."""
        return [i.certificate for i in self._issued]
