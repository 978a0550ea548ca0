"""Audit (issue 11 campaign re-run): ``nsm enclave run --config`` on hostile files.

The config file goes through the same bounded reader as every other CLI input:
a FIFO or a device is refused without blocking, a huge file is refused, and
JSON nested deeper than the interpreter's recursion limit is a one-line error.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _run(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "virtio_nsm", "enclave", "run", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "NSM_ENCLAVE_RUN_DIR": "/nonexistent-audit"})


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "/dev/urandom"])
def test_config_that_never_ends_is_refused_at_once(kind: str, tmp_path: Path) -> None:
    path = str(tmp_path / "cfg.fifo") if kind == "fifo" else kind
    if kind == "fifo":
        os.mkfifo(path)
    res = _run("--config", path)
    assert res.returncode == 2, res
    assert "not a regular file" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_huge_config_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "big.json"
    with cfg.open("wb") as fh:
        fh.truncate(64 << 20)  # sparse: costs nothing on disk
    res = _run("--config", str(cfg))
    assert res.returncode == 2 and "larger than" in res.stderr, res
    assert "Traceback" not in res.stderr


def test_deeply_nested_config_is_a_one_line_error(tmp_path: Path) -> None:
    cfg = tmp_path / "deep.json"
    cfg.write_text("[" * 100_000 + "]" * 100_000)
    res = _run("--config", str(cfg))
    assert res.returncode == 2, res
    assert "Traceback" not in res.stderr and "RecursionError" not in res.stderr
    assert "--config" in res.stderr and len(res.stderr.strip().splitlines()) == 1
