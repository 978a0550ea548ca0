"""What a user reads when a document is refused: the reason first, no Python reprs, a hint."""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.serialization import Encoding
from verify_support import Pki, load_aws

from virtio_nsm import NsmDevice
from virtio_nsm.cli import main
from virtio_nsm.client import Nsm
from virtio_nsm.verify import VerificationError, verify_document


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def prod(tmp_path: Path) -> Path:
    path = tmp_path / "prod.b64"
    path.write_bytes(base64.b64encode(load_aws("nitrite_production.b64").raw))
    return path


def test_wrong_root_leads_with_the_missing_anchor(pki: Pki) -> None:
    doc = load_aws("nitrite_production.b64")
    with pytest.raises(VerificationError) as info:
        verify_document(doc.raw, roots=[pki.root], at=doc.at)
    assert info.value.reasons[0] == "cabundle[0] is neither a trusted root nor issued by one"
    assert not any("candidates exhausted" in r or "max depth" in r for r in info.value.reasons)


def test_reasons_at_a_late_time_name_certificates_without_reprs() -> None:
    doc = load_aws("nitrite_production.b64")
    with pytest.raises(VerificationError) as info:
        verify_document(doc.raw, at=doc.at + dt.timedelta(hours=6))
    reasons = info.value.reasons
    assert reasons[0].startswith("leaf certificate expired at ")
    assert not any("<Certificate" in r or "<Name" in r for r in reasons), reasons
    validator = [r for r in reasons if r.startswith("X.509 path validation failed")]
    assert validator and "the leaf certificate (CN=i-0a22e5c5f24d22174" in validator[0]


def test_cli_wrong_root_hint_names_both_roots(prod: Path, pki: Pki, tmp_path: Path) -> None:
    root = tmp_path / "root.pem"
    root.write_bytes(pki.root.public_bytes(Encoding.PEM))
    at = "2024-09-07T14:37:39.545Z"
    code, _, err = run("verify", str(prod), "--at", at, "--root", str(root))
    assert code == 1
    lines = err.splitlines()
    assert lines[1] == "  - cabundle[0] is neither a trusted root nor issued by one"
    hint = next(line for line in lines if line.startswith("hint: "))
    assert "CN=aws.nitro-enclaves" in hint and pki.root.subject.rfc4514_string() in hint
    assert "nsm ca root" in hint


def test_cli_at_reasons_have_no_reprs(prod: Path) -> None:
    code, _, err = run("verify", str(prod), "--at", "2024-09-07T20:37:39Z")
    assert code == 1
    assert "<Certificate" not in err and "<Name" not in err
    assert err.splitlines()[1].startswith("  - leaf certificate expired")


def test_unlocked_pcr_hint(tmp_path: Path) -> None:
    device = NsmDevice()
    with Nsm.local(device) as nsm:
        nsm.extend_pcr(16, b"app")
        unlocked = nsm.attestation()
        nsm.lock_pcr(16)
        value = nsm.describe_pcr(16).data
        locked = nsm.attestation()
    root = tmp_path / "root.pem"
    root.write_bytes(device.root_certificate_pem)
    for name, data in (("unlocked", unlocked), ("locked", locked)):
        (tmp_path / name).write_bytes(data)
    args = ["--root", str(root), "--pcr", f"16={value.hex()}"]
    code, _, err = run("verify", str(tmp_path / "unlocked"), *args)
    assert code == 1
    assert "PCR16 is not in the document" in err
    assert "hint: documents carry only locked PCRs" in err and "nsm pcr lock 16" in err
    assert run("verify", str(tmp_path / "locked"), *args)[0] == 0
