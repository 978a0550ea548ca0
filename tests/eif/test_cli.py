"""``nsm eif``: option names, JSON field names, readable output, clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from virtio_nsm.cli import main

from .test_vectors import FACTS_PCR0, FACTS_PCR1, FACTS_PCR2


def run(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    files = {"kernel": b"KERNEL", "r1": b"RAMDISK1", "r2": b"RAMDISK2"}
    out = {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        out[name] = tmp_path / name
    return out


@pytest.fixture
def pems(tmp_path: Path, make_cert) -> tuple[Path, Path]:
    key_pem, cert_pem = make_cert(ec.SECP384R1())
    (tmp_path / "key.pem").write_bytes(key_pem)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    return tmp_path / "key.pem", tmp_path / "cert.pem"


def _build(inputs: dict[str, Path], out: Path, *extra: str | Path) -> tuple[int, str, str]:
    return run("eif", "build", "--kernel", inputs["kernel"], "--cmdline", "console=ttyS0",
               "--ramdisk", inputs["r1"], "--ramdisk", inputs["r2"], "-o", out, *extra)


def test_build_prints_nitro_cli_measurements(inputs, tmp_path) -> None:
    code, out, err = _build(inputs, tmp_path / "a.eif", "--json")
    assert code == 0, err
    assert json.loads(out) == {"Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": FACTS_PCR0,
                                                "PCR1": FACTS_PCR1, "PCR2": FACTS_PCR2}}
    code, text, _ = _build(inputs, tmp_path / "b.eif")
    assert code == 0 and f"PCR0  {FACTS_PCR0}" in text


def test_describe_json_fields(inputs, tmp_path) -> None:
    metadata = tmp_path / "meta.json"
    metadata.write_text('{"team": "blue", "n": 3}')
    config = tmp_path / "bzImage.config"
    config.write_text("#\n# Automatically generated file; DO NOT EDIT.\n"
                      "# Linux/x86_64 6.12.48-1-amd64 Kernel Configuration\n")
    image = tmp_path / "a.eif"
    code, _, err = _build(inputs, image, "--name", "hello", "--version", "3.1", "--metadata", metadata,
                          "--kernel-config", config, "--build-time", "2026-11-29T20:00:00Z",
                          "--memory", "512", "--cpus", "4")
    assert code == 0, err
    code, out, _ = run("eif", "describe", "--eif-path", image, "--json")
    assert code == 0
    data = json.loads(out)
    assert list(data) == ["EifVersion", "Measurements", "IsSigned", "CheckCRC", "ImageName",
                          "ImageVersion", "Metadata"]
    assert data["EifVersion"] == 4 and data["CheckCRC"] is True and data["IsSigned"] is False
    assert data["Measurements"]["PCR0"] == FACTS_PCR0
    assert (data["ImageName"], data["ImageVersion"]) == ("hello", "3.1")
    assert data["Metadata"] == {"BuildTime": "2026-11-29T20:00:00+00:00", "BuildTool": "virtio-nsm",
                                "BuildToolVersion": data["Metadata"]["BuildToolVersion"],
                                "OperatingSystem": "Linux", "KernelVersion": "6.12.48",
                                "DockerInfo": None, "n": 3, "team": "blue"}
    raw = image.read_bytes()
    assert struct.unpack_from(">QQ", raw, 8) == (512 << 20, 4)
    code, text, _ = run("eif", "describe", "--eif-path", image)
    assert code == 0 and "CRC ok" in text and "hello 3.1" in text and "Signed    no" in text


def test_sign_then_describe_and_pcr8(inputs, tmp_path, pems) -> None:
    image = tmp_path / "a.eif"
    assert _build(inputs, image)[0] == 0
    key, cert = pems
    code, out, err = run("eif", "sign", "--eif-path", image, "--signing-certificate", cert,
                         "--private-key", key, "--json")
    assert code == 0, err
    signed = json.loads(out)["Measurements"]
    der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    pcr8 = hashlib.sha384(bytes(48) + hashlib.sha384(der).digest()).hexdigest()
    assert signed["PCR8"] == pcr8 and signed["PCR0"] == FACTS_PCR0
    code, out, _ = run("eif", "describe", "--eif-path", image, "--json")
    data = json.loads(out)
    assert data["IsSigned"] is True and data["SignatureCheck"] is True and data["CheckCRC"] is True
    assert data["Measurements"]["PCR8"] == pcr8
    assert set(data["SigningCertificate"]) == {"IssuerName", "Algorithm", "NotBefore", "NotAfter",
                                               "Signature"}
    code, out, _ = run("eif", "pcr", "--signing-certificate", cert, "--json")
    assert code == 0 and json.loads(out) == {"PCR8": pcr8}
    # a build signed at once describes the same
    code, out, _ = _build(inputs, tmp_path / "b.eif", "--signing-certificate", cert, "--private-key", key,
                          "--json")
    assert code == 0 and json.loads(out)["Measurements"]["PCR8"] == pcr8


def test_tampered_image_shows_failed_checks(inputs, tmp_path, pems) -> None:
    image = tmp_path / "a.eif"
    key, cert = pems
    assert _build(inputs, image, "--signing-certificate", cert, "--private-key", key)[0] == 0
    data = bytearray(image.read_bytes())
    data[548 + 12] ^= 1
    image.write_bytes(bytes(data))
    code, out, _ = run("eif", "describe", "--eif-path", image, "--json")
    assert code == 0
    described = json.loads(out)
    assert described["CheckCRC"] is False and described["SignatureCheck"] is False
    code, text, _ = run("eif", "describe", "--eif-path", image)
    assert "MISMATCH" in text and "SIGNATURE INVALID" in text
    code, _, err = run("eif", "sign", "--eif-path", image, "--signing-certificate", cert,
                       "--private-key", key)
    assert code == 2 and "refusing to sign a damaged image" in err


def test_pcr_of_a_file(tmp_path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 3_000_000)
    code, out, _ = run("eif", "pcr", "--input", path, "--json")
    expected = hashlib.sha384(bytes(48) + hashlib.sha384(b"x" * 3_000_000).digest()).hexdigest()
    assert code == 0 and json.loads(out) == {"PCR": expected}
    code, _, err = run("eif", "pcr")
    assert code == 2 and "exactly one" in err


@pytest.mark.parametrize(("content", "message"), [
    (b"", "truncated"),
    (b"not an eif at all" * 40, "bad magic"),
])
def test_malformed_image_is_a_one_line_error(tmp_path, content, message) -> None:
    path = tmp_path / "bad.eif"
    path.write_bytes(content)
    code, out, err = run("eif", "describe", "--eif-path", path)
    assert code == 2 and out == ""
    assert err.startswith("nsm: ") and message in err and err.count("\n") == 1


def test_signing_needs_both_files(inputs, tmp_path, pems) -> None:
    code, _, err = _build(inputs, tmp_path / "a.eif", "--signing-certificate", pems[1])
    assert code == 2 and "both --signing-certificate and --private-key" in err
    assert not (tmp_path / "a.eif").exists()


def test_wrong_key_is_refused(inputs, tmp_path, pems, make_cert) -> None:
    other_key = tmp_path / "other.pem"
    other_key.write_bytes(make_cert(ec.SECP384R1())[0])
    code, _, err = _build(inputs, tmp_path / "a.eif", "--signing-certificate", pems[1],
                          "--private-key", other_key)
    assert code == 2 and "does not belong" in err


def test_bad_metadata_file(inputs, tmp_path) -> None:
    metadata = tmp_path / "meta.json"
    metadata.write_text("{" + " " * 5000 + "}")
    code, _, err = _build(inputs, tmp_path / "a.eif", "--metadata", metadata)
    assert code == 2 and "4096" in err


def _boot_command():
    import click

    from virtio_nsm.cli.eif import boot_argv, boot_config, boot_options

    @click.command()
    @boot_options
    def cmd(**values) -> None:
        click.echo(json.dumps(boot_argv(boot_config(**values))))

    return cmd


def test_boot_options_round_trip(tmp_path, make_image) -> None:
    image = tmp_path / "a.eif"
    image.write_bytes(make_image())
    args = ["--eif", str(image), "--parent-instance-id", "i-0123456789abcdef0", "--parent-role-arn",
            "arn:aws:iam::1:role/x", "--debug-mode", "--pcr", f"7={'ab' * 48}", "--pcr", f"0=0x{'00' * 48}",
            "--module-id", "i-0123456789abcdef0-enc0000000000000001"]
    result = CliRunner().invoke(_boot_command(), args)
    assert result.exit_code == 0, result.output
    argv = json.loads(result.stdout)
    assert argv[:2] == ["--eif", str(image.resolve())]
    assert "--debug-mode" in argv and f"7={'ab' * 48}" in argv


@pytest.mark.parametrize(("pcr", "message"), [
    ("16=" + "00" * 48, "only PCR0-15"), ("1=" + "00" * 47, "47 bytes"), ("1=zz", "not hexadecimal"),
    ("x", "not N=HEX"),
])
def test_boot_pcr_option_errors(pcr, message) -> None:
    result = CliRunner().invoke(_boot_command(), ["--pcr", pcr])
    assert result.exit_code == 2 and message in result.output


def test_describe_of_mutated_images_never_crashes(tmp_path, make_image, signer) -> None:
    original = make_image(signer=signer, metadata=b'{"ImageName":"m"}')
    path = tmp_path / "m.eif"
    for position in range(0, len(original), 5):
        data = bytearray(original)
        data[position] ^= 0xA5
        path.write_bytes(bytes(data))
        code, out, err = run("eif", "describe", "--eif-path", path, "--json")
        if code == 0:
            assert json.loads(out)["CheckCRC"] is False, position
        else:
            assert code == 2 and err.startswith("nsm: ") and err.count("\n") == 1, (position, err)


def test_fifos_and_devices_are_refused_without_blocking(tmp_path, inputs) -> None:
    import os
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code, _, err = run("eif", "describe", "--eif-path", fifo)
    assert code == 2 and "not a regular file" in err
    code, _, err = run("eif", "pcr", "--input", fifo)
    assert code == 2 and "not a regular file" in err
    code, _, err = run("eif", "build", "--kernel", "/dev/zero", "--cmdline", "x", "--ramdisk", inputs["r1"],
                       "-o", tmp_path / "z.eif")
    assert code == 2 and "not a regular file" in err
    code, _, err = _build(inputs, tmp_path / "y.eif", "--metadata", fifo)
    assert code == 2 and "not a regular file" in err


def test_build_refuses_a_command_line_that_is_not_utf8(inputs, tmp_path) -> None:
    # A non-UTF-8 byte in argv reaches Python as a lone surrogate (surrogateescape).
    out = tmp_path / "bad.eif"
    proc = subprocess.run(
        [sys.executable, "-m", "virtio_nsm", "eif", "build", "--kernel", os.fsencode(inputs["kernel"]),
         "--cmdline", b"console=ttyS0 \xff", "--ramdisk", os.fsencode(inputs["r1"]), "-o", os.fsencode(out)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "not valid UTF-8" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
