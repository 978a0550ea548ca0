"""``stop_process``: stops a child with a signal, SIGKILL after the timeout, reaps it,
returns its exit status, never raises for a dead child and never blocks for good."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from virtio_nsm._process import stop_process

#: The child says "ready" once its SIGTERM disposition is in place.
EXITS_7_ON_TERM = 'trap "exit 7" TERM; echo ready; while :; do sleep 0.05; done'
IGNORES_TERM = 'trap "" TERM; echo ready; exec sleep 60'


def start(script: str, cls: type[subprocess.Popen[str]] = subprocess.Popen) -> subprocess.Popen[str]:
    proc = cls(["sh", "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    return proc


@pytest.fixture
def kills(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every os.kill made (Popen signals through it), still delivered."""
    made: list[tuple[int, int]] = []
    real = os.kill

    def kill(pid: int, sig: int) -> None:
        made.append((pid, sig))
        real(pid, sig)

    monkeypatch.setattr(os, "kill", kill)
    return made


def test_a_child_that_exits_on_sigterm_gives_its_own_status(kills: list[tuple[int, int]]) -> None:
    proc = start(EXITS_7_ON_TERM)
    with proc:
        assert stop_process(proc, timeout=30) == 7
    assert proc.returncode == 7
    assert kills == [(proc.pid, signal.SIGTERM)]  # no SIGKILL: it ended in time


def test_the_signal_is_the_callers(kills: list[tuple[int, int]]) -> None:
    with subprocess.Popen(["sleep", "60"]) as proc:
        assert stop_process(proc, timeout=30, sig=signal.SIGINT) == -signal.SIGINT
    assert kills == [(proc.pid, signal.SIGINT)]


def test_a_child_that_ignores_sigterm_is_killed_after_the_timeout(
        kills: list[tuple[int, int]]) -> None:
    proc = start(IGNORES_TERM)
    with proc:
        began = time.monotonic()
        assert stop_process(proc, timeout=0.5) == -signal.SIGKILL
        took = time.monotonic() - began
    assert 0.5 <= took < 15, took
    assert kills == [(proc.pid, signal.SIGTERM), (proc.pid, signal.SIGKILL)]
    assert not Path(f"/proc/{proc.pid}").exists() or _state(proc.pid) != "Z"  # reaped


def test_a_child_reaped_already_is_not_signalled(kills: list[tuple[int, int]]) -> None:
    with subprocess.Popen(["sh", "-c", "exit 3"]) as proc:
        assert proc.wait(30) == 3
        assert stop_process(proc) == 3
        assert stop_process(proc) == 3  # again: the same
    assert kills == []


def test_a_dead_child_not_yet_reaped_is_reaped_not_signalled(kills: list[tuple[int, int]]) -> None:
    with subprocess.Popen(["sh", "-c", "exit 3"]) as proc:
        deadline = time.monotonic() + 30
        while _state(proc.pid) != "Z":  # a zombie: ended, its status not collected
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert stop_process(proc) == 3
    assert kills == []
    assert not Path(f"/proc/{proc.pid}").exists() or _state(proc.pid) != "Z"


def test_a_child_reaped_behind_popens_back(kills: list[tuple[int, int]]) -> None:
    with subprocess.Popen(["sh", "-c", "exit 3"]) as proc:
        os.waitpid(proc.pid, 0)  # its pid is free for another process now
        assert stop_process(proc) == 0  # the status is lost; Popen says 0
    assert kills == []  # whoever has the pid now is left alone


class Unkillable(subprocess.Popen[str]):
    """A child that SIGKILL does not end (as one stuck in the kernel): the SIGKILL is dropped."""

    def send_signal(self, sig: int) -> None:
        if sig != signal.SIGKILL:
            super().send_signal(sig)


def test_a_child_that_does_not_die_does_not_hang_the_caller() -> None:
    proc = start(IGNORES_TERM, Unkillable)
    try:
        began = time.monotonic()
        assert stop_process(proc, timeout=0.2, kill_timeout=0.2) is None
        assert time.monotonic() - began < 10
        assert proc.returncode is None and proc.poll() is None  # still there, not reaped
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        assert proc.stdout is not None
        proc.stdout.close()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""
