"""The enclave registry: private directories, CID allocation, stale records."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from virtio_nsm.enclave import registry


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _record(base: Path, name: str, cid: int, **extra: object) -> Path:
    d = base / f"i-0000000000000000-enc{name}"
    d.mkdir(mode=0o700)
    registry.write_json(d / registry.RECORD, {"EnclaveName": name, "EnclaveID": d.name,
                                              "EnclaveCID": cid, "_dir": str(d), **extra})
    return d


def test_base_dir_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "runs"
    base.mkdir(mode=0o755)
    monkeypatch.setenv(registry.RUN_DIR_ENV, str(base))
    assert registry.base_dir() == base
    assert base.stat().st_mode & 0o777 == 0o700
    file = tmp_path / "file"
    file.write_text("")
    monkeypatch.setenv(registry.RUN_DIR_ENV, str(file))
    with pytest.raises((registry.RegistryError, FileExistsError)):
        registry.base_dir()


def test_cids_names_and_stale_records(tmp_path: Path) -> None:
    live = os.getpid()
    _record(tmp_path, "running", 4, ProcessID=live)
    # starting: the supervisor has not recorded itself yet, but its launcher lives
    starting = _record(tmp_path, "starting", 5, ProcessID=0, _launcher=live)
    dead = _record(tmp_path, "dead", 6, ProcessID=_dead_pid())
    orphan = _record(tmp_path, "orphan", 7, ProcessID=0, _launcher=_dead_pid())
    assert registry.used_cids(tmp_path) == {4, 5}
    assert registry.free_cid(tmp_path) == 6
    assert registry.used_names(tmp_path) == {"running", "starting"}
    gone = registry.reap_stale(tmp_path)
    assert sorted(gone) == sorted([dead.name, orphan.name])
    assert not dead.exists() and not orphan.exists() and starting.exists()


def test_keep_failed_keeps_logs_only_and_prunes(tmp_path: Path) -> None:
    import socket

    for i in range(registry.KEEP_FAILED + 2):
        d = _record(tmp_path, f"f{i}", 4 + i, ProcessID=0)
        (d / "console.log").write_text("log")
        (d / "state").mkdir()
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(d / "x.sock"))
        s.close()
        kept = registry.keep_failed(tmp_path, d)
        assert sorted(p.name for p in kept.iterdir()) == ["console.log", "enclave.json"]
        os.utime(kept, (1000 + i, 1000 + i))
    failed = [p for p in tmp_path.iterdir() if p.name.startswith(registry.FAILED_PREFIX)]
    assert len(failed) == registry.KEEP_FAILED
