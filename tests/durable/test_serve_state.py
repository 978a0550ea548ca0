"""``nsm serve --state-dir`` as a real process: survives SIGKILL, refuses bad state, writes only on change."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from durable_support import Backend, PcrModel

from virtio_nsm import persist
from virtio_nsm._process import stop_process
from virtio_nsm.client import Nsm
from virtio_nsm.nsm.frontend import VhostUserTransport
from virtio_nsm.nsm.protocol import (
    Attestation,
    DescribeNSM,
    DescribePCR,
    GetRandom,
    LockPCRs,
    encode_request,
)


def nsm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "virtio_nsm", *args], capture_output=True, text=True,
                          env=dict(os.environ), timeout=60)


@pytest.fixture
def paths(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    log = tmp_path / "serve.log"
    log.touch()
    yield tmp_path / "state", tmp_path / "nsm.sock", log


def start(state: Path, sock: Path, log: Path) -> tuple[Backend, list[str]]:
    with open(log, "ab") as fh:
        backend = Backend(state, sock, fh)
    lines = backend.wait_listening()
    assert lines, log.read_text()
    return backend, lines


def test_state_survives_sigkill_and_root_is_announced(paths: tuple[Path, Path, Path]) -> None:
    state, sock, log = paths
    backend, lines = start(state, sock, log)
    root = state / persist.CA_DIR / "root.pem"
    assert f"Device state in {state}; documents chain to {root} (nsm verify --root {root})" in lines[3]
    model = PcrModel()
    with Nsm(VhostUserTransport(sock, timeout=20)) as client:
        module_id = client.describe_nsm().module_id
        value = client.extend_pcr(16, b"measured")
        client.lock_pcr(17)
    assert value == model.extend(16, b"measured")[1][-48:]
    backend.kill()

    backend, _ = start(state, sock, log)
    try:
        with Nsm(VhostUserTransport(sock, timeout=20)) as client:
            assert client.describe_nsm().module_id == module_id
            assert client.describe_pcr(16).data == value
            assert client.describe_pcr(17).lock
        # Documents chain to the announced root.
        doc = state.parent / "doc.cose"
        out = nsm("attest", "--device", f"vhost-user:{sock}", "-o", str(doc))
        assert out.returncode == 0, out.stderr
        out = nsm("verify", str(doc), "--root", str(root))
        assert out.returncode == 0, out.stderr
        assert "VALID" in out.stdout
    finally:
        assert backend.terminate() == 0


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "flipped":
        path.write_bytes(data[:20] + bytes([data[20] ^ 1]) + data[21:])
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "foreign":
        path.write_bytes(b"SQLite format 3\0" + data[16:])
    elif how == "newer":
        path.write_bytes(data[:8] + (persist.FORMAT_VERSION + 1).to_bytes(2, "big") + data[10:])
    elif how == "unreadable":
        path.unlink()
        path.mkdir()
    elif how == "missing":
        path.unlink()


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("flipped", "checksum mismatch"),
        ("truncated", "length mismatch"),
        ("foreign", "not a virtio-nsm state file"),
        ("newer", f"format version {persist.FORMAT_VERSION + 1}"),
        ("unreadable", "cannot read"),
        ("missing", "has a CA but no state.bin"),
    ],
)
def test_bad_state_makes_serve_exit_non_zero(paths: tuple[Path, Path, Path], how: str, message: str) -> None:
    state, sock, _ = paths
    with persist.StateStore.open(state):
        pass
    corrupt(state / persist.STATE_FILE, how)
    out = subprocess.run(
        [sys.executable, "-m", "virtio_nsm", "serve", "--state-dir", str(state), "--vhost-user", str(sock)],
        capture_output=True, text=True, env=dict(os.environ), timeout=60,
    )
    assert out.returncode == 1
    assert message in out.stderr and "refusing" in out.stderr, out.stderr
    assert out.stdout == ""  # never listened
    assert not sock.exists()


def test_second_backend_on_the_same_directory_refuses(paths: tuple[Path, Path, Path]) -> None:
    state, sock, log = paths
    backend, _ = start(state, sock, log)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "virtio_nsm", "serve", "--state-dir", str(state),
             "--vhost-user", str(sock.with_name("other.sock"))],
            capture_output=True, text=True, env=dict(os.environ), timeout=60,
        )
        assert out.returncode == 1
        assert f"in use by another backend (pid {backend.proc.pid})" in out.stderr
    finally:
        assert backend.terminate() == 0


def test_ephemeral_excludes_state_dir(paths: tuple[Path, Path, Path]) -> None:
    state, sock, _ = paths
    out = nsm("serve", "--ephemeral", "--state-dir", str(state), "--vhost-user", str(sock))
    assert out.returncode == 2 and "exclude each other" in out.stderr
    assert not state.exists()


def test_ephemeral_writes_no_state(paths: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, sock, _ = paths
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "xdg"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "virtio_nsm", "serve", "--ephemeral", "--vhost-user", str(sock)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(4)]
        assert "memory only" in lines[3]
        with Nsm(VhostUserTransport(sock, timeout=20)) as client:
            client.extend_pcr(16, b"x")
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert not (tmp_path / "xdg").exists()


def test_reads_and_random_write_nothing(paths: tuple[Path, Path, Path]) -> None:
    state, sock, log = paths
    backend, _ = start(state, sock, log)
    path, journal = state / persist.STATE_FILE, state / persist.JOURNAL_FILE

    def files() -> tuple[object, ...]:
        return (path.stat().st_ino, path.read_bytes(), journal.stat().st_ino, journal.read_bytes())

    try:
        with VhostUserTransport(sock, timeout=20) as transport:
            before = files()
            reads = [
                encode_request(DescribePCR(16)),
                encode_request(DescribeNSM()),
                encode_request(GetRandom()),
                encode_request(Attestation(b"user", b"nonce", None)),
                encode_request(LockPCRs(16)),  # PCR0-15 are locked already: no change
                encode_request(DescribePCR(99)),  # an error
            ]
            transport.exchange_many(reads * 5)
            assert files() == before
            assert sorted(os.listdir(state)) == ["ca", "journal", "lock", "state.bin"]
            # A change does write a journal record (so the check above can see one).
            transport.exchange(PcrModel().extend(16, b"x")[0])
            after = files()
            assert after[:3] == before[:3] and after[3] != before[3]
    finally:
        assert backend.terminate() == 0


def test_serve_with_own_ca(paths: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """`nsm ca init` -> `nsm serve --ca-dir`: documents chain to that root; roots never switch."""
    state, sock, log = paths
    ca_dir, other = tmp_path / "myca", tmp_path / "otherca"
    assert nsm("ca", "init", "--dir", str(ca_dir)).returncode == 0
    assert nsm("ca", "init", "--dir", str(other)).returncode == 0
    with open(log, "ab") as fh:
        backend = Backend(state, sock, fh, "--ca-dir", str(ca_dir))
    assert backend.wait_listening(), log.read_text()
    try:
        doc = tmp_path / "doc.cose"
        assert nsm("attest", "--device", f"vhost-user:{sock}", "-o", str(doc)).returncode == 0
        assert nsm("verify", str(doc), "--root", str(ca_dir / "root.pem")).returncode == 0
        assert nsm("verify", str(doc), "--root", str(other / "root.pem")).returncode == 1
        root = nsm("ca", "root", "--state-dir", str(state))
        assert root.stdout.encode() == (ca_dir / "root.pem").read_bytes()
    finally:
        assert backend.terminate() == 0
    with open(log, "ab") as fh:
        refused = Backend(state, sock, fh, "--ca-dir", str(other))
    assert refused.wait_listening() == []
    assert refused.proc.wait(30) == 1
    assert "different CA" in log.read_text()
    broken = tmp_path / "broken"
    broken.mkdir()
    out = subprocess.run([sys.executable, "-m", "virtio_nsm", "serve", "--ephemeral", "--ca-dir", str(broken),
                          "--vhost-user", str(sock)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "cannot read CA directory" in out.stderr


def test_a_backend_dies_with_the_thread_that_started_it(paths: tuple[Path, Path, Path]) -> None:
    # What keeps a killed test run (or a dead killer thread) from leaving `nsm serve`
    # processes behind: PR_SET_PDEATHSIG, bound to the starting thread.
    state, sock, log = paths
    started: list[Backend] = []

    def start_one() -> None:
        backend, _ = start(state, sock, log)
        started.append(backend)

    thread = threading.Thread(target=start_one)
    thread.start()
    thread.join(60)
    (backend,) = started
    try:
        assert backend.proc.wait(20) == -signal.SIGKILL
    finally:
        stop_process(backend.proc, sig=signal.SIGKILL)  # (a no-op once it is gone)
