"""The `nsm` command line over an in-process device."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import cbor2
import pytest
from click.testing import CliRunner

from virtio_nsm import NsmDevice
from virtio_nsm import client as c
from virtio_nsm.cli import main


@pytest.fixture
def shared_device(monkeypatch: pytest.MonkeyPatch) -> NsmDevice:
    """Route `--device local` to one device kept across invocations."""
    device = NsmDevice()
    original = c.open_transport

    def open_transport(spec: str | None = None) -> c.Transport:
        if spec == "local":
            return c.LocalTransport(device)
        return original(spec)

    monkeypatch.setattr(c, "open_transport", open_transport)
    return device


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_missing_device_is_exit_2(tmp_path: Path) -> None:
    code, _, err = run("describe", "--device", str(tmp_path / "nsm"))
    assert code == 2
    assert err.count("\n") == 1 and "nsm serve" in err


def test_nsm_device_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NSM_DEVICE", str(tmp_path / "envnsm"))
    code, _, err = run("pcr", "get", "1")
    assert code == 2 and "envnsm" in err


def test_device_commands(shared_device: NsmDevice, tmp_path: Path) -> None:
    code, out, _ = run("describe", "--device", "local", "--json")
    assert code == 0 and json.loads(out)["locked_pcrs"] == list(range(16))
    code, out, _ = run("pcr", "extend", "16", "--data", "0b00374863ff5c65", "--device", "local")
    assert code == 0 and out.split()[1].startswith("b33da05a0fdb7162")
    f = tmp_path / "blob"
    f.write_bytes(b"file data")
    code, out, _ = run("pcr", "extend", "17", "--file", str(f), "--device", "local", "--json")
    assert json.loads(out)["data"] == hashlib.sha384(bytes(48) + b"file data").hexdigest()
    code, out, _ = run("pcr", "lock", "17", "--device", "local")
    assert code == 0
    code, out, _ = run("pcr", "get", "17", "--device", "local", "--json")
    assert json.loads(out)["locked"] is True
    code, _, err = run("pcr", "extend", "17", "--data", "00", "--device", "local")
    assert code == 1 and "ReadOnlyIndex" in err
    code, _, err = run("pcr", "get", "40", "--device", "local")
    assert code == 1 and "InvalidIndex" in err
    code, out, _ = run("pcr", "lock-range", "24", "--device", "local")
    assert code == 0
    assert shared_device.state.pcrs.locked == (1 << 24) - 1
    code, out, _ = run("random", "--bytes", "600", "--device", "local")
    assert code == 0 and len(bytes.fromhex(out.strip())) == 600


def test_extend_needs_exactly_one_source() -> None:
    code, _, err = run("pcr", "extend", "16", "--device", "local")
    assert code == 2
    code, _, err = run("pcr", "extend", "16", "--data", "zz", "--device", "local")
    assert code == 2 and "hexadecimal" in err


def test_attest(shared_device: NsmDevice, tmp_path: Path) -> None:
    pk = tmp_path / "pk.der"
    pk.write_bytes(b"\x30\x01key")
    out_file = tmp_path / "doc.cose"
    code, _, err = run("attest", "--nonce", "abcd", "--user-data", "0102", "--public-key", f"@{pk}",
                         "-o", str(out_file), "--device", "local")
    assert code == 0, err
    payload = cbor2.loads(cbor2.loads(out_file.read_bytes())[2])
    assert payload["nonce"] == b"\xab\xcd" and payload["user_data"] == b"\x01\x02"
    assert payload["public_key"] == b"\x30\x01key"
    code, _, err = run("attest", "--public-key", f"@{tmp_path / 'nope'}", "-o", str(out_file),
                       "--device", "local")
    assert code == 2 and "cannot read" in err


def test_ca_init_and_root(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    code, out, _ = run("ca", "init", "--dir", str(d))
    assert code == 0
    assert stat.S_IMODE(os.stat(d / "root-key.pem").st_mode) == 0o600
    code, out, _ = run("ca", "root", "--dir", str(d))
    assert code == 0 and out.startswith("-----BEGIN CERTIFICATE-----")
    assert out.encode() == (d / "root.pem").read_bytes()
    code, _, err = run("ca", "init", "--dir", str(d))
    assert code == 2 and "refusing" in err
    code, _, err = run("ca", "root", "--dir", str(tmp_path / "none"))
    assert code == 2 and "nsm ca init" in err
    code, out, _ = run("ca", "root", "--dir", str(d), "--state-dir", str(d))
    assert code == 2
