"""Keep the host's CPUs out of deep idle while requests flow (Linux CPU latency PM QoS).

Every request a guest sends crosses three threads: the guest's vCPU thread, this
backend and QEMU's main loop, each waking the next.  A wake-up that lands on an
idle CPU has to bring that CPU out of its idle state first; inside a virtual
machine (a cloud host, Firecracker, ...) that is an inter-processor interrupt to
a halted vCPU, which the hypervisor delivers in tens of microseconds.  Linux lets
a process ask that idle CPUs stay responsive: while a file descriptor of
``/dev/cpu_dma_latency`` is open with a value written to it, the kernel picks no
idle state whose exit latency exceeds that many microseconds (0: idle CPUs poll).

:class:`CpuLatencyQos` holds such a request at 0 only *while requests flow*: the
daemon engages it when it answers and releases it (writes the "no constraint"
value back) ``linger`` after the last answer, so an idle device costs the host
nothing.  While engaged, idle CPUs spin in the kernel's polling loop: that is
host CPU time, spent only during traffic and only for as long as it lasts.  Opening the
device needs root (or write access to it); :meth:`CpuLatencyQos.open` says so
plainly rather than carrying on without it.
"""

from __future__ import annotations

import os
import struct

__all__ = ["DEFAULT_LINGER_MS", "DEVICE", "NO_CONSTRAINT_US", "CpuLatencyQos", "QosUnavailable"]

#: The kernel's interface (a misc device; see Documentation/power/pm_qos_interface.rst).
DEVICE = "/dev/cpu_dma_latency"
#: The value that constrains nothing (``PM_QOS_CPU_LATENCY_DEFAULT_VALUE``, 2000 s).
NO_CONSTRAINT_US = 2_000_000_000
#: How long the request stays engaged after the last answer.
DEFAULT_LINGER_MS = 100

_S32 = struct.Struct("=i")


class QosUnavailable(OSError):
    """The CPU latency QoS device cannot be opened or written."""


class CpuLatencyQos:
    """One CPU latency request, engaged at 0 µs during traffic (see the module docstring).

    Not thread-safe: one event loop owns it.  Times are ``time.monotonic_ns()``
    values passed in by the caller.
    """

    def __init__(self, fd: int, *, linger_ms: int = DEFAULT_LINGER_MS, path: str = DEVICE) -> None:
        if linger_ms < 0:
            raise ValueError("linger_ms must be >= 0")
        self._fd = fd
        self.path = path
        self.linger_ns = linger_ms * 1_000_000
        #: Whether the 0 µs request is in force.
        self.engaged = False
        #: When to release it (valid while engaged).
        self.release_at = 0
        #: How many times it was engaged (statistics).
        self.engagements = 0
        # Opening the device creates a request at the default (no constraint); say so
        # explicitly, which also proves the device accepts our writes.
        self._write(NO_CONSTRAINT_US)

    @classmethod
    def open(cls, path: str | None = None, *, linger_ms: int = DEFAULT_LINGER_MS) -> CpuLatencyQos:
        """Open the QoS device (default :data:`DEVICE`); :class:`QosUnavailable` with the reason if not."""
        path = DEVICE if path is None else path
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            hint = " (it needs root or write access)" if isinstance(exc, PermissionError) else ""
            raise QosUnavailable(exc.errno, f"cannot open {path}: {exc.strerror}{hint}") from exc
        try:
            return cls(fd, linger_ms=linger_ms, path=path)
        except BaseException:
            os.close(fd)
            raise

    def __repr__(self) -> str:
        state = "engaged" if self.engaged else "released"
        return f"<CpuLatencyQos {self.path} {state}, {self.engagements} engagements>"

    def _write(self, value_us: int) -> None:
        if self._fd < 0:
            raise QosUnavailable(f"{self.path}: request already closed")
        try:
            written = os.write(self._fd, _S32.pack(value_us))
        except OSError as exc:
            raise QosUnavailable(exc.errno, f"cannot write to {self.path}: {exc.strerror}") from exc
        if written != _S32.size:
            raise QosUnavailable(f"short write to {self.path} ({written} bytes)")

    def engage(self, now: int) -> None:
        """An answer was given at ``now``: hold the request until ``now + linger``."""
        self.release_at = now + self.linger_ns
        if not self.engaged:
            self._write(0)
            self.engaged = True
            self.engagements += 1

    def timeout(self, now: int) -> float | None:
        """Seconds until :meth:`expire` has something to do (None: nothing pending)."""
        if not self.engaged:
            return None
        return max(0.0, (self.release_at - now) / 1e9)

    def expire(self, now: int) -> None:
        """Release the request if the linger time has passed."""
        if self.engaged and now >= self.release_at:
            self.release()

    def release(self) -> None:
        """Stop constraining idle states now (the request stays open for the next engage)."""
        if self.engaged:
            self.engaged = False
            self._write(NO_CONSTRAINT_US)

    def close(self) -> None:
        """Withdraw the request (closing the descriptor removes it from the kernel's list)."""
        fd, self._fd = self._fd, -1
        self.engaged = False
        if fd >= 0:
            os.close(fd)
