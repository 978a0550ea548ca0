"""CLI inputs are read with a size cap and only from regular files or stdin (issue 11).

Before the fix ``nsm verify /dev/zero`` read until memory ran out (MemoryError
traceback), ``nsm verify FIFO``, ``nsm state import FIFO`` and ``nsm serve`` with
``state.bin`` a FIFO blocked forever, and a state directory under a file or in
/proc raised tracebacks. Each case runs in a child process with a memory limit
and a timeout, so the pre-fix behaviour fails the test instead of hanging it or
exhausting the machine.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from virtio_nsm.cli.inputs import DEFAULT_LIMIT, InputError, read_input
from virtio_nsm.nsm.protocol import MAX_REQUEST_SIZE
from virtio_nsm.persist import STATE_FILE, StateError, StateStore

#: Address space of a child: plenty for Python + cryptography, far below /dev/zero's appetite.
CHILD_MEMORY = 1 << 30


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))


def nsm(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "virtio_nsm", *args], input=stdin.decode("latin-1"),
        capture_output=True, text=True, timeout=60, preexec_fn=_limit_memory,
    )


def one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_verify_refuses_devices(device: str) -> None:
    one_line_error(nsm("verify", device), device, "character device")


def test_inspect_and_roots_refuse_devices() -> None:
    one_line_error(nsm("inspect", "/dev/zero"), "/dev/zero", "character device")
    one_line_error(nsm("verify", "--root", "/dev/zero", "x"), "/dev/zero", "character device")


def test_verify_refuses_a_fifo(fifo: Path) -> None:
    one_line_error(nsm("verify", str(fifo)), "FIFO")


def test_verify_refuses_a_huge_file_and_huge_stdin(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with open(big, "wb") as fh:
        fh.truncate(DEFAULT_LIMIT + 1)  # sparse
    one_line_error(nsm("verify", str(big)), "larger than")
    one_line_error(nsm("verify", "-", stdin=b"A" * (DEFAULT_LIMIT + 1)), "standard input", "larger than")


def test_device_command_inputs(tmp_path: Path, fifo: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"x" * (MAX_REQUEST_SIZE + 1))
    out = str(tmp_path / "d")
    one_line_error(nsm("attest", "--user-data", "@/dev/zero", "-o", out, "--device", "local"),
                   "/dev/zero", "character device")
    one_line_error(nsm("attest", "--public-key", f"@{fifo}", "-o", out, "--device", "local"), "FIFO")
    one_line_error(nsm("pcr", "extend", "16", "--file", "/dev/urandom", "--device", "local"),
                   "character device")
    one_line_error(nsm("pcr", "extend", "16", "--file", str(fifo), "--device", "local"), "FIFO")
    one_line_error(nsm("pcr", "extend", "16", "--file", str(big), "--device", "local"),
                   f"larger than {MAX_REQUEST_SIZE} bytes")


def test_state_import_refuses_a_fifo(tmp_path: Path, fifo: Path) -> None:
    one_line_error(nsm("state", "import", "--state-dir", str(tmp_path / "s"), str(fifo)), "FIFO")
    one_line_error(nsm("state", "import", "--state-dir", str(tmp_path / "s"), "/dev/zero"),
                   "character device")


def test_state_import_into_an_unusable_directory(tmp_path: Path) -> None:
    snapshot = tmp_path / "snap"
    first = nsm("state", "export", "--state-dir", str(tmp_path / "nope"))
    assert first.returncode != 0  # nothing to export: make a real snapshot instead
    StateStore.open(tmp_path / "src", durable=False).close()
    assert nsm("state", "export", "--state-dir", str(tmp_path / "src"), "-o",
               str(snapshot)).returncode == 0
    a_file = tmp_path / "file"
    a_file.write_bytes(b"")
    one_line_error(nsm("state", "import", "--state-dir", str(a_file / "sub"), str(snapshot)),
                   str(a_file / "sub"))
    one_line_error(nsm("state", "import", "--state-dir", "/proc/x", str(snapshot)), "/proc/x")


def test_serve_refuses_a_fifo_state_file(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    StateStore.open(state_dir, durable=False).close()
    (state_dir / STATE_FILE).unlink()
    os.mkfifo(state_dir / STATE_FILE)
    with pytest.raises(StateError, match="not a regular file"):
        StateStore.open(state_dir, durable=False)
    result = nsm("serve", "-q", "--state-dir", str(state_dir), "--vhost-user", str(tmp_path / "s"))
    assert result.returncode == 1 and "not a regular file" in result.stderr
    assert "Traceback" not in result.stderr


# -- the reader itself -------------------------------------------------------------

def test_read_input_regular_file_and_caps(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"12345")
    assert read_input(str(f), limit=5) == b"12345"
    with pytest.raises(InputError, match="larger than 4 bytes"):
        read_input(str(f), limit=4)
    with pytest.raises(InputError, match="a directory"):
        read_input(str(tmp_path))
    with pytest.raises(InputError, match="No such file"):
        read_input(str(tmp_path / "missing"))
    with pytest.raises(InputError, match="No such file"):  # '-' is a file name here
        read_input("-", allow_stdin=False)
