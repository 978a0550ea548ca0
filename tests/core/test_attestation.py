"""Attestation documents and the local PKI."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError
from support import FakeClock

from virtio_nsm import CertificateAuthority, ConfigurationError, Nsm, NsmDevice, persist
from virtio_nsm.cose import raw_to_der
from virtio_nsm.nsm import pki

KEYS = ["module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle", "public_key",
        "user_data", "nonce"]


def parts(document: bytes) -> tuple[list[object], dict[str, object]]:
    outer = cbor2.loads(document)
    return outer, cbor2.loads(outer[2])


def path_verify(root_pem: bytes, payload: dict, at: dt.datetime) -> list[x509.Certificate]:
    """An independent check: cryptography's X.509 path validation (facts §4 policy)."""
    root = x509.load_pem_x509_certificate(root_pem)
    leaf = x509.load_der_x509_certificate(payload["certificate"])
    intermediates = [x509.load_der_x509_certificate(c) for c in payload["cabundle"][1:]]
    verifier = (
        PolicyBuilder().store(Store([root])).time(at)
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                            ee_policy=ExtensionPolicy.permit_all())
        .build_client_verifier()
    )
    return list(verifier.verify(leaf, intermediates).chain)


def signature_ok(outer: list, payload: dict) -> bool:
    leaf = x509.load_der_x509_certificate(payload["certificate"])
    key = leaf.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    to_sign = cbor2.dumps(["Signature1", outer[0], b"", outer[2]])
    try:
        key.verify(raw_to_der(outer[3]), to_sign, ec.ECDSA(hashes.SHA384()))
    except Exception:
        return False
    return True


def test_document_shape(device: NsmDevice, clock: FakeClock) -> None:
    nsm = Nsm.local(device)
    nsm.extend_pcr(16, b"x")
    nsm.lock_pcr(16)
    doc = nsm.attestation(user_data=b"ud", nonce=b"\x00\x01", public_key=None)
    outer, payload = parts(doc)
    assert doc[:1] == b"\x84"  # untagged COSE_Sign1
    assert outer[0] == bytes.fromhex("a1013822") and outer[1] == {} and len(outer[3]) == 96
    assert list(payload) == KEYS
    assert payload["module_id"] == "i-0123456789abcdef0-enc0123456789abcdef"
    assert payload["digest"] == "SHA384"
    assert payload["timestamp"] == int(clock.now * 1000)
    assert list(payload["pcrs"]) == [*range(16), 16]  # exactly the locked PCRs, ascending
    assert payload["pcrs"][16] == nsm.describe_pcr(16).data
    assert payload["public_key"] is None and payload["user_data"] == b"ud"
    assert payload["nonce"] == b"\x00\x01"
    assert payload["cabundle"][0] == x509.load_pem_x509_certificate(
        device.root_certificate_pem).public_bytes(serialization.Encoding.DER)
    assert len(payload["cabundle"]) == 4
    assert signature_ok(outer, payload)


def test_text_fields_become_bytes(device: NsmDevice) -> None:
    req = cbor2.dumps({"Attestation": {"user_data": "hello", "nonce": "", "public_key": None}})
    resp = cbor2.loads(device.handle(req))
    _, payload = parts(resp["Attestation"]["document"])
    assert payload["user_data"] == b"hello" and payload["nonce"] == b"" and payload["public_key"] is None


def test_chain_verifies_at_document_time_and_not_3h_later(device: NsmDevice, clock: FakeClock) -> None:
    _, payload = parts(Nsm.local(device).attestation(nonce=b"n"))
    at = dt.datetime.fromtimestamp(payload["timestamp"] / 1000, dt.UTC)
    chain = path_verify(device.root_certificate_pem, payload, at)
    assert len(chain) == 5
    with pytest.raises(VerificationError):
        path_verify(device.root_certificate_pem, payload, at + dt.timedelta(hours=3))
    with pytest.raises(VerificationError):
        path_verify(CertificateAuthority.generate().certificate_pem, payload, at)


def test_chain_shape_like_aws(device: NsmDevice) -> None:
    _, payload = parts(Nsm.local(device).attestation())
    certs = [x509.load_der_x509_certificate(c) for c in [*payload["cabundle"], payload["certificate"]]]
    expected_path = [None, 2, 1, 0]
    for cert, path_len in zip(certs[:4], expected_path, strict=True):
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical and bc.value.ca and bc.value.path_length == path_len
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert ku.critical and ku.value.key_cert_sign
    leaf = certs[4]
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    lifetimes = [c.not_valid_after_utc - c.not_valid_before_utc for c in certs[1:]]
    assert lifetimes == [pki.REGIONAL_LIFETIME, pki.ZONAL_LIFETIME, pki.INSTANCE_LIFETIME,
                         pki.LEAF_LIFETIME]
    for cert in certs:
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP384R1)
        assert cert.signature_hash_algorithm is not None
        assert cert.signature_hash_algorithm.name == "sha384"


def test_leaf_reused_then_renewed(device: NsmDevice, clock: FakeClock) -> None:
    nsm = Nsm.local(device)
    first = parts(nsm.attestation())[1]
    clock.advance(30)
    second = parts(nsm.attestation())[1]
    assert second["certificate"] == first["certificate"]
    clock.advance(31)
    third = parts(nsm.attestation())[1]
    assert third["certificate"] != first["certificate"]
    assert third["cabundle"] == first["cabundle"]  # the CAs above stay


def test_chain_stays_valid_over_weeks(device: NsmDevice, clock: FakeClock) -> None:
    nsm = Nsm.local(device)
    seen_regional = set()
    for _ in range(40):  # 40 x 13 h: every level is renewed at least once
        clock.advance(13 * 3600)
        _, payload = parts(nsm.attestation())
        at = dt.datetime.fromtimestamp(payload["timestamp"] / 1000, dt.UTC)
        chain = path_verify(device.root_certificate_pem, payload, at)
        for cert in chain:  # each certificate outlives the document's leaf
            assert cert.not_valid_after_utc >= chain[0].not_valid_after_utc
        seen_regional.add(payload["cabundle"][1])
    assert len(seen_regional) >= 2


def test_bring_your_own_root(tmp_path: Path, clock: FakeClock) -> None:
    ca = CertificateAuthority.generate(now=dt.datetime.fromtimestamp(clock.now, dt.UTC), common_name="my root")
    persist.save_ca(ca, tmp_path / "ca")
    key_mode = stat.S_IMODE(os.stat(tmp_path / "ca" / persist.ROOT_KEY_FILE).st_mode)
    assert key_mode == 0o600
    loaded = persist.load_ca(tmp_path / "ca")
    assert loaded.certificate_pem == ca.certificate_pem
    with pytest.raises(ConfigurationError):
        persist.save_ca(ca, tmp_path / "ca")  # never overwrite
    device = NsmDevice(ca=loaded, clock=clock)
    _, payload = parts(Nsm.local(device).attestation())
    path_verify(ca.certificate_pem, payload, dt.datetime.fromtimestamp(clock.now, dt.UTC))


def test_rejected_roots(tmp_path: Path) -> None:
    other = CertificateAuthority.generate()
    mine = CertificateAuthority.generate()
    with pytest.raises(ConfigurationError, match="does not belong"):
        CertificateAuthority(other.key, mine.certificate)
    p256 = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ConfigurationError, match="P-384"):
        CertificateAuthority(p256, mine.certificate)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        CertificateAuthority.from_pem(b"not a pem", b"")
    with pytest.raises(ConfigurationError, match="cannot read"):
        persist.load_ca(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / persist.ROOT_CERT_FILE).write_bytes(mine.certificate_pem)
    (tmp_path / "bad" / persist.ROOT_KEY_FILE).write_bytes(b"garbage")
    with pytest.raises(ConfigurationError, match="root key"):
        persist.load_ca(tmp_path / "bad")


def test_expired_root_gives_internal_error_not_a_bad_document(clock: FakeClock) -> None:
    ca = CertificateAuthority.generate(now=dt.datetime.fromtimestamp(clock.now, dt.UTC))
    device = NsmDevice(ca=ca, clock=clock)
    clock.advance(31 * 365 * 86400)
    resp = cbor2.loads(device.handle(cbor2.dumps({"Attestation": {}})))
    assert resp == {"Error": "InternalError"}
