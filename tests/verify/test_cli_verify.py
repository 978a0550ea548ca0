"""`nsm verify` and `nsm inspect`: exit codes, input forms and output."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.serialization import Encoding
from verify_support import REPO, T0, AwsDocument, Pki, document, load_aws

from virtio_nsm.cli import main
from virtio_nsm.verify import aws_nitro_root


def run(*args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), input=stdin)
    return result.exit_code, result.stdout, result.stderr


def ms(t: dt.datetime) -> str:
    return str(int(t.timestamp() * 1000))


@pytest.fixture
def prod_file(tmp_path: Path) -> tuple[Path, AwsDocument]:
    doc = load_aws("nitrite_production.b64")
    path = tmp_path / "prod.b64"
    path.write_bytes(base64.b64encode(doc.raw) + b"\n")
    return path, doc


@pytest.fixture
def local(tmp_path: Path, pki: Pki) -> tuple[Path, Path]:
    doc = tmp_path / "local.cbor"
    doc.write_bytes(document(pki, nonce=b"\xab\xcd", user_data=b"u" * 5))
    root = tmp_path / "root.pem"
    root.write_bytes(pki.root.public_bytes(Encoding.PEM))
    return doc, root


def test_valid_aws_document_human_output(prod_file: tuple[Path, AwsDocument]) -> None:
    path, doc = prod_file
    code, out, err = run("verify", str(path), "--at", ms(doc.at))
    assert code == 0, err
    assert "VALID" in out
    assert "i-0a22e5c5f24d22174-enc0191cceb4289903f" in out
    assert "2024-09-07T14:37:39.545Z" in out
    assert "SHA384" in out
    assert "CN=aws.nitro-enclaves" in out
    assert " 0  e72a46ca" in out  # the PCR table
    assert "public_key  1024 bytes" in out and "nonce       1024 bytes" in out


@pytest.mark.parametrize(
    "when",
    [
        "2024-09-07T14:37:39.545Z",
        "2024-09-07T14:37:39.545+00:00",
        "2024-09-07T16:37:39.545+02:00",
        "2024-09-07 14:40:00",
    ],
)
def test_iso_times(prod_file: tuple[Path, AwsDocument], when: str) -> None:
    assert run("verify", str(prod_file[0]), "--at", when)[0] == 0


def test_expired_is_exit_1_with_reasons_on_stderr(prod_file: tuple[Path, AwsDocument]) -> None:
    path, doc = prod_file
    code, out, err = run("verify", str(path), "--at", ms(doc.at + dt.timedelta(hours=3)))
    assert code == 1
    assert out == ""
    assert "INVALID" in err and "leaf certificate expired" in err


def test_json_output(prod_file: tuple[Path, AwsDocument]) -> None:
    path, doc = prod_file
    code, out, _ = run("verify", str(path), "--at", ms(doc.at), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["valid"] is True and data["reasons"] == []
    assert data["document"]["timestamp"] == 1725719859545
    assert len(data["document"]["chain"]) == 5
    assert len(data["document"]["pcrs"]["0"]) == 96
    code, out, _ = run("verify", str(path), "--at", ms(doc.at), "--json", "--nonce", "00")
    assert code == 1
    data = json.loads(out)
    assert data["valid"] is False and data["reasons"][0].startswith("nonce is ")


def test_policies(prod_file: tuple[Path, AwsDocument]) -> None:
    path, doc = prod_file
    from virtio_nsm.verify import verify_document

    result = verify_document(doc.raw, at=doc.at)
    pcr0 = result.pcrs[0].hex()
    nonce = (result.nonce or b"").hex()
    args = ["verify", str(path), "--at", ms(doc.at + dt.timedelta(seconds=30))]
    assert run(*args, "--pcr", f"0={pcr0}", "--pcr", f"3={'00' * 48}", "--nonce", nonce)[0] == 0
    assert run(*args, "--max-age", "31")[0] == 0
    code, _, err = run(*args, "--max-age", "29")
    assert code == 1 and "older than the allowed 29 s" in err
    code, _, err = run(*args, "--pcr", f"0={'11' * 48}")
    assert code == 1 and "PCR0 is" in err


def test_own_root(local: tuple[Path, Path]) -> None:
    doc, root = local
    assert run("verify", str(doc), "--root", str(root), "--at", T0.isoformat())[0] == 0
    code, _, err = run("verify", str(doc), "--at", T0.isoformat())
    assert code == 1 and "neither a trusted root" in err
    # Several --root options: any of them may anchor the chain.
    aws = root.parent / "aws.pem"
    aws.write_bytes(aws_nitro_root().public_bytes(Encoding.PEM))
    assert run("verify", str(doc), "--root", str(aws), "--root", str(root), "--at", T0.isoformat())[0] == 0


def test_stdin_raw_and_base64(local: tuple[Path, Path]) -> None:
    doc, root = local
    raw = doc.read_bytes()
    base = ["verify", "-", "--root", str(root), "--at", T0.isoformat()]
    assert run(*base, stdin=raw)[0] == 0
    assert run(*base, stdin=base64.b64encode(raw))[0] == 0
    assert run(*base, stdin=base64.urlsafe_b64encode(raw).rstrip(b"="))[0] == 0
    wrapped = b"\n".join(base64.b64encode(raw)[i : i + 76] for i in range(0, len(raw) * 2, 76))
    assert run(*base, stdin=wrapped)[0] == 0


@pytest.mark.parametrize(
    "extra",
    [
        ["--at", "yesterday"],
        ["--pcr", "40=00"],
        ["--pcr", "x=00"],
        ["--pcr", "1=zz"],
        ["--pcr", "1"],
        ["--pcr", "\u00b2=00"],
        ["--at", "\u0663\u0663"],
        ["--nonce", "xyz"],
        ["--max-age", "-1"],
        ["--root", "/nonexistent/root.pem"],
    ],
)
def test_usage_errors_are_exit_2(local: tuple[Path, Path], extra: list[str]) -> None:
    doc, _ = local
    assert run("verify", str(doc), *extra)[0] == 2


def test_io_errors_are_exit_2(tmp_path: Path, local: tuple[Path, Path]) -> None:
    assert run("verify", str(tmp_path / "missing.cbor"))[0] == 2
    assert run("verify", str(tmp_path))[0] == 2  # a directory
    assert run("inspect", str(tmp_path / "missing.cbor"))[0] == 2
    not_pem = tmp_path / "bad.pem"
    not_pem.write_bytes(b"not a certificate")
    assert run("verify", str(local[0]), "--root", str(not_pem))[0] == 2


def test_garbage_document_is_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x01garbage")
    code, _, err = run("verify", str(bad))
    assert code == 1 and "not a COSE_Sign1" in err
    bad.write_bytes(b"")
    assert run("verify", str(bad))[0] == 1


def test_inspect_good_and_bad() -> None:
    good = load_aws("nitrite_production.b64")
    code, out, _ = run("inspect", "-", stdin=base64.b64encode(good.raw))
    assert code == 0
    assert "NOT verified" in out and "no syntax problems" in out
    assert "cabundle[0]: CN=aws.nitro-enclaves" in out
    bad = load_aws("nitrite_selfsigned_invalid.b64")
    code, out, _ = run("inspect", "-", stdin=base64.b64encode(bad.raw))
    assert code == 1
    assert "cabundle is null" in out and "unprotected header is not a map" in out
    assert "looks like seconds" in out
    assert "CN=self-signed attester" in out
    code, out, _ = run("inspect", "-", stdin=b"\xff")
    assert code == 1 and "not a COSE_Sign1" in out


def test_module_entry_point_subprocess(prod_file: tuple[Path, AwsDocument]) -> None:
    path, doc = prod_file
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "virtio_nsm", "verify", str(path), "--at", ms(doc.at), "--json"]
    proc = subprocess.run(cmd, capture_output=True, env=env, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["valid"] is True
    cmd[-3:] = ["--at", ms(doc.at + dt.timedelta(hours=3))]
    proc = subprocess.run(cmd, capture_output=True, env=env, timeout=60, check=False)
    assert proc.returncode == 1
    assert b"expired" in proc.stderr


def test_inspect_json() -> None:
    good = load_aws("nitrite_production.b64")
    code, out, _ = run("inspect", "--json", "-", stdin=good.raw)
    assert code == 0
    data = json.loads(out)
    assert data["verified"] is False and data["problems"] == []
    assert data["timestamp"] == 1725719859545 and data["time"] == "2024-09-07T14:37:39.545Z"
    assert data["cabundle"][0]["subject"] == "CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US"
    assert data["certificate"]["key"] == "EC secp384r1"
    bad = load_aws("nitrite_selfsigned_invalid.b64")
    code, out, _ = run("inspect", "--json", "-", stdin=bad.raw)
    assert code == 1
    data = json.loads(out)
    assert "cabundle is null" in data["problems"] and data["cabundle"] == []


def test_nsm_attest_then_inspect_and_verify(tmp_path: Path) -> None:
    out = tmp_path / "doc.cose"
    code, _, err = run("attest", "--device", "local", "--nonce", "0a0b", "-o", str(out))
    assert code == 0, err
    code, text, _ = run("inspect", str(out))
    assert code == 0 and "no syntax problems" in text
    code, _, err = run("verify", str(out), "--nonce", "0a0b")
    assert code == 1 and "neither a trusted root nor issued by one" in err
