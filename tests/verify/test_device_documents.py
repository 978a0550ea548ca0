"""Documents from our own device (virtio_nsm.NsmDevice) against the verifier."""

from __future__ import annotations

import datetime as dt
import hashlib

import cbor2
import pytest
from support import FakeClock
from verify_support import der

from virtio_nsm import Nsm, NsmDevice, VerificationError, cbor, verify_document
from virtio_nsm.verify import load_pem_roots


def at(clock: FakeClock) -> dt.datetime:
    return dt.datetime.fromtimestamp(clock.now, dt.UTC)


@pytest.fixture
def dev() -> tuple[NsmDevice, FakeClock]:
    clock = FakeClock()
    return NsmDevice(module_id="i-0123456789abcdef0-enc0123456789abcdef", clock=clock), clock


def test_device_document_verifies_against_its_root(dev: tuple[NsmDevice, FakeClock]) -> None:
    device, clock = dev
    roots = load_pem_roots(device.root_certificate_pem)
    with Nsm.local(device) as nsm:
        doc = nsm.attestation(user_data=b"hello", nonce=b"\x01" * 32, public_key=b"key")
    result = verify_document(doc, roots=roots, at=at(clock), nonce=b"\x01" * 32, max_age=0)
    assert result.module_id == "i-0123456789abcdef0-enc0123456789abcdef"
    assert (result.user_data, result.public_key) == (b"hello", b"key")
    assert result.digest == "SHA384"
    assert sorted(result.pcrs) == list(range(16))
    assert der(result.chain[-1]) == der(roots[0])
    assert len(result.chain) == 5


def test_device_document_is_not_trusted_by_the_aws_root(dev: tuple[NsmDevice, FakeClock]) -> None:
    device, clock = dev
    with Nsm.local(device) as nsm:
        doc = nsm.attestation()
    with pytest.raises(VerificationError) as info:
        verify_document(doc, at=at(clock))
    assert "cabundle[0] is neither a trusted root nor issued by one" in info.value.reasons
    other = NsmDevice(clock=clock)
    with pytest.raises(VerificationError):
        verify_document(doc, roots=load_pem_roots(other.root_certificate_pem), at=at(clock))


def test_raw_request_through_handle(dev: tuple[NsmDevice, FakeClock]) -> None:
    device, clock = dev
    request = (
        cbor.map_head(1)
        + cbor.tstr("Attestation")
        + cbor.map_head(3)
        + cbor.tstr("user_data")
        + cbor.NULL
        + cbor.tstr("nonce")
        + cbor.bstr(b"n")
        + cbor.tstr("public_key")
        + cbor.NULL
    )
    response = device.handle(request)
    head = cbor.map_head(1) + cbor.tstr("Attestation") + cbor.map_head(1) + cbor.tstr("document")
    assert response.startswith(head)
    document = cbor2.loads(response)["Attestation"]["document"]
    result = verify_document(
        document, roots=load_pem_roots(device.root_certificate_pem), at=at(clock), nonce=b"n"
    )
    assert (result.user_data, result.public_key) == (None, None)


def test_locked_pcr_policy(dev: tuple[NsmDevice, FakeClock]) -> None:
    device, clock = dev
    roots = load_pem_roots(device.root_certificate_pem)
    with Nsm.local(device) as nsm:
        nsm.extend_pcr(16, b"measurement")
        nsm.lock_pcr(16)
        doc = nsm.attestation()
    expected16 = hashlib.sha384(bytes(48) + b"measurement").digest()
    result = verify_document(doc, roots=roots, at=at(clock), expected_pcrs={16: expected16})
    assert result.pcrs[16] == expected16
    with pytest.raises(VerificationError) as info:
        verify_document(doc, roots=roots, at=at(clock), expected_pcrs={16: bytes(48), 17: bytes(48)})
    assert info.value.reasons[0].startswith("PCR16 is ")
    assert info.value.reasons[1] == "PCR17 is not in the document"


@pytest.mark.parametrize("digest", ["SHA256", "SHA512"])
def test_other_digests(digest: str) -> None:
    clock = FakeClock()
    device = NsmDevice(clock=clock, digest=digest)
    with Nsm.local(device) as nsm:
        doc = nsm.attestation()
    result = verify_document(doc, roots=load_pem_roots(device.root_certificate_pem), at=at(clock))
    assert result.digest == digest
    assert {len(v) for v in result.pcrs.values()} == {32 if digest == "SHA256" else 64}


def test_age_and_expiry_over_time(dev: tuple[NsmDevice, FakeClock]) -> None:
    device, clock = dev
    roots = load_pem_roots(device.root_certificate_pem)
    with Nsm.local(device) as nsm:
        doc = nsm.attestation()
        made = at(clock)
        clock.advance(3600)
        later = nsm.attestation()  # signed by a renewed leaf
    verify_document(doc, roots=roots, at=made + dt.timedelta(minutes=10), max_age=600)
    with pytest.raises(VerificationError, match="older than the allowed 600 s"):
        verify_document(doc, roots=roots, at=made + dt.timedelta(minutes=10, seconds=1), max_age=600)
    verify_document(later, roots=roots, at=at(clock), max_age=0)
    with pytest.raises(VerificationError, match="expired"):
        verify_document(doc, roots=roots, at=made + dt.timedelta(hours=4))


def test_device_document_mutations(dev: tuple[NsmDevice, FakeClock]) -> None:
    device, clock = dev
    roots = load_pem_roots(device.root_certificate_pem)
    with Nsm.local(device) as nsm:
        doc = nsm.attestation(nonce=b"x" * 16)
    step = max(1, len(doc) // 300)
    for pos in [*range(0, 16), *range(16, len(doc), step), *range(len(doc) - 96, len(doc))]:
        mutated = bytearray(doc)
        mutated[pos] ^= 0x41
        with pytest.raises(VerificationError):
            verify_document(bytes(mutated), roots=roots, at=at(clock))
