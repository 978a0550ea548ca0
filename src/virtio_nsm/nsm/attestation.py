"""Attestation documents: the signed payload of an Attestation response.

The payload is a CBOR map whose keys come in the order AWS's documents use
(module_id, digest, timestamp, pcrs, certificate, cabundle, public_key,
user_data, nonce); absent optional fields are ``null``. It is wrapped in an
untagged COSE_Sign1 signed ES384 by the leaf of a :class:`SigningChain`.

Only the timestamp, the PCR map and the three request fields change between
documents; :class:`DocumentEncoder` keeps the encoded fixed parts, so a
document costs one signature and a few concatenations.
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


def encode_pcrs(pcrs: Iterable[tuple[int, bytes]]) -> bytes:
    """The ``pcrs`` map value: index -> value, in the order given (ascending)."""
    items = list(pcrs)
    return cbor.map_head(len(items)) + b"".join(cbor.uint(i) + cbor.bstr(v) for i, v in items)


def encode_chain(signer: Signer) -> bytes:
    """The ``certificate`` and ``cabundle`` entries, keys included."""
    return b"".join((
        _K["certificate"], cbor.bstr(signer.certificate),
        _K["cabundle"], cbor.array_head(len(signer.cabundle)),
        *(cbor.bstr(c) for c in signer.cabundle),
    ))


def _prefix(module_id: str, digest: str) -> bytes:
    return cbor.map_head(9) + _K["module_id"] + cbor.tstr(module_id) + _K["digest"] + cbor.tstr(digest)


def _assemble(prefix: bytes, timestamp_ms: int, pcrs: bytes, chain: bytes,
              public_key: bytes | None, user_data: bytes | None, nonce: bytes | None) -> bytes:
    return b"".join((
        prefix, _K["timestamp"], cbor.uint(timestamp_ms), _K["pcrs"], pcrs, chain,
        _K["public_key"], _optional(public_key),
        _K["user_data"], _optional(user_data),
        _K["nonce"], _optional(nonce),
    ))


class DocumentEncoder:
    """Builds and signs documents for one module id and digest, caching the fixed parts."""

    def __init__(self, module_id: str, digest: str) -> None:
        self._prefix = _prefix(module_id, digest)
        self._signer: Signer | None = None
        self._chain = b""
        self._pcrs_key: object = None
        self._pcrs = b""

    def sign(
        self,
        signer: Signer,
        timestamp_ms: int,
        pcrs: Iterable[tuple[int, bytes]],
        *,
        pcrs_key: object = None,
        public_key: bytes | None = None,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
    ) -> bytes:
        """A complete document (untagged COSE_Sign1, ES384).

        ``pcrs_key`` is an optional immutable token for ``pcrs``: while it is
        the same object as last time, the encoded PCR map is reused.
        """
        if signer is not self._signer:
            self._signer, self._chain = signer, encode_chain(signer)
        if pcrs_key is None or pcrs_key is not self._pcrs_key:
            self._pcrs, self._pcrs_key = encode_pcrs(pcrs), pcrs_key
        payload = _assemble(self._prefix, timestamp_ms, self._pcrs, self._chain,
                            public_key, user_data, nonce)
        return cose.sign_es384(signer.key, payload)
