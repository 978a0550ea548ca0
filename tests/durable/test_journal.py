"""The journal under damage: torn, corrupted and truncated at every byte of its last records.

A state directory is built with a few acknowledged changes in its journal; then
each byte of the last two records is, in turn, torn off (as a crash in the
middle of the write leaves it), flipped, and the file truncated there. Whatever
the damage, recovery gives exactly one of the acknowledged states -- the last,
or (for a damaged last record) the one before -- or refuses with a reason;
never a mix of two states, never a lock undone.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from virtio_nsm import Nsm, NsmDevice
from virtio_nsm import journal as jn
from virtio_nsm import persist as ps

SLOTS = 8


def record_slot(index: int) -> int:
    """Byte offset of record ``index``'s slot."""
    return (1 + index) * jn.SLOT


def record_length(data: bytes, index: int) -> int:
    """How many bytes of record ``index``'s slot are the record (the rest is padding)."""
    start = record_slot(index)
    length = int.from_bytes(data[start + 16:start + 20], "big")
    return 20 + length + 32


def overwrite(path: Path, data: bytes) -> None:
    """Rewrite ``path`` in place (no truncate-to-zero: ext4 would flush it on close)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


class Directory:
    """A state directory whose journal holds ``changes`` records, and every acknowledged state."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.states: list[ps.Snapshot] = []
        with ps.StateStore.open(path, journal_slots=SLOTS, durable=False) as store:
            self.states.append(store.snapshot)
            nsm = Nsm.local(NsmDevice(state=store.state, ca=store.ca, commit=store.commit))
            for step in range(4):
                nsm.extend_pcr(16 + step % 2, bytes([step]) * 7)
                self.states.append(store.snapshot)
            nsm.lock_pcr(16)  # the last record locks PCR16
            self.states.append(store.snapshot)
        self.state_bin = (path / ps.STATE_FILE).read_bytes()
        self.journal = (path / ps.JOURNAL_FILE).read_bytes()
        self.records = len(self.states) - 1

    def restore(self, journal: bytes) -> None:
        overwrite(self.path / ps.STATE_FILE, self.state_bin)
        overwrite(self.path / ps.JOURNAL_FILE, journal)

    def outcome(self, journal: bytes) -> ps.Snapshot | str:
        """What recovery makes of ``journal``: the state, or the reason it refuses."""
        self.restore(journal)
        try:
            return ps.current_state(self.path)
        except ps.StateError as exc:
            assert "refusing" in str(exc), str(exc)
            return str(exc)


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Directory]:
    yield Directory(tmp_path_factory.mktemp("journal") / "state")


def assert_never_unlocked(directory: Directory, result: ps.Snapshot | str) -> None:
    if isinstance(result, ps.Snapshot):
        assert result in directory.states  # exactly one acknowledged state: never a mix
        base = directory.states[0].state.pcrs
        assert base.locked & ~result.state.pcrs.locked == 0


def test_intact_journal_gives_the_last_state(directory: Directory) -> None:
    assert directory.outcome(directory.journal) == directory.states[-1]
    assert directory.states[-1].state.pcrs.is_locked(16)


def test_torn_last_record_gives_the_state_before(directory: Directory) -> None:
    """A crash while the last record was written: any prefix of it reached the disk."""
    last = directory.records - 1
    start, length = record_slot(last), record_length(directory.journal, last)
    blank = directory.journal[:start] + bytes(jn.SLOT) + directory.journal[start + jn.SLOT:]
    for reached in range(length + 1):
        torn = blank[:start] + directory.journal[start:start + reached] + blank[start + reached:]
        result = directory.outcome(torn)
        expected = directory.states[-1] if reached == length else directory.states[-2]
        assert result == expected, f"{reached} of {length} bytes written"


@pytest.mark.parametrize("which", [1, 2])
def test_every_flipped_byte_of_the_last_records(directory: Directory, which: int) -> None:
    index = directory.records - which
    start, length = record_slot(index), record_length(directory.journal, index)
    outcomes: dict[str, int] = {}
    for offset in range(start, start + length + 8):  # the record and a little padding
        damaged = bytearray(directory.journal)
        damaged[offset] ^= 0xFF
        result = directory.outcome(bytes(damaged))
        assert_never_unlocked(directory, result)
        if offset >= start + length:
            assert result == directory.states[-1], offset  # padding: nothing lost
        elif which == 1:
            assert result == directory.states[-2], offset  # the last record is dropped, as if torn
        else:
            # A complete record after it proves a record was lost: refuse, never skip it.
            assert isinstance(result, str) and "would be lost" in result, (offset, result)
        key = result if isinstance(result, str) else f"state {directory.states.index(result)}"
        outcomes[key[:60]] = outcomes.get(key[:60], 0) + 1
    print(f"record {index}: {outcomes}")


def test_every_truncation_of_the_last_records(directory: Directory) -> None:
    start = record_slot(directory.records - 2)
    end = record_slot(directory.records - 1) + record_length(directory.journal, directory.records - 1)
    for size in range(start, end + 1):
        result = directory.outcome(directory.journal[:size])
        assert isinstance(result, str) and "truncated" in result, (size, result)


def test_damage_in_the_middle_of_the_file_refuses(directory: Directory) -> None:
    for cut in (0, 10, jn.SLOT - 1, jn.SLOT, len(directory.journal) - 1):
        assert isinstance(directory.outcome(directory.journal[:cut]), str)
    header = bytearray(directory.journal)
    header[12] ^= 1
    assert "header" in str(directory.outcome(bytes(header)))


def test_the_backend_refuses_or_recovers_the_same_way(directory: Directory) -> None:
    """StateStore.open (what `nsm serve` does) agrees with the read-only recovery, and compacts."""
    index = directory.records - 2
    for offset, expected in ((record_slot(index) + 30, None), (record_slot(index + 1) + 30, -2), (None, -1)):
        damaged = bytearray(directory.journal)
        if offset is not None:
            damaged[offset] ^= 0xFF
        directory.restore(bytes(damaged))
        if expected is None:
            with pytest.raises(ps.StateError, match=r"would be lost.*refusing"):
                ps.StateStore.open(directory.path, durable=False)
            assert (directory.path / ps.STATE_FILE).read_bytes() == directory.state_bin  # left for inspection
            continue
        with ps.StateStore.open(directory.path, durable=False) as store:
            assert store.snapshot == directory.states[expected]
        # compacted: state.bin alone now says so, and reopening changes nothing
        assert ps.decode_snapshot((directory.path / ps.STATE_FILE).read_bytes()) == directory.states[expected]
        with ps.StateStore.open(directory.path, durable=False) as store:
            assert store.snapshot == directory.states[expected] and store.recovered == 0


EXAMPLES = int(os.environ.get("NSM_FUZZ_EXAMPLES", "150"))


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzzed_journal_damage(directory: Directory, data: st.DataObject) -> None:
    """Random damage anywhere (header, records, padding; flips, zeroed runs, swapped slots)."""
    damaged = bytearray(directory.journal)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "zero", "swap", "copy"]))
        if kind == "flip":
            damaged[data.draw(st.integers(0, len(damaged) - 1))] ^= data.draw(st.integers(1, 255))
        elif kind == "zero":
            start = data.draw(st.integers(0, len(damaged) - 1))
            end = min(len(damaged), start + data.draw(st.integers(1, 2 * jn.SLOT)))
            damaged[start:end] = bytes(end - start)
        else:
            a, b = (record_slot(data.draw(st.integers(0, SLOTS - 1))) for _ in range(2))
            chunk = bytes(damaged[a:a + jn.SLOT])
            if kind == "swap":
                damaged[a:a + jn.SLOT] = damaged[b:b + jn.SLOT]
            damaged[b:b + jn.SLOT] = chunk
    result = directory.outcome(bytes(damaged))
    assert_never_unlocked(directory, result)
    if isinstance(result, ps.Snapshot):
        # Damage may only ever cost the records from the first damaged one on, and only
        # when nothing complete of the generation follows (else: refused).
        event(f"state {directory.states.index(result)} of {directory.records}")
    else:
        event("refused: " + re.sub(r"[0-9]+", "N", result.replace(str(directory.path), "DIR"))[:60])


def test_export_while_the_backend_writes_and_compacts(tmp_path: Path) -> None:
    """current_state (what `nsm state export` reads, without the lock) sees whole states only."""
    import threading

    acknowledged: dict[int, ps.Snapshot] = {}
    store = ps.StateStore.open(tmp_path, journal_slots=4, durable=False)
    acknowledged[store.snapshot.seq] = store.snapshot
    nsm = Nsm.local(NsmDevice(state=store.state, ca=store.ca, commit=store.commit))
    done = threading.Event()

    def writer() -> None:
        try:
            for i in range(300):
                nsm.extend_pcr(16 + i % 16, i.to_bytes(2, "big"))
                acknowledged[store.snapshot.seq] = store.snapshot
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    seen: list[ps.Snapshot] = []
    try:
        while not done.is_set():
            seen.append(ps.current_state(tmp_path))
    finally:
        thread.join(60)
        store.close()
    assert len(seen) > 5
    assert all(acknowledged.get(s.seq) == s for s in seen)  # every read is an acknowledged state
    assert [s.seq for s in seen] == sorted(s.seq for s in seen)  # never going back
    assert ps.current_state(tmp_path) == acknowledged[max(acknowledged)]
