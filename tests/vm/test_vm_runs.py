"""``nsm vm run``'s run directories: pruned, never holding a CA key; honest failure lines."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from virtio_nsm.vm import run
from virtio_nsm.vm.setup import Toolchain


def make_run(runs: Path, name: str, age: float, key: bool = False) -> Path:
    d = runs / name
    (d / "state" / "ca").mkdir(parents=True)
    (d / "console.log").write_text("boot\n")
    if key:
        (d / "state" / "ca" / "root-key.pem").write_text("KEY")
        (d / "state" / "ca" / "root.pem").write_text("CERT")
    t = time.time() - age
    os.utime(d, (t, t))
    return d


def test_prune_keeps_the_newest_and_no_keys(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    old = [make_run(runs, f"20260101-0000{i:02d}-999999999-{i}", age=1000 - i, key=True) for i in range(8)]
    live = make_run(runs, f"20250101-000000-{os.getppid()}-7", age=5000)  # a run still going
    run.prune_runs(runs, keep=3)
    left = sorted(p.name for p in runs.iterdir())
    assert left == sorted([live.name, *(p.name for p in old[-3:])])
    assert not list(runs.rglob("root-key.pem"))
    assert all((p / "state" / "ca" / "root.pem").exists() for p in old[-3:])


def _fake_toolchain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Toolchain:
    tc = Toolchain(cache_dir=str(tmp_path / "cache"), qemu=["false"], qemu_env={},
                   qemu_version="QEMU 11.1 (test)", qemu_devices=[], busybox="")

    class FakeKernel:
        version = "6.12-test"
        vmlinuz = str(tmp_path / "vmlinuz")

    def kernel(self: Any, name: str | None = None) -> FakeKernel:
        return FakeKernel()

    monkeypatch.setattr(Toolchain, "kernel", kernel)
    monkeypatch.setattr(Toolchain, "initramfs", lambda self, k: tmp_path / "initrd")
    return tc


def test_qemu_device_without_builtin_names_the_setup_and_no_console_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    tc = _fake_toolchain(tmp_path, monkeypatch)
    result = run.run(tc, run.RunOptions(command=["true"], device="qemu"))
    err = capsys.readouterr().err
    assert result.status == run.EXIT_VM_FAILURE
    assert "nsm vm setup --with-builtin-nsm" in err
    assert "console log" not in err and "no guest was started" in err
    assert not result.kept and not result.run_dir.exists()


def test_failed_boot_is_kept_with_its_console_log_and_progress(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    tc = _fake_toolchain(tmp_path, monkeypatch)
    # a "QEMU" that boots (the init's marker on the console) but never reports a status
    tc.qemu = ["sh", "-c", 'for a; do case "$a" in file:*) c="${a#file:}";; esac; done; '
               'sleep 0.3; echo "nsm-vm-init: running cmd.sh" > "$c"; sleep 0.6', "qemu"]
    result = run.run(tc, run.RunOptions(command=["true"], device="none"))
    err = capsys.readouterr().err
    assert result.status == run.EXIT_VM_FAILURE and result.kept
    assert "[nsm vm] booting a guest: Linux 6.12-test, 512 MiB, no NSM device;" in err
    assert "[nsm vm] guest booted in " in err
    assert f"console log: {result.console_log}" in err and result.console_log.exists()
