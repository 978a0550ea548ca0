"""One default CA: `nsm ca init`, `nsm ca root`, `nsm serve` and `--device local` agree on it."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from virtio_nsm.cli import main


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("NSM_DEVICE", raising=False)
    yield tmp_path


def default_root(home: Path) -> Path:
    return home / "data" / "virtio-nsm" / "ca" / "root.pem"


def serve_banner(home: Path, *args: str) -> tuple[list[str], str]:
    """Start `nsm serve`, read its banner (what it prints within 1 s of its first output), stop it."""
    sock = home / "nsm.sock"
    proc = subprocess.Popen([sys.executable, "-m", "virtio_nsm", "serve", "-q", "--vhost-user",
                             str(sock), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ))
    try:
        assert proc.stdout is not None
        out = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            wait = 1.0 if out else deadline - time.monotonic()
            ready, _, _ = select.select([proc.stdout], [], [], wait)
            chunk = os.read(proc.stdout.fileno(), 65536) if ready else b""
            if not chunk:
                break
            out += chunk
        lines = out.decode().splitlines()
    finally:
        proc.terminate()
        _, err_bytes = proc.communicate(timeout=30)
    return lines, err_bytes.decode()


def test_ca_init_root_and_serve_use_one_location(home: Path) -> None:
    code, out, _ = run("ca", "init")
    assert code == 0 and str(default_root(home).parent) in out
    code, pem, _ = run("ca", "root")
    assert code == 0 and pem.encode() == default_root(home).read_bytes()
    lines, _ = serve_banner(home)
    state_root = home / "state" / "virtio-nsm" / "ca" / "root.pem"
    assert state_root.read_bytes() == default_root(home).read_bytes()
    assert "That is the default CA's root: `nsm ca root` prints it" in lines
    # the trap: --ca-dir naming the default CA is the same root, not a switch
    lines, err = serve_banner(home, "--ca-dir", str(default_root(home).parent))
    assert any(line.startswith("Device state in") for line in lines), err


def test_first_serve_creates_the_default_ca(home: Path) -> None:
    code, _, err = run("ca", "root")
    assert code == 2 and "nsm ca init" in err
    _, err = serve_banner(home, "--state-dir", str(home / "vm1"))
    assert "created the default CA" in err
    assert (home / "vm1" / "ca" / "root.pem").read_bytes() == default_root(home).read_bytes()
    code, pem, _ = run("ca", "root")
    assert code == 0 and pem.encode() == default_root(home).read_bytes()


def test_existing_state_dir_keeps_its_own_root(home: Path) -> None:
    serve_banner(home, "--state-dir", str(home / "old"))  # creates the default CA too
    (home / "data").rename(home / "gone")  # a later, different default CA
    assert run("ca", "init")[0] == 0
    lines, err = serve_banner(home, "--state-dir", str(home / "old"))
    assert any("not the default CA's root" in line and "--state-dir" in line for line in lines), err
    code, pem, _ = run("ca", "root", "--state-dir", str(home / "old"))
    assert code == 0 and pem.encode() == (home / "old" / "ca" / "root.pem").read_bytes()


def test_ephemeral_prints_a_throwaway_root_or_uses_the_default(home: Path, tmp_path: Path) -> None:
    lines, _ = serve_banner(home, "--ephemeral")
    assert lines[-1] == "-----END CERTIFICATE-----"
    assert not (home / "data").exists() and not (home / "state").exists()  # wrote nothing
    assert run("ca", "init")[0] == 0
    lines, _ = serve_banner(home, "--ephemeral")
    assert f"Documents chain to {default_root(home)} (nsm verify --root {default_root(home)})" in lines
    assert lines[-1] == "That is the default CA's root: `nsm ca root` prints it"


def test_local_attestation_verifies_with_nsm_ca_root(home: Path, tmp_path: Path) -> None:
    doc = tmp_path / "doc.cose"
    code, _, err = run("attest", "--device", "local", "--nonce", "01", "-o", str(doc))
    assert code == 0 and "created the default CA" in err
    root = tmp_path / "root.pem"
    root.write_text(run("ca", "root")[1])
    assert run("verify", str(doc), "--root", str(root), "--nonce", "01")[0] == 0
    # a second local document: same root, no new CA
    code, _, err = run("--device", "local", "attest", "-o", str(doc))
    assert code == 0 and "created" not in err
    assert run("verify", str(doc), "--root", str(root))[0] == 0


def test_device_before_the_subcommand(home: Path, tmp_path: Path) -> None:
    code, out, _ = run("--device", "local", "describe", "--json")
    assert code == 0 and '"max_pcrs": 32' in out
    code, out, _ = run("--device", "local", "pcr", "get", "3")
    assert code == 0 and out.startswith("PCR3 locked")
    # after the subcommand wins over before it
    code, _, err = run("--device", "local", "describe", "--device", str(tmp_path / "none"))
    assert code == 2 and str(tmp_path / "none") in err
    code, _, err = run("--device", str(tmp_path / "none"), "random")
    assert code == 2 and str(tmp_path / "none") in err
    code, _, err = run("--device", "local", "ca", "root")
    assert code == 2 and "applies to" in err


def test_ca_root_hints_lead_somewhere(home: Path, tmp_path: Path) -> None:
    code, _, err = run("ca", "root", "--state-dir", str(tmp_path / "nostate"))
    assert code == 2 and "nsm serve --state-dir" in err
    code, _, err = run("ca", "root", "--dir", str(tmp_path / "empty"))
    assert code == 2 and "nsm ca init --dir" in err
    assert run("ca", "init")[0] == 0
    code, _, err = run("ca", "init")
    assert code == 2 and "`nsm ca root` prints its root" in err


def test_attest_public_key_help_says_how_to_make_one() -> None:
    code, out, _ = run("attest", "--help")
    assert code == 0 and "openssl" in out and "--public-key @pk.der" in " ".join(out.split())
