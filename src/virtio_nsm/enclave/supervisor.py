"""The per-enclave process (``python -m virtio_nsm.enclave.supervisor DIR READY_FD``).

Started by :func:`virtio_nsm.enclave.launcher.start` in a session of its own, so the
enclave outlives the terminal that launched it; its pid is the enclave's
``ProcessID``. It starts the NSM backend (``nsm serve``, fresh state), the vsock
backend (``nsm vsock serve``), listens for the readiness heartbeat on
``<VsockSocket>_9000``, boots QEMU, and reports on ``READY_FD`` (one JSON line:
``{"ok": true}`` or ``{"error": "..."}``). Afterwards it waits for QEMU to end or for
SIGTERM, then stops everything and removes the enclave's directory and sockets.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from virtio_nsm._process import die_with_parent, stop_process
from virtio_nsm.enclave import registry
from virtio_nsm.enclave.image import HEARTBEAT_BYTE, HEARTBEAT_PORT
from virtio_nsm.enclave.machine import MachineSpec, qemu_argv
from virtio_nsm.vm.setup import Toolchain

#: Added to the image's command line when booting (not measured: PCRs come from the image).
#: Under TCG a microvm has no timer to calibrate the TSC against (no HPET, no ACPI PM
#: timer, no port 0x61 for the PIT); without a known TSC rate Linux hangs in early boot.
#: Told 1 GHz, the guest's clock keeps wall time here (measured: kernel timestamps match
#: the host's elapsed time within a few percent).
TCG_CMDLINE = "tsc_early_khz=1000000"

def _memfd_from(name: str, parts: list[dict[str, Any]]) -> int:
    """A memfd holding the concatenation of file ranges (streamed, never read whole)."""
    fd = os.memfd_create(name, 0)  # no CLOEXEC: QEMU inherits it
    for part in parts:
        with open(part["path"], "rb") as src:
            offset, left = int(part["offset"]), int(part["size"])
            while left > 0:
                n = os.sendfile(fd, src.fileno(), offset, min(left, 1 << 24))
                if n <= 0:
                    raise OSError(f"{part['path']}: image ended early")
                offset += n
                left -= n
    return fd


class Supervisor:
    def __init__(self, run_dir: Path, ready_fd: int) -> None:
        self.dir = run_dir
        self.ready_fd: int | None = ready_fd
        spec = registry.read_json(run_dir / registry.SPEC)
        rec = registry.read_json(run_dir / registry.RECORD)
        if spec is None or rec is None:
            raise SystemExit(f"no spec/record in {run_dir}")
        self.spec: dict[str, Any] = spec
        self.rec: dict[str, Any] = rec
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = False
        self.console = run_dir / "console.log"
        self.vsock_path = Path(str(self.rec["VsockSocket"]))
        self.hb_path = Path(f"{self.vsock_path}_{HEARTBEAT_PORT}")
        self.log = open(run_dir / "supervisor.log", "a", buffering=1)  # noqa: SIM115

    # ------------------------------------------------------------------ helpers
    def say(self, msg: str) -> None:
        self.log.write(f"{time.strftime('%H:%M:%S')} {msg}\n")

    def report(self, **result: Any) -> None:
        if self.ready_fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self.ready_fd, (json.dumps(result) + "\n").encode())
            os.close(self.ready_fd)
        self.ready_fd = None

    def save_record(self) -> None:
        registry.write_json(self.dir / registry.RECORD, self.rec)

    def _spawn(self, key: str, argv: list[str], log: Path, env: dict[str, str] | None = None,
               pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=env, pass_fds=pass_fds,
                                    preexec_fn=die_with_parent())
        self.procs[key] = proc
        self.say(f"started {key} (pid {proc.pid}): {' '.join(argv)}")
        return proc

    def _wait_socket(self, key: str, path: Path, timeout: float = 30.0) -> None:
        proc = self.procs[key]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stopping:
            if proc.poll() is not None:
                raise _StartError(f"{key} exited with {proc.returncode} "
                                  f"(log: {self.dir / (key + '.log')})")
            if path.exists():
                return
            time.sleep(0.02)
        raise _StartError(f"{key} did not create {path} within {timeout:.0f} s")

    # ------------------------------------------------------------------ stages
    def start_backends(self) -> None:
        spec = self.spec
        nsm_sock = self.dir / "nsm.sock"
        self._spawn("nsm-backend", [*spec["nsm_backend"], "--vhost-user", str(nsm_sock),
                                    "--state-dir", str(self.dir / "state")],
                    self.dir / "nsm-backend.log")
        self.rec["NsmBackendPID"] = self.procs["nsm-backend"].pid
        if spec.get("vsock_backend"):
            vsock_sock = self.dir / "vsock-vhost.sock"
            self._spawn("vsock-backend", [*spec["vsock_backend"], "--vhost-user", str(vsock_sock),
                                          "--guest-cid", str(self.rec["EnclaveCID"]),
                                          "--uds-path", str(self.vsock_path)],
                        self.dir / "vsock-backend.log")
            self.rec["VsockBackendPID"] = self.procs["vsock-backend"].pid
        self.save_record()
        self._wait_socket("nsm-backend", nsm_sock)
        if spec.get("vsock_backend"):
            self._wait_socket("vsock-backend", self.dir / "vsock-vhost.sock")

    def listen_heartbeat(self) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            self.hb_path.unlink()
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            lsock.bind(str(self.hb_path))
        finally:
            os.umask(old)
        lsock.listen(4)
        lsock.setblocking(False)
        return lsock

    def start_qemu(self) -> None:
        spec = self.spec
        tc = Toolchain(**{**spec["toolchain"], "kernels": {}})
        kfd = _memfd_from("enclave-kernel", [spec["kernel"]])
        ifd = _memfd_from("enclave-initrd", spec["ramdisks"])
        cmdline = f"{spec['cmdline']} {TCG_CMDLINE}".strip()
        mspec = MachineSpec(
            kernel=f"/proc/self/fd/{kfd}", initrd=f"/proc/self/fd/{ifd}", cmdline=cmdline,
            cpus=int(self.rec["NumberOfCPUs"]), memory_mib=int(self.rec["MemoryMiB"]),
            console_log=self.console, nsm_socket=self.dir / "nsm.sock",
            vsock_socket=(self.dir / "vsock-vhost.sock") if spec.get("vsock_backend") else None)
        argv = qemu_argv(tc, mspec)
        (self.dir / "qemu.argv").write_text(" ".join(argv) + "\n")
        try:
            self._spawn("qemu", argv, self.dir / "qemu.log", env=dict(os.environ, **tc.qemu_env),
                        pass_fds=(kfd, ifd))
        finally:
            os.close(kfd)
            os.close(ifd)
        self.rec["QemuPID"] = self.procs["qemu"].pid
        self.save_record()

    def wait_ready(self, lsock: socket.socket, timeout: float) -> None:
        """Answer the heartbeat; raise _StartError on timeout, QEMU exit or a bad byte."""
        deadline = time.monotonic() + timeout
        qemu = self.procs["qemu"]
        while not self.stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _StartError(f"no readiness heartbeat (vsock port {HEARTBEAT_PORT}) within "
                                  f"{timeout:.0f} s")
            if qemu.poll() is not None:
                raise _StartError(f"the enclave stopped before it was ready (QEMU exit "
                                  f"{qemu.returncode})")
            for key, proc in self.procs.items():
                if key != "qemu" and proc.poll() is not None:
                    raise _StartError(f"{key} exited with {proc.returncode} during boot "
                                      f"(log: {self.dir / (key + '.log')})")
            r, _, _ = select.select([lsock], [], [], min(left, 0.2))
            if not r:
                continue
            try:
                conn, _ = lsock.accept()
            except BlockingIOError:
                continue
            with conn:
                conn.settimeout(10)
                try:
                    data = conn.recv(1)
                    if data == bytes([HEARTBEAT_BYTE]):
                        conn.sendall(data)
                        return
                    self.say(f"heartbeat connection sent {data!r}, not 0x{HEARTBEAT_BYTE:02x}")
                except OSError as exc:
                    self.say(f"heartbeat connection failed: {exc}")
        raise _StartError("terminated while starting")

    def console_hint(self) -> str:
        """The last line userspace (the init) wrote to the console, if any."""
        try:
            with open(self.console, "rb") as fh:
                fh.seek(max(0, fh.seek(0, os.SEEK_END) - 16384))
                tail = fh.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        for line in reversed(tail):
            text = line.strip()
            if text and not text.startswith("["):
                return text[:300]
        return ""

    # ------------------------------------------------------------------ main
    def stop_all(self) -> None:
        order = ["qemu", "vsock-backend", "nsm-backend"]
        for key in order:
            proc = self.procs.get(key)
            if proc is not None:
                stop_process(proc, timeout=5)
        with contextlib.suppress(FileNotFoundError):
            self.hb_path.unlink()

    def run(self) -> int:
        def on_signal(signum: int, frame: object) -> None:
            self.stopping = True

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_signal)
        lsock: socket.socket | None = None
        try:
            self.rec["ProcessID"] = os.getpid()
            self.save_record()
            self.start_backends()
            lsock = self.listen_heartbeat()
            self.start_qemu()
            t0 = time.monotonic()
            self.wait_ready(lsock, float(self.spec["ready_timeout"]))
            lsock.close()
            lsock = None
            with contextlib.suppress(FileNotFoundError):
                self.hb_path.unlink()
            self.rec["State"] = "RUNNING"
            self.rec["_ready_seconds"] = round(time.monotonic() - t0, 3)
            self.save_record()
            if not self.spec.get("debug_mode"):
                # no console outside debug mode (as on Nitro): the log served boot diagnostics
                with contextlib.suppress(FileNotFoundError):
                    self.console.unlink()
            self.say(f"ready after {self.rec['_ready_seconds']} s")
            self.report(ok=True)
            qemu = self.procs["qemu"]
            while not self.stopping and qemu.poll() is None:
                dead = [k for k, p in self.procs.items() if k != "qemu" and p.poll() is not None]
                if dead:  # a device is gone: the enclave cannot go on
                    self.say(f"{dead[0]} exited ({self.procs[dead[0]].returncode}); "
                             "stopping the enclave")
                    return 1
                time.sleep(0.2)
            self.say("terminating" if self.stopping else f"QEMU exited ({qemu.returncode})")
            return 0
        except (_StartError, OSError, ValueError, KeyError) as exc:
            self.say(f"start failed: {exc}")
            self.stop_all()
            hint = self.console_hint()
            if hint:
                exc = _StartError(f"{exc}; the console's last message: {hint!r}")
            if lsock is not None:
                lsock.close()
                lsock = None
            failed = registry.keep_failed(self.dir.parent, self.dir)
            self.report(error=str(exc), console_log=str(failed / "console.log"),
                        log_dir=str(failed))
            return 1
        finally:
            if lsock is not None:
                lsock.close()
            self.stop_all()
            registry.remove_enclave_files(self.dir, self.rec)
            self.report(error="the supervisor ended unexpectedly")


class _StartError(Exception):
    pass


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m virtio_nsm.enclave.supervisor DIR READY_FD", file=sys.stderr)
        return 2
    os.umask(0o077)  # logs, sockets and state: the user's only
    return Supervisor(Path(argv[1]), int(argv[2])).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
