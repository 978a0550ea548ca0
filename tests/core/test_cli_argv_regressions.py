"""Crashes found by test_cli_argv.py (hostile command-line text), one subprocess each.

argv is given as bytes: a byte that is not UTF-8 reaches Python as a lone
surrogate, as it does from a shell.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _nsm(*args: str | bytes, cwd: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "virtio_nsm", *(a if isinstance(a, bytes) else a.encode() for a in args)]
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, errors="replace", timeout=60,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("option", ["--module-id", "--parent-instance-id", "--parent-role-arn"])
def test_serve_refuses_boot_text_that_is_not_utf8(tmp_path: Path, option: str) -> None:
    # --module-id was a UnicodeEncodeError traceback; the others a message about a codec
    proc = _nsm("serve", "--ephemeral", "--vhost-user", "s.sock", option, b"abc\x80def", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"Invalid value for {option}: is not valid UTF-8 text (the byte b'\\x80' at character 3)" \
        in proc.stderr
    assert list(tmp_path.iterdir()) == []  # refused before the socket exists


@pytest.mark.parametrize("option", ["--name", "--version", "--cmdline"])
def test_eif_build_names_the_option_whose_text_is_not_utf8(tmp_path: Path, option: str) -> None:
    (tmp_path / "k").write_bytes(b"KERNEL")
    args = {"--cmdline": b"console=ttyS0", "--name": b"n", "--version": b"1"}
    args[option] = b"\xff"
    flat = [x for pair in args.items() for x in pair]
    proc = _nsm("eif", "build", "--kernel", "k", "--ramdisk", "k", "-o", "out.eif", *flat, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "codec" not in proc.stderr
    assert f"Invalid value for {option}: is not valid UTF-8 text" in proc.stderr
    assert not (tmp_path / "out.eif").exists()


@pytest.mark.parametrize("command", [("ca", "root"), ("state", "export")])
def test_state_dir_too_long_for_the_system_is_a_one_line_error(tmp_path: Path,
                                                                command: tuple[str, ...]) -> None:
    # os.stat raised ENAMETOOLONG out of Path.exists()/is_dir(): a traceback
    proc = _nsm(*command, "--state-dir", "x" * 5000, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nsm: --state-dir: cannot use ")
    assert lines[0].endswith("File name too long")


def _state_dir(tmp_path: Path) -> Path:
    from virtio_nsm.durable import DurableNsm
    from virtio_nsm.nsm.pki import CertificateAuthority
    from virtio_nsm.persist import save_ca

    save_ca(CertificateAuthority.generate(), tmp_path / "ca")
    DurableNsm.open(tmp_path / "state", ca=None).close()
    return tmp_path / "state"


@pytest.mark.parametrize("output", ["", "x" * 5000])
def test_refused_output_leaves_no_temporary_file(tmp_path: Path, output: str) -> None:
    # click's atomic open left .__atomic-writeXXXX behind when the rename failed
    _state_dir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    for args in (("state", "export", "--state-dir", "state", "-o", output),
                 ("attest", "--device", "local", "-o", output)):
        proc = _nsm(*args, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stderr.splitlines()[-1].startswith("nsm: -o: ")
        assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_attest_and_export_write_their_output(tmp_path: Path) -> None:
    _state_dir(tmp_path)
    name = b"doc\xff.cose"  # a legal Linux file name that is not UTF-8
    assert _nsm("attest", "--device", "local", "-o", name, cwd=tmp_path).returncode == 0
    assert (tmp_path / os.fsdecode(name)).read_bytes()[:1] == b"\x84"  # COSE_Sign1 (untagged)
    (tmp_path / "snap").write_bytes(b"")
    (tmp_path / "snap").chmod(0o640)
    assert _nsm("state", "export", "--state-dir", "state", "-o", "snap", cwd=tmp_path).returncode == 0
    assert (tmp_path / "snap").stat().st_mode & 0o777 == 0o640  # an existing file keeps its mode
    assert len((tmp_path / "snap").read_bytes()) > 100
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_state_import_with_an_unusable_ca_dir_creates_no_state_directory(tmp_path: Path) -> None:
    from virtio_nsm.persist import export_state

    (tmp_path / "snap").write_bytes(export_state(_state_dir(tmp_path)))
    proc = _nsm("state", "import", "--state-dir", "new", "--ca-dir", b"no\xffca", "snap", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("nsm: --ca-dir: cannot read CA directory no\\udcffca")
    assert not (tmp_path / "new").exists()


def test_output_never_touches_other_files(tmp_path: Path) -> None:
    # A fixed temporary name (OUTPUT.tmp) would be truncated, renamed away or removed.
    _state_dir(tmp_path)
    (tmp_path / "snap.tmp").write_bytes(b"mine")
    (tmp_path / "doc.tmp").write_bytes(b"mine too")
    (tmp_path / "doc.tmp").chmod(0o400)
    assert _nsm("state", "export", "--state-dir", "state", "-o", "snap", cwd=tmp_path).returncode == 0
    assert _nsm("attest", "--device", "local", "-o", "doc", cwd=tmp_path).returncode == 0
    assert (tmp_path / "snap.tmp").read_bytes() == b"mine"
    assert (tmp_path / "doc.tmp").read_bytes() == b"mine too"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_new_state_export_is_private(tmp_path: Path) -> None:
    _state_dir(tmp_path)
    proc = _nsm("state", "export", "--state-dir", "state", "-o", "new-snap", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "new-snap").stat().st_mode & 0o777 == 0o600


def test_a_failed_output_write_leaves_nothing_and_touches_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from virtio_nsm.cli import device

    (tmp_path / "out.tmp").write_bytes(b"mine")
    (tmp_path / "out").write_bytes(b"old")

    def no_rename(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(device.os, "replace", no_rename)
    with pytest.raises(SystemExit) as exited:
        device.write_output(str(tmp_path / "out"), b"new")
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"nsm: -o: cannot write {tmp_path / 'out'}: Invalid cross-device link\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.tmp"]
    assert (tmp_path / "out").read_bytes() == b"old" and (tmp_path / "out.tmp").read_bytes() == b"mine"
