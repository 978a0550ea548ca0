"""COSE_Sign1 (RFC 9052) primitives for ES384, as Nitro attestation uses them.

This is the low layer: building and splitting the four-element structure and
converting signatures. Nothing here decides whether a document is trusted;
:mod:`virtio_nsm.verify` does that on top.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from . import _strict_cbor, cbor

#: The protected header every Nitro document carries: bstr-wrapped ``{1: -35}`` (ES384, RFC 9053).
PROTECTED_ES384 = b"\xa1\x01\x38\x22"
#: CBOR tag of COSE_Sign1 (documents may carry it or not).
TAG_COSE_SIGN1 = 18
#: Length of one P-384 signature coordinate.
P384_COORDINATE_SIZE = 48

_SIG1_CONTEXT = cbor.tstr("Signature1")
#: The one tag a document may carry, around the whole structure.
_OUTER_TAGS = frozenset({TAG_COSE_SIGN1})


class CoseError(ValueError):
    """The bytes are not a well-formed COSE_Sign1 structure."""


def sig_structure(protected: bytes, payload: bytes, external_aad: bytes = b"") -> bytes:
    """The ``Sig_structure`` that is actually signed (RFC 9052 §4.4)."""
    return (
        cbor.array_head(4)
        + _SIG1_CONTEXT
        + cbor.bstr(protected)
        + cbor.bstr(external_aad)
        + cbor.bstr(payload)
    )


def der_to_raw(der_signature: bytes, size: int = P384_COORDINATE_SIZE) -> bytes:
    """DER ``ECDSA-Sig-Value`` to the fixed-size ``r || s`` form COSE uses."""
    r, s = decode_dss_signature(der_signature)
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def raw_to_der(raw_signature: bytes) -> bytes:
    """Fixed-size ``r || s`` to DER; the length must be even."""
    if len(raw_signature) % 2:
        raise CoseError("raw ECDSA signature has an odd length")
    half = len(raw_signature) // 2
    r = int.from_bytes(raw_signature[:half], "big")
    s = int.from_bytes(raw_signature[half:], "big")
    return encode_dss_signature(r, s)


def encode_sign1(protected: bytes, payload: bytes, signature: bytes) -> bytes:
    """An untagged COSE_Sign1 with an empty unprotected header."""
    return (
        cbor.array_head(4)
        + cbor.bstr(protected)
        + cbor.map_head(0)
        + cbor.bstr(payload)
        + cbor.bstr(signature)
    )


def sign_es384(key: ec.EllipticCurvePrivateKey, payload: bytes) -> bytes:
    """Sign ``payload`` with ``key`` (P-384) and return the untagged COSE_Sign1."""
    if not isinstance(key.curve, ec.SECP384R1):
        raise ValueError("ES384 needs a P-384 key")
    der = key.sign(sig_structure(PROTECTED_ES384, payload), ec.ECDSA(hashes.SHA384()))
    return encode_sign1(PROTECTED_ES384, payload, der_to_raw(der))


@dataclass(frozen=True)
class Sign1:
    """The four parts of a COSE_Sign1, not yet checked for meaning."""

    protected: bytes
    unprotected: dict[Any, Any]
    payload: bytes
    signature: bytes
    tagged: bool

    def to_be_signed(self) -> bytes:
        return sig_structure(self.protected, self.payload)


def split_sign1(data: bytes) -> tuple[list[Any], bool]:
    """Decode the outer structure of a COSE_Sign1 without checking its parts.

    Returns the four elements, whatever their types, and whether tag 18 was
    present; raises :class:`CoseError` when the bytes are not one CBOR item
    (trailing bytes are an error: a signed object has exactly one encoding), carry
    another tag, or are not a 4-element array. :func:`sign1_problems` then says
    what is wrong with the elements, so a caller can report every problem at once.
    """
    # The strict reader: no tag semantics (no shared references, tags 28/29,
    # that would let a small unprotected header expand exponentially), linear cost.
    try:
        item, tag, _ = _strict_cbor.decode(data, tags=_OUTER_TAGS)
    except _strict_cbor.TrailingBytes as exc:
        raise CoseError(f"{exc.count} trailing bytes after the COSE_Sign1") from None
    except _strict_cbor.StrictCborError as exc:
        raise CoseError(f"not valid CBOR: {exc}") from None
    except RecursionError:  # not reachable with the default depth; fail closed
        raise CoseError("not valid CBOR: nested too deeply") from None
    tagged = tag == TAG_COSE_SIGN1
    if not isinstance(item, list) or len(item) != 4:
        raise CoseError("a COSE_Sign1 is an array of 4 elements")
    return list(item), tagged


def sign1_problems(parts: list[Any]) -> list[str]:
    """What is wrong with the types of the four elements from :func:`split_sign1`."""
    protected, unprotected, payload, signature = parts
    problems = []
    if not isinstance(protected, bytes):
        problems.append("protected header is not a byte string")
    if not isinstance(unprotected, Mapping):
        problems.append("unprotected header is not a map")
    if not isinstance(payload, bytes):
        problems.append("payload is not a byte string (detached payloads are not supported)")
    if not isinstance(signature, bytes):
        problems.append("signature is not a byte string")
    return problems


def decode_sign1(data: bytes) -> Sign1:
    """Split a COSE_Sign1 (untagged or tag 18); raise :class:`CoseError` if malformed."""
    parts, tagged = split_sign1(data)
    problems = sign1_problems(parts)
    if problems:
        raise CoseError("; ".join(problems))
    protected, unprotected, payload, signature = parts
    return Sign1(protected, dict(unprotected), payload, signature, tagged)


def verify_es384(key: ec.EllipticCurvePublicKey, protected: bytes, payload: bytes, signature: bytes) -> bool:
    """Whether ``signature`` (raw ``r || s``) is a valid ES384 signature by ``key``.

    Only the signature is checked: the caller decides whether ``protected`` is
    acceptable and whether ``key`` is trusted.
    """
    if not isinstance(key.curve, ec.SECP384R1) or len(signature) != 2 * P384_COORDINATE_SIZE:
        return False
    try:
        key.verify(raw_to_der(signature), sig_structure(protected, payload), ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        return False
    return True


# --- ECDSA on any of the three COSE curves (EIF signatures) ----------------
# Nitro attestation is always ES384; an enclave image may be signed with a
# P-256, P-384 or P-521 key, and the algorithm follows the key's curve (as in
# AWS's COSE library): ES256 / ES384 / ES512 with SHA-256 / 384 / 512.

ALG_ES256 = -7
ALG_ES384 = -35
ALG_ES512 = -36


@dataclass(frozen=True)
class EcdsaAlgorithm:
    """A COSE ECDSA algorithm: its identifier, hash and signature coordinate size."""

    alg: int
    name: str
    curve: str
    hash: type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]
    coordinate_size: int

    @property
    def protected(self) -> bytes:
        """The protected header ``{1: alg}`` as it is signed (bstr contents)."""
        return cbor.map_head(1) + cbor.uint(1) + cbor.head(cbor.MAJOR_NINT, -1 - self.alg)


ECDSA_ALGORITHMS: tuple[EcdsaAlgorithm, ...] = (
    EcdsaAlgorithm(ALG_ES256, "ES256", "secp256r1", hashes.SHA256, 32),
    EcdsaAlgorithm(ALG_ES384, "ES384", "secp384r1", hashes.SHA384, 48),
    EcdsaAlgorithm(ALG_ES512, "ES512", "secp521r1", hashes.SHA512, 66),
)


def ecdsa_algorithm(curve: ec.EllipticCurve) -> EcdsaAlgorithm:
    """The COSE algorithm for a key on ``curve``; ValueError for other curves."""
    for algorithm in ECDSA_ALGORITHMS:
        if algorithm.curve == curve.name:
            return algorithm
    raise ValueError(f"no COSE ECDSA algorithm for curve {curve.name} (P-256, P-384 or P-521 only)")


def sign_ecdsa(key: ec.EllipticCurvePrivateKey, payload: bytes) -> bytes:
    """An untagged COSE_Sign1 of ``payload``, protected header ``{1: alg}`` from the key's curve."""
    algorithm = ecdsa_algorithm(key.curve)
    der = key.sign(sig_structure(algorithm.protected, payload), ec.ECDSA(algorithm.hash()))
    return encode_sign1(algorithm.protected, payload, der_to_raw(der, algorithm.coordinate_size))


def verify_ecdsa(
    key: ec.EllipticCurvePublicKey, alg: int, protected: bytes, payload: bytes, signature: bytes
) -> bool:
    """Whether ``signature`` (raw ``r || s``) signs the Sig_structure with ``key`` under ``alg``.

    ``alg`` must be the algorithm of the key's curve (a signature claiming
    another algorithm is not valid for this key).
    """
    try:
        algorithm = ecdsa_algorithm(key.curve)
    except ValueError:
        return False
    if algorithm.alg != alg or len(signature) != 2 * algorithm.coordinate_size:
        return False
    try:
        key.verify(raw_to_der(signature), sig_structure(protected, payload), ec.ECDSA(algorithm.hash()))
    except InvalidSignature:
        return False
    return True
