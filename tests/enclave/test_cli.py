"""``nsm enclave``: argument handling and errors (no VM)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from virtio_nsm.cli import main
from virtio_nsm.eif import build_eif
from virtio_nsm.enclave import registry


@pytest.fixture(autouse=True)
def run_base(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="enc", dir="/tmp"))
    monkeypatch.setenv(registry.RUN_DIR_ENV, str(base))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _nsm(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(main, ["enclave", *args])
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), \
        res.exception
    return res.exit_code, res.stdout, res.stderr


def test_describe_with_nothing_running() -> None:
    code, out, _ = _nsm("describe")
    assert code == 0 and json.loads(out) == []


@pytest.mark.parametrize(("args", "message"), [
    ((), "--eif-path (or --config) is required"),
    (("--eif-path", "x.eif", "--attach-console"), "--attach-console needs --debug-mode"),
])
def test_run_usage_errors(args: tuple[str, ...], message: str) -> None:
    code, _, err = _nsm("run", *args)
    assert code == 2 and message in err


def test_run_config_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"eif_path": "x.eif", "cpu_cont": 2}))
    code, _, err = _nsm("run", "--config", str(cfg))
    assert code == 2 and "unknown key 'cpu_cont'" in err
    cfg.write_text(json.dumps({"eif_path": "x.eif", "memory_mib": "512"}))
    code, _, err = _nsm("run", "--config", str(cfg))
    assert code == 2 and "memory_mib must be a int" in err
    cfg.write_text(json.dumps({"cpu_count": 2}))
    code, _, err = _nsm("run", "--config", str(cfg))
    assert code == 2 and "eif_path is missing" in err
    cfg.write_text("[1]")
    code, _, err = _nsm("run", "--config", str(cfg))
    assert code == 2 and "not a JSON object" in err
    cfg.write_text(json.dumps({"eif_path": "x.eif"}))
    code, _, err = _nsm("run", "--config", str(cfg), "--memory", "512")
    assert code == 2 and "excludes the other run options" in err
    cfg.write_text(json.dumps({"eif_path": "x.eif", "cpu_ids": [1, 1]}))
    code, _, err = _nsm("run", "--config", str(cfg))
    assert code == 2 and "distinct CPU numbers" in err
    cfg.write_text(json.dumps({"eif_path": "x.eif", "cpu_ids": [1], "cpu_count": 1}))
    code, _, err = _nsm("run", "--config", str(cfg))
    assert code == 2 and "not both" in err
    cfg.write_text(json.dumps({"eif_path": "x.eif", "attach_console": True, "debug_mode": False}))
    code, _, err = _nsm("run", "--config", str(cfg))
    assert code == 2 and "--attach-console needs --debug-mode" in err


def test_run_config_takes_nitro_cli_run_args(tmp_path: Path) -> None:
    """nitro-cli's run_args as they are (nulls for options not given) reach the image check."""
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"eif_path": str(tmp_path / "hello.eif"), "enclave_cid": None,
                               "memory_mib": 512, "cpu_ids": None, "debug_mode": True,
                               "attach_console": False, "cpu_count": 2,
                               "enclave_name": "farshad1"}))
    code, _, err = _nsm("run", "--config", str(cfg))
    assert code == 1 and "hello.eif" in err  # the options were accepted; the image is missing


def test_run_refuses_broken_images(tmp_path: Path) -> None:
    code, _, err = _nsm("run", "--eif-path", str(tmp_path / "missing.eif"))
    assert code == 1 and "missing.eif" in err and "Traceback" not in err
    bad = tmp_path / "bad.eif"
    bad.write_bytes(b".eif" + b"\0" * 100)
    code, _, err = _nsm("run", "--eif-path", str(bad))
    assert code == 1 and "bad.eif" in err and "Traceback" not in err
    # a damaged image (CRC) is refused before anything starts
    for name, data in (("k", b"KERNEL"), ("r", b"RAMDISK")):
        (tmp_path / name).write_bytes(data)
    good = tmp_path / "good.eif"
    build_eif(good, kernel=tmp_path / "k", cmdline="console=ttyS0", ramdisks=[tmp_path / "r"],
              metadata=None)
    data = bytearray(good.read_bytes())
    data[-1] ^= 1
    bad.write_bytes(bytes(data))
    code, _, err = _nsm("run", "--eif-path", str(bad))
    assert code == 1 and "CRC" in err


def test_selection_errors() -> None:
    code, _, err = _nsm("terminate")
    assert code == 2 and "--enclave-id or --enclave-name" in err
    code, _, err = _nsm("terminate", "--all", "--enclave-id", "x")
    assert code == 2 and "--all excludes" in err
    code, _, err = _nsm("console", "--enclave-id", "i-0-encnope")
    assert code == 1 and "no running enclave with id i-0-encnope" in err
    code, out, _ = _nsm("terminate", "--all")
    assert code == 0 and out == ""
