#!/usr/bin/env python3
"""Guest-observed NSM latency through Linux's ``nsm.ko``, per backend variant (not a test).

For each run and each variant one TCG guest is booted with ``nsm vm run``; inside it
this same file (``--guest``) times loops of N ioctls on ``/dev/nsm`` for DescribeNSM,
DescribePCR, ExtendPCR and GetRandom, beside the same-run floor: a bare ioctl the
kernel answers without the device (``FIOCLEX`` on the fd).  Around every timed loop
the guest asks the host for the backend's CPU time (``/proc/PID/task/*/schedstat``,
nanoseconds), so each op gets the backend's CPU time per request; at the end the
guest stays idle for ``--idle`` seconds (device connected, nothing asked) and the
backend's CPU over that window is reported too.  For ``nsm serve`` backends, each question
also sends the backend SIGUSR1, which logs its statistics since the previous one;
"turn p50" is the median *turnaround* during an op's loop: from an interrupt the
backend sent to the next request it noticed, i.e. the part of each round trip
spent in QEMU and the guest (and in waking them up), which the backend does not
control.  Variants run interleaved (A B A B ...) so that drift on a shared machine
hits all of them; each figure is the median over ``--runs`` runs.

    .venv/bin/python bench/bench_latency.py -n 2000 --runs 5 \\
        --variant off='python -m virtio_nsm serve --poll-us 0' \\
        --variant default='python -m virtio_nsm serve -v' --qemu

(``-v`` puts the polling trials' decisions in the backend log, kept in ``--json``.)

``--cuse`` also starts ``nsm cuse --ephemeral`` inside each guest and times the same
ops on its CUSE device, after the ``/dev/nsm`` loops of the same boot (floor, ``nsm.ko``
over the vhost-user backend and CUSE side by side); "CPU us/req" is then the CUSE
server's own CPU inside the guest.

A variant is ``LABEL=COMMAND``: the command starts a backend and gets
``--vhost-user SOCK`` appended, and, for ``nsm serve``, ``--state-dir`` a fresh
temporary directory (unless it has ``--state-dir`` or ``--ephemeral``): a
benchmark never touches your default state directory or CA (``XDG_STATE_HOME``
and ``XDG_DATA_HOME`` point into that temporary directory as well).  ``python``
is this interpreter; run it from any tree with ``env PYTHONPATH=/other/src python
-m virtio_nsm serve``.  ``--qemu`` adds QEMU's built-in C device as a reference; it
needs ``nsm vm setup --with-builtin-nsm`` first (it builds QEMU from Debian's
source).  Needs root (QEMU guests).  Ctrl-C, SIGTERM or a failure stop every
backend and guest it started and remove its temporary files.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

NSM_IOCTL_RAW = 0xC0200A00
FIOCLEX = 0x5451
RESPONSE_MAX = 0x3000
HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
OPS = ("DescribeNSM", "DescribePCR", "ExtendPCR", "GetRandom")

# Requests, CBOR by hand (the guest side needs nothing but the stdlib).
REQUESTS: dict[str, bytes] = {
    "DescribeNSM": b"\x6bDescribeNSM",
    "DescribePCR": bytes.fromhex("a16b4465736372696265504352a165696e64657800"),
    "ExtendPCR": bytes.fromhex("a169457874656e64504352a265696e646578106464617461") + b"\x43abc",
    "GetRandom": b"\x69GetRandom",
}
#: What each answer starts with (an error answer would start a1 65 "Error").
EXPECT: dict[str, bytes] = {
    "DescribeNSM": b"\xa1\x6bDescribeNSM",
    "DescribePCR": b"\xa1\x6bDescribePCR",
    "ExtendPCR": b"\xa1\x69ExtendPCR",
    "GetRandom": b"\xa1\x69GetRandom",
}


# --------------------------------------------------------------------------- guest side


class HostCpu:
    """Ask the host for the backend's CPU time: a line on stdout, the answer in a shared file."""

    def __init__(self, share: str) -> None:
        self.share = Path(share)
        self.k = 0

    def __call__(self) -> float | None:
        self.k += 1
        answer = self.share / f"cpu-{self.k}"
        print(f"BENCH-CPU {self.k}", flush=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                value = float(answer.read_text())
                return None if value < 0 else value
            time.sleep(0.002)
        return None


def _percentile(sorted_ns: list[int], q: float) -> float:
    idx = min(len(sorted_ns) - 1, max(0, round(q * (len(sorted_ns) - 1))))
    return sorted_ns[idx] / 1000.0


def _loop(fd: int, op: str, n: int, cpu: HostCpu) -> dict[str, Any]:
    lat = [0] * n
    clock = time.perf_counter_ns
    ioctl = fcntl.ioctl
    if op == "floor":
        for _ in range(min(n, 200)):
            ioctl(fd, FIOCLEX)
        c0 = cpu()
        t_start = clock()
        for i in range(n):
            t0 = clock()
            ioctl(fd, FIOCLEX)
            lat[i] = clock() - t0
        total = clock() - t_start
    else:
        req = ctypes.create_string_buffer(REQUESTS[op], len(REQUESTS[op]))
        resp = ctypes.create_string_buffer(RESPONSE_MAX)
        template = struct.pack("<QQQQ", ctypes.addressof(req), len(REQUESTS[op]),
                               ctypes.addressof(resp), RESPONSE_MAX)
        arg = bytearray(template)
        for _ in range(min(n, 100)):
            ioctl(fd, NSM_IOCTL_RAW, arg, True)
            arg[:] = template
        c0 = cpu()
        t_start = clock()
        for i in range(n):
            t0 = clock()
            ioctl(fd, NSM_IOCTL_RAW, arg, True)
            lat[i] = clock() - t0
            arg[:] = template
        total = clock() - t_start
        if not resp.raw.startswith(EXPECT[op]):
            raise SystemExit(f"{op}: unexpected answer {resp.raw[:24]!r}")
    c1 = cpu()
    lat.sort()
    return {"n": n, "rps": n / (total / 1e9), "p50_us": _percentile(lat, 0.50),
            "p90_us": _percentile(lat, 0.90), "p99_us": _percentile(lat, 0.99),
            "mean_us": statistics.fmean(lat) / 1000.0,
            "cpu_us_per_req": None if c0 is None or c1 is None else (c1 - c0) / n * 1e6}


class GuestCpu:
    """CPU time of a process inside the guest (the CUSE server), from its schedstat."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __call__(self) -> float | None:
        with contextlib.suppress(OSError, ValueError):
            return backend_cpu_seconds(self.pid)
        return None


def cuse_loops(n: int, ops: list[str]) -> dict[str, Any]:
    """Start ``nsm cuse`` here (in the guest) and time the ops on its device."""
    node = "/dev/nsm-bench"
    server = subprocess.Popen([sys.executable, "-m", "virtio_nsm", "cuse", "--name", "nsm-bench",
                               "--ephemeral", "-q"], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(node):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"nsm cuse did not create {node}")
            time.sleep(0.05)
        fd = os.open(node, os.O_RDWR)
        cpu = GuestCpu(server.pid)
        results = {op: _loop(fd, op, n, cpu) for op in ["floor", *ops]}
        os.close(fd)
        return results
    finally:
        server.terminate()
        server.wait(30)


def guest_main(n: int, ops: list[str], share: str, idle: float, cuse: bool = False) -> None:
    cpu = HostCpu(share)
    fd = os.open("/dev/nsm", os.O_RDWR)
    results: dict[str, Any] = {}
    for op in ["floor", *ops]:
        results[op] = _loop(fd, op, n, cpu)
    idle_cpu = None
    if idle > 0:
        c0 = cpu()
        time.sleep(idle)
        c1 = cpu()
        idle_cpu = None if c0 is None or c1 is None else c1 - c0
    os.close(fd)
    cuse_results = cuse_loops(n, ops) if cuse else None
    print("BENCH-JSON " + json.dumps({"results": results, "idle_s": idle, "idle_cpu_s": idle_cpu,
                                      "kernel": os.uname().release, "cuse": cuse_results}),
          flush=True)


# --------------------------------------------------------------------------- host side


def backend_cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid``: schedstat (ns) if available, else /proc/PID/stat."""
    total, found = 0, False
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError):
                total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
                found = True
    if found:
        return total / 1e9
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class GuestOutput:
    """The guest's stdout: answers CPU questions at once, keeps the rest."""

    def __init__(self, share: Path, pid: int | None, log: Path | None = None) -> None:
        self.share, self.pid, self.log = share, pid, log
        #: The backend's SIGUSR1 statistics line logged at each question, by question number.
        self.stats: dict[int, str] = {}
        self.buf = b""
        self.lines: list[str] = []
        self.lock = threading.Lock()

    def write(self, chunk: bytes) -> int:
        with self.lock:
            self.buf += chunk
            *done, self.buf = self.buf.split(b"\n")
            for raw in done:
                line = raw.decode(errors="replace").strip()
                if line.startswith("BENCH-CPU "):
                    self._answer(line.split()[1])
                else:
                    self.lines.append(line)
        return len(chunk)

    def _answer(self, k: str) -> None:
        value = -1.0
        if self.pid is not None:
            with contextlib.suppress(OSError, ValueError):
                value = backend_cpu_seconds(self.pid)
            self._stats(int(k))
        tmp = self.share / f".cpu-{k}"
        tmp.write_text(repr(value))
        tmp.rename(self.share / f"cpu-{k}")

    def _stats(self, k: int) -> None:
        """Ask ``nsm serve`` for its statistics since the last question (SIGUSR1) and wait for them."""
        if self.log is None or self.pid is None:
            return
        seen = len(self.stats)
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if " stats: " in ln]
                if len(lines) > seen:
                    self.stats[k] = lines[-1]
                    return
            time.sleep(0.002)

    def flush(self) -> None:
        pass


TURNAROUND = re.compile(r"turnaround p10 (\d+) / p50 (\d+) / p90 (\d+) us over (\d+)")


def is_nsm_serve(argv: list[str]) -> bool:
    """Whether a variant's command runs our ``nsm serve`` (which takes ``--state-dir``)."""
    words = [Path(a).name for a in argv]
    return "serve" in words and ("virtio_nsm" in words or "nsm" in words)


def backend_argv(command: str, sock: Path, tmp: Path) -> tuple[list[str], dict[str, str]]:
    """A variant's command line and environment: private state, never the user's."""
    argv = [sys.executable if a == "python" else a for a in shlex.split(command)]
    argv += ["--vhost-user", str(sock)]
    if is_nsm_serve(argv) and not {"--state-dir", "--ephemeral"} & set(argv):
        argv += ["--state-dir", str(tmp / "state")]
    from _harness import child_env

    env = child_env(tmp)
    if "PYTHONPATH" in os.environ:  # a variant run from another tree keeps its own
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return argv, env


def _start_backend(command: str, sock: Path, tmp: Path) -> subprocess.Popen[bytes]:
    argv, env = backend_argv(command, sock, tmp)
    log = tmp / "backend.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            why = "exited with " + str(proc.returncode) if proc.poll() is not None else "timed out"
            raise SystemExit(f"backend `{shlex.join(argv)}` did not start ({why}):\n"
                             f"{log.read_text(errors='replace').strip() or '(no output)'}")
        time.sleep(0.05)
    return proc


def one_run(label: str, command: str | None, args: argparse.Namespace) -> dict[str, Any]:
    from virtio_nsm._process import stop_process
    from virtio_nsm.vm.run import RunOptions, run
    from virtio_nsm.vm.setup import load_or_setup

    tmp = Path(tempfile.mkdtemp(prefix="nsm-lat-"))
    share = tmp / "share"
    share.mkdir()
    proc: subprocess.Popen[bytes] | None = None
    try:
        if command is None:
            device = "qemu"
        else:
            sock = tmp / "nsm.sock"
            proc = _start_backend(command, sock, tmp)
            device = f"vhost-user:{sock}"
        out = GuestOutput(share, proc.pid if proc else None, tmp / "backend.log" if proc else None)
        guest = [sys.executable, str(HERE), "--guest", "-n", str(args.n), "--ops",
                 ",".join(args.ops), "--share", str(share), "--idle", str(args.idle)]
        if args.cuse:
            guest.append("--cuse")
        result = run(load_or_setup(), RunOptions(command=guest, device=device, shares=[share],
                                                 timeout=args.timeout, quiet=True,
                                                 kernel_args=args.kernel_args,
                                                 stdout=out))  # type: ignore[arg-type]
        line = next((ln for ln in out.lines if ln.startswith("BENCH-JSON ")), None)
        if result.status != 0 or line is None:
            why = [result.error or "", "\n".join(out.lines[-20:])]
            if proc is not None:
                why.append("backend log tail:\n" + "\n".join(
                    (tmp / "backend.log").read_text(errors="replace").splitlines()[-10:]))
            if result.kept:
                why.append(f"logs kept in {result.run_dir}")
            text = "\n".join(w for w in why if w.strip()) or "(no output)"
            raise SystemExit(f"guest failed (exit {result.status}):\n{text}")
        data: dict[str, Any] = json.loads(line.removeprefix("BENCH-JSON "))
        for i, op in enumerate(["floor", *args.ops]):  # question 2i+2 ends op i's timed loop
            m = TURNAROUND.search(out.stats.get(2 * i + 2, ""))
            data["results"][op]["turn_p50_us"] = float(m.group(2)) if m else None
        if proc is not None:
            stop_process(proc, timeout=10)
            data["backend_log"] = (tmp / "backend.log").read_text(errors="replace")
        return data
    finally:
        if proc is not None:
            stop_process(proc, sig=signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


def _med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(label: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"runs": len(runs), "ops": {}}
    for op in runs[0]["results"]:
        rs = [r["results"][op] for r in runs]
        summary["ops"][op] = {key: _med([x.get(key) for x in rs])
                              for key in ("rps", "p50_us", "p90_us", "p99_us", "cpu_us_per_req",
                                          "turn_p50_us")}
        summary["ops"][op]["p50_over_floor"] = _med(
            [x["p50_us"] / r["results"]["floor"]["p50_us"] for x, r in zip(rs, runs, strict=True)])
    summary["idle_cpu_s"] = _med([r["idle_cpu_s"] for r in runs])
    summary["idle_s"] = runs[0]["idle_s"]
    return summary


def print_summary(label: str, command: str | None, s: dict[str, Any], n: int) -> None:
    what = command or "QEMU's built-in C virtio-nsm-pci"
    idle = s["idle_cpu_s"]
    idle_txt = "n/a" if idle is None else f"{idle * 1e3:.1f} ms CPU in {s['idle_s']:.0f} idle s"
    print(f"\n== {label}: {what}\n   N={n}, median of {s['runs']} runs; backend idle: {idle_txt}")
    print(f"{'op':<12} {'req/s':>8} {'p50 us':>7} {'p90 us':>7} {'p99 us':>7} "
          f"{'p50/floor':>9} {'CPU us/req':>10} {'turn p50':>8}")
    for op, r in s["ops"].items():
        cpu = "-" if r["cpu_us_per_req"] is None else f"{r['cpu_us_per_req']:.1f}"
        turn = "-" if r.get("turn_p50_us") is None else f"{r['turn_p50_us']:.0f}"
        print(f"{op:<12} {r['rps']:>8.0f} {r['p50_us']:>7.1f} {r['p90_us']:>7.1f} "
              f"{r['p99_us']:>7.1f} {r['p50_over_floor']:>9.1f} {cpu:>10} {turn:>8}")


def preflight(args: argparse.Namespace) -> None:
    """Refuse early, saying what to run, instead of failing every boot alike."""
    from virtio_nsm.vm.setup import SetupError, load_or_setup

    if os.geteuid() != 0:
        raise SystemExit("bench_latency.py boots QEMU guests: run it as root")
    try:
        tc = load_or_setup()
    except SetupError as exc:
        raise SystemExit(f"no VM toolchain: {exc} (run `nsm vm setup` as root)") from None
    if args.qemu and tc.builtin_nsm_device is None:
        raise SystemExit(f"--qemu needs QEMU's own C virtio-nsm-pci, which {tc.qemu_version} "
                         "lacks (Debian builds QEMU without libcbor): run `nsm vm setup "
                         "--with-builtin-nsm` once (it builds QEMU from Debian's source), or "
                         "drop --qemu")


def host_main(args: argparse.Namespace) -> int:
    preflight(args)
    variants: list[tuple[str, str | None]] = []
    for spec in args.variant or ["ours=python -m virtio_nsm serve"]:
        label, sep, command = spec.partition("=")
        if not sep or not label or not command:
            raise SystemExit(f"--variant {spec!r}: expected LABEL=COMMAND")
        variants.append((label, command))
    if args.qemu:
        variants.append(("qemu-C", None))
    raw: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in variants}
    for i in range(args.runs):
        for label, command in variants:
            t0 = time.monotonic()
            try:
                data = one_run(label, command, args)
            except SystemExit as exc:  # one failed boot does not void the others
                print(f"run {i + 1}/{args.runs} {label}: {exc}", file=sys.stderr, flush=True)
                continue
            raw[label].append(data)
            if data.get("cuse"):
                raw.setdefault(f"{label}+cuse", []).append(
                    {"results": data["cuse"], "idle_s": 0.0, "idle_cpu_s": None,
                     "vhost_user": data["results"]})
            for ln in data.get("backend_log", "").splitlines():
                if "DEBUG" in ln:
                    print(label, ln)
            stats = next((ln.split("stopped ", 1)[1] for ln in
                          data.get("backend_log", "").splitlines() if "stopped (" in ln), "")
            data["backend_stats"] = stats
            dn = data["results"].get("DescribeNSM", {})
            print(f"run {i + 1}/{args.runs} {label}: {time.monotonic() - t0:.1f} s, "
                  f"floor p50 {data['results']['floor']['p50_us']:.1f} us, "
                  f"DescribeNSM p50 {dn.get('p50_us', float('nan')):.1f} us {stats}", flush=True)
    report: dict[str, Any] = {"n": args.n, "runs": args.runs, "variants": {}}
    if args.cuse:
        variants += [(f"{label}+cuse", f"nsm cuse in the guest (same boots as {label})")
                     for label, _ in list(variants) if f"{label}+cuse" in raw]
    for label, command in variants:
        if not raw[label]:
            print(f"\n== {label}: no successful run")
            continue
        s = summarize(label, raw[label])
        report["variants"][label] = {"command": command, "summary": s, "raw": raw[label]}
        print_summary(label, command, s, args.n)
        if label.endswith("+cuse"):
            ratios = {op: _med([r["results"][op]["p50_us"] / r["vhost_user"][op]["p50_us"]
                                for r in raw[label]]) for op in args.ops}
            report["variants"][label]["p50_over_vhost_user"] = ratios
            print("   CUSE p50 / vhost-user p50, same boot (median over runs): "
                  + ", ".join(f"{op} {v:.2f}" for op, v in ratios.items() if v is not None))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--share", help=argparse.SUPPRESS)
    ap.add_argument("-n", type=int, default=2000, help="ioctls per timed loop (default 2000)")
    ap.add_argument("--runs", type=int, default=3, help="boots per variant; medians reported")
    ap.add_argument("--ops", type=lambda s: s.split(","), default=list(OPS),
                    help="comma list of " + ",".join(OPS))
    ap.add_argument("--variant", action="append",
                    help="LABEL=COMMAND starting a backend (repeatable; "
                         "default ours='python -m virtio_nsm serve')")
    ap.add_argument("--qemu", action="store_true", help="also QEMU's built-in C device")
    ap.add_argument("--cuse", action="store_true",
                    help="also time `nsm cuse` (a CUSE device) inside each guest")
    ap.add_argument("--idle", type=float, default=10.0,
                    help="idle seconds at the end of each guest run (backend CPU measured)")
    ap.add_argument("--kernel-args", default="",
                    help="extra guest kernel arguments (diagnostics, e.g. idle=poll)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", help="write all results here")
    args = ap.parse_args()
    bad = [op for op in args.ops if op not in REQUESTS]
    if bad:
        ap.error(f"unknown op(s) {bad}")
    if args.guest:
        guest_main(args.n, args.ops, args.share, args.idle, args.cuse)
        return 0
    import _harness

    try:
        with _harness.children_cleaned_up():
            return host_main(args)
    except KeyboardInterrupt as exc:
        print(f"bench_latency: interrupted ({exc or 'SIGINT'}); every backend and guest it "
              "started is stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
