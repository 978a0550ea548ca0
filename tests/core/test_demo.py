"""`nsm demo`, the README's main job, end to end (vhost-user + verifier)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from virtio_nsm import verify_document
from virtio_nsm.cli import main


def test_demo_passes_and_writes_a_verifiable_document(tmp_path: Path) -> None:
    from cryptography import x509

    out = tmp_path / "doc.cose"
    result = CliRunner().invoke(main, ["demo", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "demo passed" in result.output
    for request in ("DescribeNSM", "DescribePCR", "ExtendPCR", "LockPCR", "LockPCRs", "GetRandom", "Attestation"):
        assert request in result.output
    root = x509.load_pem_x509_certificate((tmp_path / "doc.cose.root.pem").read_bytes())
    assert 16 in verify_document(out.read_bytes(), roots=[root]).pcrs
