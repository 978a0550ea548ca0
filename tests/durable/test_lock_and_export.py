"""The state directory's lock file tells the truth; `nsm state export` says what is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from virtio_nsm import persist
from virtio_nsm.cli import main


def test_lock_file_names_the_holder_only_while_held(tmp_path: Path) -> None:
    store = persist.StateStore.open(tmp_path / "s", durable=False)
    lock = tmp_path / "s" / persist.LOCK_FILE
    assert lock.read_text() == f"{os.getpid()}\n"
    with pytest.raises(persist.StateError, match=rf"in use by another backend \(pid {os.getpid()}\)"):
        persist.StateStore.open(tmp_path / "s", durable=False)
    store.close()
    assert lock.read_text() == ""  # no pid of a process that no longer holds it
    persist.StateStore.open(tmp_path / "s", durable=False).close()


def test_a_recorded_pid_that_is_gone_is_called_so(tmp_path: Path) -> None:
    import fcntl

    d = tmp_path / "s"
    persist.StateStore.open(d, durable=False).close()
    fd = os.open(d / persist.LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, b"999999999\n", 0)  # a holder whose recorded pid is not running
        with pytest.raises(persist.StateError, match="no longer running"):
            persist.StateStore.open(d, durable=False)
    finally:
        os.close(fd)


def test_export_of_a_missing_directory_says_so(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["state", "export", "--state-dir", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert "no state directory at" in result.stderr and "refusing" not in result.stderr
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["state", "export", "--state-dir", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "holds no device state" in result.stderr
    assert "refusing" not in result.stderr
