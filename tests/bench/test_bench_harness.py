"""The benchmarks' plumbing: private state for backends, no child left behind, reasons said."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import _harness  # noqa: E402
import bench_latency  # noqa: E402


def test_variants_get_a_private_state_dir_and_ca(tmp_path: Path) -> None:
    argv, env = bench_latency.backend_argv("python -m virtio_nsm serve --poll-us 0",
                                           tmp_path / "s.sock", tmp_path)
    assert argv[0] == sys.executable
    assert argv[-4:] == ["--vhost-user", str(tmp_path / "s.sock"), "--state-dir",
                         str(tmp_path / "state")]
    assert env["XDG_STATE_HOME"].startswith(str(tmp_path))
    assert env["XDG_DATA_HOME"].startswith(str(tmp_path))
    argv, _ = bench_latency.backend_argv("python -m virtio_nsm serve --ephemeral",
                                         tmp_path / "s.sock", tmp_path)
    assert "--state-dir" not in argv
    argv, _ = bench_latency.backend_argv("/opt/other-backend --fast", tmp_path / "s.sock", tmp_path)
    assert "--state-dir" not in argv  # not ours: only --vhost-user is appended


def test_qemu_without_builtin_device_says_what_to_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from virtio_nsm.vm import setup

    fake = SimpleNamespace(builtin_nsm_device=None, qemu_version="QEMU 11.1 (Debian)")
    monkeypatch.setattr(setup, "load_or_setup", lambda *a, **k: fake)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(SystemExit, match="nsm vm setup --with-builtin-nsm"):
        bench_latency.preflight(SimpleNamespace(qemu=True))
    bench_latency.preflight(SimpleNamespace(qemu=False))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_every_child_even_in_its_own_session(tmp_path: Path, sig: int) -> None:
    script = textwrap.dedent(f"""
        import subprocess, sys, time
        sys.path.insert(0, {str(BENCH)!r})
        import _harness
        with _harness.children_cleaned_up():
            child = subprocess.Popen(["sleep", "300"], start_new_session=True)
            grandchild = subprocess.Popen(["sh", "-c", "sleep 300 & wait"], start_new_session=True)
            print(child.pid, grandchild.pid, flush=True)
            time.sleep(300)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    pids = [int(p) for p in proc.stdout.readline().split()]
    time.sleep(0.3)
    pids += _harness.descendants(pids[1])  # the shell's own sleep
    assert len(pids) == 3
    proc.send_signal(sig)
    proc.wait(30)
    assert proc.returncode != 0
    time.sleep(0.1)
    alive = [p for p in pids if Path(f"/proc/{p}").exists()
             and Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"]
    assert alive == [], proc.stderr.read() if proc.stderr else ""


def test_vsock_serve_is_started_from_this_tree_and_returned_listening(tmp_path: Path) -> None:
    vhost, uds = tmp_path / "vhost.sock", tmp_path / "v.sock"
    proc = _harness.start_vsock_serve(vhost, 7, uds, "--poll-us", "0", stderr=subprocess.PIPE)
    try:
        assert proc.poll() is None
        assert vhost.is_socket() and uds.is_socket()  # both listen once it returns
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert argv[1:5] == [b"-m", b"virtio_nsm", b"vsock", b"serve"]
        assert argv[argv.index(b"--guest-cid") + 1] == b"7" and argv[-3:-1] == [b"--poll-us", b"0"]
        env = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
        assert any(e.startswith(b"PYTHONPATH=" + str(_harness.SRC).encode()) for e in env)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert not vhost.exists() and not uds.exists()


def test_vsock_serve_that_does_not_start_says_why(tmp_path: Path) -> None:
    (tmp_path / "v.sock").write_text("not a socket")
    with pytest.raises(RuntimeError, match=r"did not start \(exit 2\).*is not a socket"):
        _harness.start_vsock_serve(tmp_path / "vhost.sock", 7, tmp_path / "v.sock",
                                   stderr=subprocess.PIPE)
    assert not (tmp_path / "vhost.sock").exists()
