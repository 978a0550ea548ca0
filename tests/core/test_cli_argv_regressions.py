"""Crashes found by test_cli_argv.py (hostile command-line text), one subprocess each.

argv is given as bytes: a byte that is not UTF-8 reaches Python as a lone
surrogate, as it does from a shell.
"""

from __future__ import annotations

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
