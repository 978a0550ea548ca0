"""Attestation documents: the signed payload of an Attestation response.

The payload is a CBOR map whose keys come in the order AWS's documents use
(module_id, digest, timestamp, pcrs, certificate, cabundle, public_key,
user_data, nonce); absent optional fields are ``null``. It is wrapped in an
untagged COSE_Sign1 signed ES384 by the leaf of a :class:`SigningChain`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from .. import cbor, cose
from .pki import Signer

_K: Final = {
    name: cbor.tstr(name)
    for name in ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle",
                 "public_key", "user_data", "nonce")
}


def _optional(value: bytes | None) -> bytes:
    return cbor.NULL if value is None else cbor.bstr(value)


def encode_payload(
    *,
    module_id: str,
    digest: str,
    timestamp_ms: int,
    pcrs: Iterable[tuple[int, bytes]],
    certificate: bytes,
    cabundle: Iterable[bytes],
    public_key: bytes | None,
    user_data: bytes | None,
    nonce: bytes | None,
) -> bytes:
    """The document payload, byte for byte as the real device lays it out."""
    pcr_items = list(pcrs)
    bundle = list(cabundle)
    return b"".join((
        cbor.map_head(9),
        _K["module_id"], cbor.tstr(module_id),
        _K["digest"], cbor.tstr(digest),
        _K["timestamp"], cbor.uint(timestamp_ms),
        _K["pcrs"], cbor.map_head(len(pcr_items)),
        *(cbor.uint(i) + cbor.bstr(v) for i, v in pcr_items),
        _K["certificate"], cbor.bstr(certificate),
        _K["cabundle"], cbor.array_head(len(bundle)), *(cbor.bstr(c) for c in bundle),
        _K["public_key"], _optional(public_key),
        _K["user_data"], _optional(user_data),
        _K["nonce"], _optional(nonce),
    ))


def sign_document(
    signer: Signer,
    *,
    module_id: str,
    digest: str,
    timestamp_ms: int,
    pcrs: Iterable[tuple[int, bytes]],
    public_key: bytes | None = None,
    user_data: bytes | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """A complete attestation document (untagged COSE_Sign1, ES384)."""
    payload = encode_payload(
        module_id=module_id, digest=digest, timestamp_ms=timestamp_ms, pcrs=pcrs,
        certificate=signer.certificate, cabundle=signer.cabundle,
        public_key=public_key, user_data=user_data, nonce=nonce,
    )
    return cose.sign_es384(signer.key, payload)
