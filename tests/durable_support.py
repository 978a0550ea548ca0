"""Helpers for the durable-state tests: a real ``nsm serve --state-dir`` process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

from virtio_nsm._process import die_with_parent, stop_process
from virtio_nsm.errors import ErrorCode
from virtio_nsm.nsm.pcr import Digest
from virtio_nsm.nsm.protocol import (
    ExtendPCR,
    ExtendPCRResponse,
    LockPCR,
    LockPCRResponse,
    encode_error,
    encode_request,
    encode_response,
)

LISTENING = "vhost-user NSM backend listening on "

class Backend:
    """One ``nsm serve`` process on a state directory; its stderr goes to ``log``.

    The process gets SIGKILL when the *thread* that started it ends (``PR_SET_PDEATHSIG``),
    so a test run that is killed, or dies with a backend running, leaves no ``nsm serve``
    behind; a thread that starts backends must therefore outlive them.
    """

    def __init__(self, state_dir: Path, sock: Path, log: IO[bytes], *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "virtio_nsm", "serve", "-q", "--state-dir", str(state_dir),
             "--vhost-user", str(sock), *extra],
            stdout=subprocess.PIPE, stderr=log, text=True, env=dict(os.environ),
            preexec_fn=die_with_parent(),
        )

    def wait_listening(self) -> list[str]:
        """Block until the backend listens; its first lines of output (empty if it died)."""
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        if not first.startswith(LISTENING):
            return []
        return [first] + [self.proc.stdout.readline() for _ in range(3)]

    def kill(self) -> None:
        stop_process(self.proc, sig=signal.SIGKILL)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def terminate(self) -> int:
        """SIGTERM and wait; a backend that does not stop within 30 s is killed (and that raises)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
            raise
        finally:
            if self.proc.stdout is not None:
                with contextlib.suppress(OSError):
                    self.proc.stdout.close()
        return self.proc.returncode


class PcrModel:
    """What the PCRs 16..31 must hold: the chain of every acknowledged change."""

    FIRST = 16
    LAST = 31

    def __init__(self) -> None:
        zero = bytes(Digest.SHA384.size)
        self.values = {i: zero for i in range(self.FIRST, self.LAST + 1)}
        self.locked: set[int] = set()

    def extend(self, index: int, data: bytes) -> tuple[bytes, bytes]:
        """The request and the only acceptable answer; the model moves on."""
        request = encode_request(ExtendPCR(index, data))
        if index in self.locked:
            return request, encode_error(ErrorCode.ReadOnlyIndex)
        self.values[index] = Digest.SHA384.extend(self.values[index], data)
        return request, encode_response(ExtendPCRResponse(self.values[index]))

    def lock(self, index: int) -> tuple[bytes, bytes]:
        request = encode_request(LockPCR(index))
        if index in self.locked:
            return request, encode_error(ErrorCode.ReadOnlyIndex)
        self.locked.add(index)
        return request, encode_response(LockPCRResponse())
