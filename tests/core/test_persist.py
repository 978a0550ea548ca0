"""The state directory: durability, refusal of bad state, locking, export/import."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtio_nsm import ConfigurationError, ErrorCode, Nsm, NsmDevice, NsmError, journal
from virtio_nsm import persist as ps
from virtio_nsm.nsm import protocol as p
from virtio_nsm.nsm.device import DeviceState
from virtio_nsm.nsm.pcr import Digest, PcrBank
from virtio_nsm.nsm.pki import CertificateAuthority
from virtio_nsm.request import RequestToken


def device_on(store: ps.StateStore) -> NsmDevice:
    return NsmDevice(state=store.state, ca=store.ca, commit=store.commit)


def test_new_directory_is_initialised_privately(tmp_path: Path) -> None:
    with ps.StateStore.open(tmp_path / "s") as store:
        assert store.snapshot.seq == 0
    for name in (ps.STATE_FILE, ps.JOURNAL_FILE, ps.LOCK_FILE, "ca/root-key.pem"):
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
    bumped[9] = ps.FORMAT_VERSION + 1  # a newer format
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
        in_memory = device.state

        def full(fd: int, data: bytes, offset: int) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        # The journal append fails (and so does clearing its slot): the change is
        # refused and a new generation disowns whatever reached the slot.
        monkeypatch.setattr(journal.os, "pwrite", full)
        for action in (lambda: nsm.extend_pcr(17, b"x"), lambda: nsm.lock_pcr(17), lambda: nsm.lock_pcrs(32)):
            with pytest.raises(NsmError) as info:
                action()
            assert info.value.code is ErrorCode.InternalError
        assert device.state == in_memory
        assert not (tmp_path / (ps.STATE_FILE + ".tmp")).exists()
        assert nsm.describe_pcr(17).lock is False  # reads keep working
        assert len(nsm.get_random()) == 256
        monkeypatch.undo()
        nsm.lock_pcr(17)
    with ps.StateStore.open(tmp_path) as store:
        assert store.state.pcrs.is_locked(17)
        assert store.state.pcrs.values[17] == in_memory.pcrs.values[17]


def test_write_that_cannot_be_undone_refuses_until_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with ps.StateStore.open(tmp_path) as store:
        device = device_on(store)
        nsm = Nsm.local(device)
        nsm.extend_pcr(17, b"ok")
        acknowledged = device.state

        def failing(*args: object) -> int:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(journal.os, "pwrite", failing)
        monkeypatch.setattr(ps.os, "write", failing)
        with pytest.raises(NsmError):
            nsm.extend_pcr(17, b"x")
        monkeypatch.undo()
        with pytest.raises(NsmError) as info:  # the store no longer knows what the disk holds
            nsm.extend_pcr(17, b"y")
        assert info.value.code is ErrorCode.InternalError
        assert device.state == acknowledged
    with ps.StateStore.open(tmp_path) as store:
        assert store.state == acknowledged


def test_a_change_costs_one_journal_record(tmp_path: Path) -> None:
    with ps.StateStore.open(tmp_path, journal_slots=3) as store:
        nsm = Nsm.local(device_on(store))
        state_bin = (tmp_path / ps.STATE_FILE).read_bytes()
        for i in range(3):
            nsm.extend_pcr(16, bytes([i]))
            assert (tmp_path / ps.STATE_FILE).read_bytes() == state_bin  # only the journal grew
        nsm.extend_pcr(16, b"full")  # the journal is full: compacted into state.bin
        assert ps.decode_snapshot((tmp_path / ps.STATE_FILE).read_bytes()) == store.snapshot
        nsm.extend_pcr(16, b"next")
        expected = store.snapshot
    assert ps.current_state(tmp_path) == expected  # state.bin + journal, as export sees it
    with ps.StateStore.open(tmp_path) as store:
        assert store.snapshot == expected and store.recovered == 1
        assert ps.decode_snapshot((tmp_path / ps.STATE_FILE).read_bytes()) == expected  # compacted at start


def test_format_1_directory_is_converted(tmp_path: Path) -> None:
    with ps.StateStore.open(tmp_path) as store:
        Nsm.local(device_on(store)).lock_pcr(23)
        expected = store.snapshot
    (tmp_path / ps.STATE_FILE).write_bytes(ps.encode_snapshot(expected))  # format 1: no journal
    (tmp_path / ps.JOURNAL_FILE).unlink()
    with ps.StateStore.open(tmp_path) as store:
        assert store.snapshot == expected
        Nsm.local(device_on(store)).lock_pcr(24)
    with ps.StateStore.open(tmp_path) as store:
        assert store.state.pcrs.is_locked(23) and store.state.pcrs.is_locked(24)


def test_missing_journal_is_refused(tmp_path: Path) -> None:
    with ps.StateStore.open(tmp_path) as store:
        Nsm.local(device_on(store)).lock_pcr(23)
    (tmp_path / ps.JOURNAL_FILE).unlink()
    with pytest.raises(ps.StateError, match=r"journal is missing.*refusing"):
        ps.StateStore.open(tmp_path)


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
    with tmpfs(tmp_path / "fs", "64k") as fs:
        with ps.StateStore.open(fs, journal_slots=4) as store:
            nsm = Nsm.local(device_on(store))
            nsm.extend_pcr(18, b"before")
            filler = fs / "filler"
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"\0" * 4096)
            finally:
                os.close(fd)
            # The journal is preallocated: changes keep working on a full disk ...
            for i in range(3):
                nsm.extend_pcr(18, bytes([i]))
            state = store.state
            # ... until it is full and must be compacted into a new state.bin.
            with pytest.raises(NsmError) as info:
                nsm.extend_pcr(18, b"during")
            assert info.value.code is ErrorCode.InternalError
            assert store.state == state
            assert nsm.describe_pcr(18).data == state.pcrs.values[18]
            filler.unlink()
            nsm.extend_pcr(18, b"after")
            final = store.state
        with ps.StateStore.open(fs) as store:
            assert store.state == final != state


def test_real_read_only_directory(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs", "1m") as fs:
        with ps.StateStore.open(fs, journal_slots=2) as store:
            Nsm.local(device_on(store)).extend_pcr(19, b"x")
        store = ps.StateStore.open(fs)  # compacts: the journal is empty again
        # A read-only bind mount over the directory: from now on every path
        # lookup in it finds a read-only file system (the open journal is not a lookup).
        subprocess.run(["mount", "--bind", str(fs), str(fs)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(fs)], check=True)
            nsm = Nsm.local(device_on(store))
            nsm.extend_pcr(20, b"1")
            nsm.extend_pcr(20, b"2")
            with pytest.raises(NsmError) as info:  # the journal is full: compaction needs the directory
                nsm.lock_pcr(19)
            assert info.value.code is ErrorCode.InternalError
            assert nsm.describe_pcr(19).lock is False
            assert len(nsm.attestation()) > 0
            expected = store.state
        finally:
            store.close()
            subprocess.run(["umount", str(fs)], check=True)
        with ps.StateStore.open(fs) as store:
            assert not store.state.pcrs.is_locked(19)
            assert store.state == expected


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
    snapshot = ps.import_state(tmp_path / "b", data, ca_dir=tmp_path / "a" / "ca")
    assert snapshot.state == exported_state
    with ps.StateStore.open(tmp_path / "b") as store:
        assert store.state == exported_state
        assert store.ca.certificate_der == ps.load_ca(tmp_path / "a" / "ca").certificate_der
    assert stat.S_IMODE(os.stat(tmp_path / "b" / "ca" / "root-key.pem").st_mode) == 0o600
    with pytest.raises(ps.StateError, match="already holds"):
        ps.import_state(tmp_path / "b", data)
    ps.import_state(tmp_path / "b", data, replace=True)  # the same state again: fine
    broken = bytearray(data)
    broken[-1] ^= 1
    with pytest.raises(ps.StateError, match="signature"):
        ps.import_state(tmp_path / "c", bytes(broken), ca_dir=tmp_path / "a" / "ca")
    assert not (tmp_path / "c" / ps.STATE_FILE).exists()
    assert not (tmp_path / "c" / ps.CA_DIR).exists()


def test_import_needs_the_source_ca(tmp_path: Path) -> None:
    ps.StateStore.open(tmp_path / "a").close()
    data = ps.export_state(tmp_path / "a")
    with pytest.raises(ps.StateError, match="no CA to check"):
        ps.import_state(tmp_path / "b", data)
    ps.StateStore.open(tmp_path / "c").close()  # another CA
    with pytest.raises(ps.StateError, match="does not verify against this device's CA"):
        ps.import_state(tmp_path / "c", data, replace=True)
    with pytest.raises(ps.StateError, match="different CA"):
        ps.import_state(tmp_path / "c", data, replace=True, ca_dir=tmp_path / "a" / "ca")


def unlocked(state: DeviceState) -> DeviceState:
    bank = state.pcrs
    return DeviceState(state.module_id, PcrBank(bank.digest, (bytes(bank.digest.size),) * bank.max_pcrs, 0))


def crafted_imports(directory: Path) -> dict[str, bytes]:
    with ps.StateStore.open(directory) as store:
        current, ca = store.snapshot, store.ca
    now = time.time()
    foreign = DeviceState("i-0123456789abcdef0-enc0123456789abcdef", PcrBank(Digest.SHA256, (bytes(32),), 0), (9, 9, 9))
    tampered = bytearray(ps.sign_snapshot(current, ca, now))
    tampered[30] ^= 0x80
    return {
        "unsigned, all unlocked": ps.encode_snapshot(ps.Snapshot(unlocked(current.state), current.seq + 1)),
        "signed by another CA": ps.sign_snapshot(ps.Snapshot(unlocked(current.state), current.seq + 1),
                                                 CertificateAuthority.generate(), now),
        "tampered": bytes(tampered),
        "signed, all unlocked": ps.sign_snapshot(ps.Snapshot(unlocked(current.state), current.seq + 1), ca, now),
        "signed, foreign": ps.sign_snapshot(ps.Snapshot(foreign, current.seq + 1), ca, now),
        "signed, seq -1": ps.sign_snapshot(ps.Snapshot(current.state, -1), ca, now),
        "signed, seq 2**64": ps.sign_snapshot(ps.Snapshot(current.state, 2**64), ca, now),
    }


IMPORT_CASES = ["unsigned, all unlocked", "signed by another CA", "tampered", "signed, all unlocked",
                "signed, foreign", "signed, seq -1", "signed, seq 2**64"]


@pytest.mark.parametrize("case", IMPORT_CASES)
def test_crafted_import_is_refused(tmp_path: Path, case: str) -> None:
    with ps.StateStore.open(tmp_path / "a") as store:
        Nsm.local(device_on(store)).lock_pcr(20)
    data = crafted_imports(tmp_path / "a")[case]
    before = (tmp_path / "a" / ps.STATE_FILE).read_bytes()
    with pytest.raises(ps.StateError, match="refusing"):
        ps.import_state(tmp_path / "a", data, replace=True)
    assert (tmp_path / "a" / ps.STATE_FILE).read_bytes() == before
    with pytest.raises(ps.StateError, match="refusing"):  # nor into a new directory
        ps.import_state(tmp_path / "new", data, ca_dir=tmp_path / "a" / "ca")
    assert not (tmp_path / "new" / ps.STATE_FILE).exists()


def test_import_never_rolls_back_or_unlocks(tmp_path: Path) -> None:
    with ps.StateStore.open(tmp_path / "a") as store:
        nsm = Nsm.local(device_on(store))
        nsm.extend_pcr(16, b"x")
        old = ps.export_state(tmp_path / "a")  # PCR16 unlocked, seq 1
        nsm.lock_pcr(16)
    with pytest.raises(ps.StateError, match="rollback"):
        ps.import_state(tmp_path / "a", old, replace=True)
    with ps.StateStore.open(tmp_path / "a") as store:
        assert store.state.pcrs.is_locked(16)
        state, seq, ca = store.state, store.snapshot.seq, store.ca
    # the same lineage, later, with a PCR unlocked that is locked now: refused too
    forged = ps.Snapshot(unlocked(state), seq + 10)
    with pytest.raises(ps.StateError, match="boot PCR0 is unlocked"):
        ps.import_state(tmp_path / "a", ps.sign_snapshot(forged, ca, time.time()), replace=True)
    lock_gone = ps.Snapshot(DeviceState(state.module_id, PcrBank(state.pcrs.digest, state.pcrs.values, (1 << 16) - 1)),
                            seq + 10)
    with pytest.raises(ps.StateError, match="PCR16 is locked and would be unlocked"):
        ps.import_state(tmp_path / "a", ps.sign_snapshot(lock_gone, ca, time.time()), replace=True)
    changed = list(state.pcrs.values)
    changed[16] = bytes(48)
    value_changed = ps.Snapshot(DeviceState(state.module_id, PcrBank(state.pcrs.digest, tuple(changed),
                                                                      state.pcrs.locked)), seq + 10)
    with pytest.raises(ps.StateError, match="PCR16 is locked and would change"):
        ps.import_state(tmp_path / "a", ps.sign_snapshot(value_changed, ca, time.time()), replace=True)
    with ps.StateStore.open(tmp_path / "a") as store:
        assert store.state == state


def test_state_file_with_unlocked_boot_pcrs_is_refused(tmp_path: Path) -> None:
    with ps.StateStore.open(tmp_path) as store:
        crafted = ps.Snapshot(unlocked(store.state), store.snapshot.seq + 1)
    (tmp_path / ps.STATE_FILE).write_bytes(ps.encode_snapshot(crafted))  # checksum recomputed
    with pytest.raises(ps.StateError, match=r"boot PCR0 is unlocked.*refusing"):
        ps.StateStore.open(tmp_path)


def test_state_file_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    ps.StateStore.open(tmp_path).close()
    (tmp_path / ps.STATE_FILE).unlink()
    os.mkfifo(tmp_path / ps.STATE_FILE)
    with pytest.raises(ps.StateError, match="not a regular file"):
        ps.StateStore.open(tmp_path)


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
    assert result.exit_code == 2 and "--ca-dir" in result.stderr
    result = runner.invoke(main, ["state", "import", "--state-dir", str(tmp_path / "b"),
                                  "--ca-dir", str(tmp_path / "a" / "ca"), str(tmp_path / "snap")])
    assert result.exit_code == 0, result.output
    with ps.StateStore.open(tmp_path / "b") as store:
        assert store.state == expected
    result = runner.invoke(main, ["state", "import", "--state-dir", str(tmp_path / "b"), str(tmp_path / "snap")])
    assert result.exit_code == 2 and "--replace" in result.stderr
    (tmp_path / "bad").write_bytes(b"NSMSNAPS garbage")
    result = runner.invoke(main, ["state", "import", "--state-dir", str(tmp_path / "c"),
                                  "--ca-dir", str(tmp_path / "a" / "ca"), str(tmp_path / "bad")])
    assert result.exit_code == 2 and "refusing" in result.stderr
    result = runner.invoke(main, ["state", "export", "--state-dir", str(tmp_path / "none")])
    assert result.exit_code == 2


@pytest.mark.parametrize("case", IMPORT_CASES)
def test_cli_import_refuses_crafted_snapshots(tmp_path: Path, case: str) -> None:
    from click.testing import CliRunner

    from virtio_nsm.cli import main

    ps.StateStore.open(tmp_path / "a").close()
    (tmp_path / "snap").write_bytes(crafted_imports(tmp_path / "a")[case])
    before = (tmp_path / "a" / ps.STATE_FILE).read_bytes()
    result = CliRunner().invoke(main, ["state", "import", "--replace", "--state-dir", str(tmp_path / "a"),
                                       str(tmp_path / "snap")])
    assert result.exit_code == 2 and "refusing" in result.stderr, result.output
    assert (tmp_path / "a" / ps.STATE_FILE).read_bytes() == before


# -- the CA directory (file I/O lives here, not in nsm/pki.py) ----------------------

def test_ca_directory_round_trip_and_modes(tmp_path: Path) -> None:
    ca = CertificateAuthority.generate()
    ps.save_ca(ca, tmp_path / "ca")
    assert stat.S_IMODE(os.stat(tmp_path / "ca").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "ca" / ps.ROOT_KEY_FILE).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "ca" / ps.ROOT_CERT_FILE).st_mode) == 0o644
    assert ps.load_ca(tmp_path / "ca").certificate_der == ca.certificate_der
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == sorted([ps.ROOT_CERT_FILE, ps.ROOT_KEY_FILE])


def test_ca_is_never_overwritten(tmp_path: Path) -> None:
    first, second = CertificateAuthority.generate(), CertificateAuthority.generate()
    ps.save_ca(first, tmp_path)
    with pytest.raises(ConfigurationError, match="refusing to overwrite a CA"):
        ps.save_ca(second, tmp_path)
    assert ps.load_ca(tmp_path).certificate_der == first.certificate_der
    assert not list(tmp_path.glob("*.tmp"))


def test_ca_key_write_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ps.os, "write", full)
    with pytest.raises(ConfigurationError, match="No space left"):
        ps.save_ca(CertificateAuthority.generate(), tmp_path / "ca")
    assert list((tmp_path / "ca").iterdir()) == []  # no half-written key left behind


def test_ca_file_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    ps.save_ca(CertificateAuthority.generate(), tmp_path)
    (tmp_path / ps.ROOT_KEY_FILE).unlink()
    os.mkfifo(tmp_path / ps.ROOT_KEY_FILE)
    with pytest.raises(ConfigurationError, match="not a regular file"):
        ps.load_ca(tmp_path)


@pytest.mark.parametrize("digest", [Digest.SHA256, Digest.SHA384, Digest.SHA512])
def test_journal_body_encoder_matches_cbor2(digest: Digest) -> None:
    """The hand-built record body is exactly the generic encoding (so both decode alike)."""
    import cbor2

    encoder = ps._BodyEncoder()
    states = [DeviceState.at_boot(digest=digest), DeviceState.at_boot(digest=digest, max_pcrs=16, module_id="m" * 256)]
    records = [None, ps.Record(RequestToken(1, 2**40), bytes(32), b"r" * 60), ps.Record(RequestToken(0xFFFF, 2**64 - 1), bytes(32), b"r" * 3000)]
    for state in states:
        for last in records:
            for seq in (0, 23, 255, 65536, ps.MAX_SEQ):
                snapshot = ps.Snapshot(state, seq, last)
                assert encoder.encode(snapshot) == cbor2.dumps(ps._body(snapshot))
