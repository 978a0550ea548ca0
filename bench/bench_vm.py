#!/usr/bin/env python3
"""Guest-observed NSM latency through Linux's ``nsm.ko`` (not a test).

Host mode (default) boots one guest per device with ``nsm vm run`` and runs this
same file inside it in ``--guest`` mode, which times a loop of N ioctls on
``/dev/nsm`` per operation (DescribeNSM, DescribePCR, and optionally ExtendPCR
and GetRandom) beside the same loop with a trivial ioctl the kernel answers
without the device (``FIOCLEX`` on the fd): the floor that shows what the guest
(TCG) and the Python loop cost by themselves. Each loop is repeated ``--runs``
times; the run with the median p50 is reported.

    PYTHONPATH=src python bench/bench_vm.py -n 2000 --device ours --device qemu

``--device``: ``ours`` (``nsm serve --vhost-user`` started for the run),
``vhost-user:SOCK`` (a running backend) or ``qemu`` (QEMU's built-in C device,
when ``nsm vm setup --with-builtin-nsm`` built one). ``--json FILE`` saves results.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

NSM_IOCTL_RAW = 0xC0200A00
FIOCLEX = 0x5451
RESPONSE_MAX = 0x3000
HERE = Path(__file__).resolve()
REPO = HERE.parents[1]

# Requests, CBOR by hand (the guest side needs nothing but the stdlib).
REQUESTS: dict[str, bytes] = {
    "DescribeNSM": b"\x6bDescribeNSM",
    "DescribePCR": bytes.fromhex("a16b4465736372696265504352a165696e64657800"),
    "ExtendPCR": bytes.fromhex("a169457874656e64504352a265696e646578106464617461") + b"\x43abc",
    "GetRandom": b"\x69GetRandom",
}


# --------------------------------------------------------------------------- guest side


def _percentile(sorted_ns: list[int], q: float) -> float:
    idx = min(len(sorted_ns) - 1, max(0, round(q * (len(sorted_ns) - 1))))
    return sorted_ns[idx] / 1000.0


def _loop(fd: int, op: str, n: int) -> dict[str, float]:
    lat = [0] * n
    clock = time.perf_counter_ns
    ioctl = fcntl.ioctl
    if op == "floor":
        for _ in range(min(n, 200)):
            ioctl(fd, FIOCLEX)
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
        t_start = clock()
        for i in range(n):
            t0 = clock()
            ioctl(fd, NSM_IOCTL_RAW, arg, True)
            lat[i] = clock() - t0
            arg[:] = template
        total = clock() - t_start
        if resp.raw[1:2] == b"\x65" and b"Error" in resp.raw[:8]:
            raise SystemExit(f"{op}: the device answered an error")
    lat.sort()
    return {"n": n, "rps": n / (total / 1e9), "p50_us": _percentile(lat, 0.50),
            "p90_us": _percentile(lat, 0.90), "p99_us": _percentile(lat, 0.99),
            "mean_us": statistics.fmean(lat) / 1000.0}


def guest_main(n: int, runs: int, ops: list[str]) -> None:
    fd = os.open("/dev/nsm", os.O_RDWR)
    results: dict[str, Any] = {}
    for op in ["floor", *ops]:
        samples = [_loop(fd, op, n) for _ in range(runs)]
        samples.sort(key=lambda s: s["p50_us"])
        results[op] = samples[len(samples) // 2] | {
            "p50_all_us": [round(s["p50_us"], 2) for s in samples]}
    os.close(fd)
    rng = Path("/sys/class/misc/hw_random/rng_current").read_text().strip()
    print("BENCH-JSON " + json.dumps({"results": results, "rng_current": rng,
                                      "kernel": os.uname().release}))


# --------------------------------------------------------------------------- host side


def _boot(device: str, command: list[str], timeout: float) -> tuple[int, str, float, float | None]:
    """One guest via the Python API: (status, stdout, wall seconds, backend CPU seconds)."""
    import io

    sys.path.insert(0, str(REPO / "src"))
    from virtio_nsm.vm.run import RunOptions, run
    from virtio_nsm.vm.setup import load_or_setup

    out = io.BytesIO()
    tc = load_or_setup()
    t0 = time.monotonic()
    result = run(tc, RunOptions(command=command, device=device, timeout=timeout, quiet=True,
                                stdout=out))
    return result.status, out.getvalue().decode(errors="replace"), time.monotonic() - t0, \
        result.backend_cpu_s


def host_main(args: argparse.Namespace) -> int:
    report: dict[str, Any] = {"n": args.n, "runs": args.runs, "devices": {}}
    guest = [sys.executable, str(HERE), "--guest", "-n", str(args.n), "--runs", str(args.runs),
             "--ops", ",".join(args.ops)]
    for device in args.device:
        status, stdout, wall, cpu = _boot(device, guest, args.timeout)
        line = next((ln for ln in stdout.splitlines() if ln.startswith("BENCH-JSON ")), None)
        if status != 0 or line is None:
            print(f"{device}: failed (exit {status})\n{stdout}", file=sys.stderr)
            report["devices"][device] = {"error": status}
            continue
        data = json.loads(line.removeprefix("BENCH-JSON "))
        data["wall_s"] = wall
        cpu_line = ""
        if cpu is not None and args.cpu:
            # the same boot running only `true`: backend start-up, boot-time hwrng requests
            _s, _o, _w, idle_cpu = _boot(device, ["true"], args.timeout)
            if idle_cpu is not None:
                # each timed loop of n is preceded by min(n, 100) warm-up requests
                requests = len(args.ops) * args.runs * (args.n + min(args.n, 100))
                data["backend_cpu_s"] = cpu
                data["backend_cpu_idle_boot_s"] = idle_cpu
                data["backend_cpu_us_per_request"] = (cpu - idle_cpu) / requests * 1e6
                cpu_line = (f"; backend CPU {cpu:.2f} s vs {idle_cpu:.2f} s for an idle boot"
                            f" = ~{data['backend_cpu_us_per_request']:.0f} us/request")
        report["devices"][device] = data
        floor = data["results"]["floor"]["p50_us"]
        print(f"\n== device {device}  (kernel {data['kernel']}, rng {data['rng_current']}, "
              f"N={args.n}, median of {args.runs} runs, guest boot+run {wall:.1f} s{cpu_line})")
        print(f"{'op':<12} {'req/s':>9} {'p50 us':>8} {'p90 us':>8} {'p99 us':>8} "
              f"{'p50/floor':>9}")
        for op, r in data["results"].items():
            print(f"{op:<12} {r['rps']:>9.0f} {r['p50_us']:>8.1f} {r['p90_us']:>8.1f} "
                  f"{r['p99_us']:>8.1f} {r['p50_us'] / floor:>9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all("error" not in d for d in report["devices"].values()) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("-n", type=int, default=2000, help="ioctls per loop (default 2000)")
    ap.add_argument("--runs", type=int, default=3, help="loops per op; median reported")
    ap.add_argument("--ops", type=lambda s: s.split(","),
                    default=["DescribeNSM", "DescribePCR"],
                    help="comma list of DescribeNSM,DescribePCR,ExtendPCR,GetRandom")
    ap.add_argument("--device", action="append", default=None,
                    help="ours | vhost-user:SOCK | qemu (repeatable; default ours)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--no-cpu", dest="cpu", action="store_false",
                    help="skip the idle boot that measures backend CPU per request")
    args = ap.parse_args()
    bad = [op for op in args.ops if op not in REQUESTS]
    if bad:
        ap.error(f"unknown op(s) {bad}")
    if args.guest:
        guest_main(args.n, args.runs, args.ops)
        return 0
    args.device = args.device or ["ours"]
    return host_main(args)


if __name__ == "__main__":
    sys.exit(main())
