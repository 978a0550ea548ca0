"""Benchmark: verify_document() beside the cryptographic work it cannot avoid.

The baseline is one ECDSA P-384 signature verification (the COSE signature)
plus one X.509 path validation of the same chain with cryptography's verifier,
on pre-parsed certificates; both are measured in alternating rounds in the
same run (bench/_harness.py), and the ratio of rates is printed.

Run: .venv/bin/python bench/bench_verify.py   (it finds this tree's src itself)
"""

from __future__ import annotations

import base64
import datetime as dt
import sys
from collections.abc import Callable
from pathlib import Path

import cbor2
from _harness import compare
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification as x509v

from virtio_nsm import NsmDevice, cose, verify_document
from virtio_nsm.client import Nsm
from virtio_nsm.verify import aws_nitro_root, load_pem_roots

AWS_DOC = Path(__file__).resolve().parents[1] / "tests/data/aws/nitrite_production.b64"


def raw_baseline(doc: bytes, roots: list[x509.Certificate], at: dt.datetime) -> Callable[[], object]:
    """One ES384 verify + one path validation, everything parsed beforehand."""
    sign1 = cose.decode_sign1(doc)
    fields = cbor2.loads(sign1.payload)
    leaf = x509.load_der_x509_certificate(fields["certificate"])
    intermediates = [x509.load_der_x509_certificate(c) for c in reversed(fields["cabundle"])]
    key = leaf.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    der_sig = cose.raw_to_der(sign1.signature)
    tbs = sign1.to_be_signed()
    store = x509v.Store(roots)

    def run() -> object:
        key.verify(der_sig, tbs, ec.ECDSA(hashes.SHA384()))
        verifier = (
            x509v.PolicyBuilder()
            .store(store)
            .time(at)
            .extension_policies(
                ca_policy=x509v.ExtensionPolicy.webpki_defaults_ca(),
                ee_policy=x509v.ExtensionPolicy.permit_all(),
            )
            .build_client_verifier()
        )
        return verifier.verify(leaf, intermediates)

    return run


def main() -> int:
    print(f"python {sys.version.split()[0]}")
    cases: list[tuple[str, bytes, list[x509.Certificate] | None, dt.datetime]] = []
    if AWS_DOC.exists():
        raw = base64.b64decode(AWS_DOC.read_bytes())
        cases.append(("AWS document", raw, None, dt.datetime.fromtimestamp(1725719859.545, dt.UTC)))
    else:
        print(f"(skipping the AWS document: {AWS_DOC} not found)")
    device = NsmDevice()
    with Nsm.local(device) as nsm:
        ours = nsm.attestation(nonce=b"n" * 32, user_data=b"u" * 64)
    cases.append(("our document", ours, load_pem_roots(device.root_certificate_pem), dt.datetime.now(dt.UTC)))

    for name, doc, roots, at in cases:
        verify_document(doc, roots=roots, at=at)  # must be valid
        baseline = raw_baseline(doc, roots or [aws_nitro_root()], at)
        compare(name, ours_for(doc, roots, at), baseline, "raw ES384 verify + X.509 path valid.")
    return 0


def ours_for(doc: bytes, roots: list[x509.Certificate] | None, at: dt.datetime) -> Callable[[], object]:
    return lambda: verify_document(doc, roots=roots, at=at)


if __name__ == "__main__":
    sys.exit(main())
