"""Any single-byte change to a valid document makes it invalid.

Every region is covered — the outer CBOR framing, the protected header (all
bytes), each payload field (key, head and value bytes) and the signature —
with sampled positions inside large regions to keep the suite fast.
"""

from __future__ import annotations

import datetime as dt
import os
import random

import pytest
from cryptography import x509
from verify_support import T0, Pki, document, encode_payload, load_aws, payload_fields, sign

from virtio_nsm import cbor, cose
from virtio_nsm.verify import OPTIONAL_FIELDS, REQUIRED_FIELDS, VerificationError, verify_document

MASKS = (0x01, 0x80, 0xFF)
SAMPLES_PER_FIELD = 24


def regions(doc: bytes) -> dict[str, range]:
    """Byte ranges of each part of an untagged COSE_Sign1 document."""
    sign1 = cose.decode_sign1(doc)
    prot_at = doc.index(cbor.bstr(sign1.protected)) + len(cbor.bstr(sign1.protected)) - 4
    payload_head = cbor.bstr(sign1.payload)[: -len(sign1.payload)]
    pay_at = doc.index(payload_head + sign1.payload[:8]) + len(payload_head)
    sig_at = len(doc) - len(sign1.signature)
    result = {
        "outer framing": range(0, prot_at),
        "protected header": range(prot_at, prot_at + 4),
        "unprotected header and payload head": range(prot_at + 4, pay_at),
        "signature head": range(pay_at + len(sign1.payload), sig_at),
        "signature": range(sig_at, len(doc)),
    }
    payload = sign1.payload
    starts = []
    for name in (*REQUIRED_FIELDS, *OPTIONAL_FIELDS):
        starts.append((payload.index(cbor.tstr(name)), name))
    starts.sort()
    result["payload map head"] = range(pay_at, pay_at + starts[0][0])
    for i, (start, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(payload)
        result[f"payload {name}"] = range(pay_at + start, pay_at + end)
    return result


def positions(region: range, rng: random.Random) -> list[int]:
    if len(region) <= SAMPLES_PER_FIELD:
        return list(region)
    # Both ends (heads, key bytes, last value byte) plus a random spread.
    fixed = list(region[:6]) + list(region[-3:])
    rest = [p for p in region if p not in fixed]
    return fixed + rng.sample(rest, SAMPLES_PER_FIELD - len(fixed))


def assert_all_mutations_rejected(doc: bytes, at: dt.datetime, roots: list[x509.Certificate] | None) -> int:
    verify_document(doc, roots=roots, at=at)  # the original is valid
    rng = random.Random(0x5EED)
    found = regions(doc)
    covered = sorted(p for r in found.values() for p in r)
    assert covered == list(range(len(doc))), "regions must tile the document"
    count = 0
    for name, region in found.items():
        for pos in positions(region, rng):
            for mask in MASKS:
                mutated = bytearray(doc)
                mutated[pos] ^= mask
                with pytest.raises(VerificationError) as info:
                    verify_document(bytes(mutated), roots=roots, at=at)
                assert not any("internal error" in r for r in info.value.reasons), (name, pos)
                count += 1
    return count


def test_mutations_of_real_document() -> None:
    doc = load_aws("nitrite_production.b64")
    assert assert_all_mutations_rejected(doc.raw, doc.at, None) > 500


def test_mutations_of_local_document(pki: Pki) -> None:
    doc = document(pki, nonce=b"n" * 32, user_data=b"u" * 64, public_key=b"k" * 97)
    assert assert_all_mutations_rejected(doc, T0, [pki.root]) > 500


def test_every_signature_bit(pki: Pki) -> None:
    doc = document(pki)
    sig_at = len(doc) - 96
    for pos in range(sig_at, len(doc)):
        for bit in range(8):
            mutated = bytearray(doc)
            mutated[pos] ^= 1 << bit
            with pytest.raises(VerificationError):
                verify_document(bytes(mutated), roots=[pki.root], at=T0)


def test_mutated_certificates_in_a_resigned_payload(pki: Pki) -> None:
    # The leaf key re-signs each payload, so only the certificate checks stand
    # between a changed certificate byte and acceptance.
    base = payload_fields(pki)
    rng = random.Random(7)
    count = 0
    for slot in ("certificate", 0, 1, 2, 3):
        original = base["certificate"] if slot == "certificate" else base["cabundle"][slot]
        tail = range(len(original) - 110, len(original))  # signature algorithm and value
        picks = sorted({*range(12), *rng.sample(range(len(original)), 30), *rng.sample(tail, 12)})
        for pos in picks:
            changed = bytearray(original)
            changed[pos] ^= 0x01
            fields = dict(base, cabundle=list(base["cabundle"]))
            if slot == "certificate":
                fields["certificate"] = bytes(changed)
            else:
                fields["cabundle"][slot] = bytes(changed)
            with pytest.raises(VerificationError) as info:
                verify_document(sign(pki.leaf_key, encode_payload(fields)), roots=[pki.root], at=T0)
            assert not any("internal error" in r for r in info.value.reasons), (slot, pos)
            count += 1
    assert count > 200


@pytest.mark.skipif(
    not os.environ.get("VERIFY_EXHAUSTIVE"), reason="set VERIFY_EXHAUSTIVE=1 (about a minute)"
)
@pytest.mark.parametrize("name", ["nitrite_production.b64", "evervault_debug.b64"])
# Some mutated serial numbers are negative: cryptography warns, we reject.
@pytest.mark.filterwarnings("ignore:Parsed a serial number")
def test_every_byte_of_real_documents(name: str) -> None:
    doc = load_aws(name)
    for pos in range(len(doc.raw)):
        for mask in MASKS:
            mutated = bytearray(doc.raw)
            mutated[pos] ^= mask
            with pytest.raises(VerificationError) as info:
                verify_document(bytes(mutated), at=doc.at)
            assert not any("internal error" in r for r in info.value.reasons), pos
