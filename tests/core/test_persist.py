"""The state directory: durability, refusal of bad state, locking, export/import."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtio_nsm import ErrorCode, Nsm, NsmDevice, NsmError
from virtio_nsm import persist as ps
from virtio_nsm.nsm import protocol as p
from virtio_nsm.request import RequestToken


def device_on(store: ps.StateStore) -> NsmDevice:
    return NsmDevice(state=store.state, ca=store.ca, commit=store.commit)


def test_new_directory_is_initialised_privately(tmp_path: Path) -> None:
    with ps.StateStore.open(tmp_path / "s") as store:
        assert store.snapshot.seq == 0
    for name in (ps.STATE_FILE, ps.LOCK_FILE, "ca/root-key.pem"):
        assert stat.S_IMODE(os.stat(tmp_path / "s" / name).st_mode) == 0o600, name
    assert stat.S_IMODE(os.stat(tmp_path / "s").st_mode) == 0o700


def test_changes_survive_reopen(tmp_path: Path) -> None:
    with ps.StateStore.open(tmp_path) as store:
        nsm = Nsm.local(device_on(store))
        value = nsm.extend_pcr(16, b"a")
        nsm.lock_pcr(16)
        nsm.lock_pcrs(20)
        root = store.ca.certificate_pem
        module_id = store.state.module_id
    with ps.StateStore.open(tmp_path) as store:
        nsm = Nsm.local(device_on(store))
        assert nsm.describe_pcr(16) == p.DescribePCRResponse(True, value)
        assert nsm.describe_nsm().locked_pcrs == tuple(range(20))
        assert nsm.describe_nsm().module_id == module_id
        assert store.ca.certificate_pem == root
        with pytest.raises(NsmError) as info:
            nsm.extend_pcr(16, b"b")
        assert info.value.code is ErrorCode.ReadOnlyIndex
        assert store.snapshot.seq == 3


def test_reads_write_nothing(tmp_path: Path) -> None:
    with ps.StateStore.open(tmp_path) as store:
        nsm = Nsm.local(device_on(store))
        before = os.stat(tmp_path / ps.STATE_FILE).st_mtime_ns, store.snapshot.seq
        nsm.describe_pcr(1)
        nsm.describe_nsm()
        nsm.get_random()
        nsm.attestation()
        nsm.lock_pcrs(16)  # nothing new to lock
        assert (os.stat(tmp_path / ps.STATE_FILE).st_mtime_ns, store.snapshot.seq) == before


def test_second_backend_refused(tmp_path: Path) -> None:
    with ps.StateStore.open(tmp_path), pytest.raises(ps.StateError, match=f"in use by another backend \\(pid {os.getpid()}\\)"):
        ps.StateStore.open(tmp_path)
    ps.StateStore.open(tmp_path).close()  # free again once closed


def corrupt_cases(data: bytes) -> dict[str, bytes]:
    bumped = bytearray(data)
    bumped[9] = 2  # format version 2
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    return {
        "empty": b"",
        "truncated": data[:-5],
        "flipped byte": bytes(flipped),
        "foreign version": bytes(bumped),
        "not ours": b"hello world, this is not a state file at all......",
        "extended": data + b"\x00",
    }


@pytest.mark.parametrize("case", ["empty", "truncated", "flipped byte", "foreign version", "not ours", "extended"])
def test_corrupt_state_is_refused(tmp_path: Path, case: str) -> None:
    with ps.StateStore.open(tmp_path) as store:
        Nsm.local(device_on(store)).lock_pcr(20)
    data = (tmp_path / ps.STATE_FILE).read_bytes()
    (tmp_path / ps.STATE_FILE).write_bytes(corrupt_cases(data)[case])
    with pytest.raises(ps.StateError, match="refusing"):
        ps.StateStore.open(tmp_path)
    assert (tmp_path / ps.STATE_FILE).read_bytes() == corrupt_cases(data)[case]  # left for inspection


def test_lost_state_with_ca_is_refused(tmp_path: Path) -> None:
    ps.StateStore.open(tmp_path).close()
    (tmp_path / ps.STATE_FILE).unlink()
    with pytest.raises(ps.StateError, match="refusing to start with fresh PCRs"):
        ps.StateStore.open(tmp_path)


def test_unreadable_ca_is_refused(tmp_path: Path) -> None:
    ps.StateStore.open(tmp_path).close()
    (tmp_path / "ca" / "root-key.pem").write_bytes(b"junk")
    with pytest.raises(ps.StateError, match="CA is unusable"):
        ps.StateStore.open(tmp_path)


def test_failed_write_refuses_change_and_keeps_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with ps.StateStore.open(tmp_path) as store:
        device = device_on(store)
        nsm = Nsm.local(device)
        nsm.extend_pcr(17, b"ok")
        on_disk = (tmp_path / ps.STATE_FILE).read_bytes()
        in_memory = device.state
        real_write = os.write

        def full(fd: int, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(ps.os, "write", full)
        for action in (lambda: nsm.extend_pcr(17, b"x"), lambda: nsm.lock_pcr(17), lambda: nsm.lock_pcrs(32)):
            with pytest.raises(NsmError) as info:
                action()
            assert info.value.code is ErrorCode.InternalError
        assert device.state == in_memory
        assert (tmp_path / ps.STATE_FILE).read_bytes() == on_disk
        assert not (tmp_path / (ps.STATE_FILE + ".tmp")).exists()
        assert nsm.describe_pcr(17).lock is False  # reads keep working
        assert len(nsm.get_random()) == 256
        monkeypatch.setattr(ps.os, "write", real_write)
        nsm.lock_pcr(17)
    with ps.StateStore.open(tmp_path) as store:
        assert store.state.pcrs.is_locked(17)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", f"nsm-{uuid.uuid4().hex[:6]}",
                    str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_real_full_disk(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs", "64k") as fs, ps.StateStore.open(fs) as store:
        nsm = Nsm.local(device_on(store))
        nsm.extend_pcr(18, b"before")
        state = store.state
        filler = fs / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
        with pytest.raises(NsmError) as info:
            nsm.extend_pcr(18, b"during")
        assert info.value.code is ErrorCode.InternalError
        assert store.state == state
        assert nsm.describe_pcr(18).data == state.pcrs.values[18]
        filler.unlink()
        nsm.extend_pcr(18, b"after")
    with ps.StateStore.open(fs) as store:
        assert store.state.pcrs.values[18] != state.pcrs.values[18]


def test_real_read_only_directory(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs", "1m") as fs:
        with ps.StateStore.open(fs) as store:
            Nsm.local(device_on(store)).extend_pcr(19, b"x")
        store = ps.StateStore.open(fs)
        # A read-only bind mount over the directory: from now on every path
        # lookup in it finds a read-only file system.
        subprocess.run(["mount", "--bind", str(fs), str(fs)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(fs)], check=True)
            nsm = Nsm.local(device_on(store))
            with pytest.raises(NsmError) as info:
                nsm.lock_pcr(19)
            assert info.value.code is ErrorCode.InternalError
            assert nsm.describe_pcr(19).lock is False
            assert len(nsm.attestation()) > 0
        finally:
            store.close()
            subprocess.run(["umount", str(fs)], check=True)
        with ps.StateStore.open(fs) as store:
            assert not store.state.pcrs.is_locked(19)


def test_replay_record(tmp_path: Path) -> None:
    with ps.StateStore.open(tmp_path) as store:
        device = device_on(store)
        request = p.encode_request(p.ExtendPCR(16, b"once"))
        response = device.handle(request, token=RequestToken(3, 41))
        assert store.replay(request, RequestToken(3, 41)) == response
        assert store.replay(request, RequestToken(3, 42)) is None
        assert store.replay(p.encode_request(p.ExtendPCR(16, b"other")), RequestToken(3, 41)) is None
    with ps.StateStore.open(tmp_path) as store:  # the record is durable too
        assert store.replay(request, RequestToken(3, 41)) == response


def test_export_import_round_trip(tmp_path: Path) -> None:
    with ps.StateStore.open(tmp_path / "a") as store:
        nsm = Nsm.local(device_on(store))
        nsm.extend_pcr(21, b"migrate me")
        nsm.lock_pcr(21)
        exported_state = store.state
    data = ps.export_state(tmp_path / "a")
    snapshot = ps.import_state(tmp_path / "b", data)
    assert snapshot.state == exported_state
    with ps.StateStore.open(tmp_path / "b") as store:
        assert store.state == exported_state
    with pytest.raises(ps.StateError, match="already holds"):
        ps.import_state(tmp_path / "b", data)
    ps.import_state(tmp_path / "b", data, replace=True)
    broken = bytearray(data)
    broken[-1] ^= 1
    with pytest.raises(ps.StateError, match="checksum"):
        ps.import_state(tmp_path / "c", bytes(broken))
    assert not (tmp_path / "c" / ps.STATE_FILE).exists()


def test_cli_export_import(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from virtio_nsm.cli import main

    with ps.StateStore.open(tmp_path / "a") as store:
        Nsm.local(device_on(store)).lock_pcr(22)
        expected = store.state
    runner = CliRunner()
    result = runner.invoke(main, ["state", "export", "--state-dir", str(tmp_path / "a"), "-o", str(tmp_path / "snap")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["state", "import", "--state-dir", str(tmp_path / "b"), str(tmp_path / "snap")])
    assert result.exit_code == 0 and "new root" in result.output
    with ps.StateStore.open(tmp_path / "b") as store:
        assert store.state == expected
    result = runner.invoke(main, ["state", "import", "--state-dir", str(tmp_path / "b"), str(tmp_path / "snap")])
    assert result.exit_code == 2 and "--replace" in result.stderr
    (tmp_path / "bad").write_bytes(b"NSMSTATE garbage")
    result = runner.invoke(main, ["state", "import", "--state-dir", str(tmp_path / "c"), str(tmp_path / "bad")])
    assert result.exit_code == 2 and "refusing" in result.stderr
    result = runner.invoke(main, ["state", "export", "--state-dir", str(tmp_path / "none")])
    assert result.exit_code == 2
