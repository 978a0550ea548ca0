"""Time from ``nsm enclave run`` to ready, beside a plain ``nsm vm run`` of the same kernel.

    PYTHONPATH=src python bench/bench_enclave_boot.py [--rounds 3]

Builds the sample image, then in alternating rounds (medians; same machine, same run):

* ``enclave run``: wall time of ``nsm enclave run --eif-path sample.eif`` (checks the
  image, starts the supervisor, nsm serve, the vsock backend and QEMU's TCG microvm,
  returns on the readiness heartbeat), and the supervisor's own QEMU-start-to-heartbeat
  time; the enclave is then terminated (not timed);
* ``vm run``: wall time of ``nsm vm run -- true`` (q35, virtio-pci, 9p root, the same
  Debian kernel, ``nsm serve``): boot, run ``true``, power off.

Needs root and the VM toolchain. Not a test: TCG boot times depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _nsm(*args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "virtio_nsm", *args], capture_output=True,
                         text=True, timeout=900)
    return time.monotonic() - t0, res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nsm-bench-enclave-") as tmp:
        eif = Path(tmp) / "sample.eif"
        _t, res = _nsm("enclave", "build-sample", "-o", str(eif))
        if res.returncode != 0:
            print(res.stderr, file=sys.stderr)
            return 1
        os.environ["NSM_ENCLAVE_RUN_DIR"] = str(Path(tmp) / "runs")
        enclave_wall: list[float] = []
        enclave_ready: list[float] = []
        vm_wall: list[float] = []
        for i in range(args.rounds):
            wall, res = _nsm("enclave", "run", "--eif-path", str(eif))
            if res.returncode != 0:
                print(res.stderr, file=sys.stderr)
                return 1
            info = json.loads(res.stdout)
            rec = json.loads((Path(tmp) / "runs" / info["EnclaveID"] / "enclave.json").read_text())
            enclave_wall.append(wall)
            enclave_ready.append(float(rec["_ready_seconds"]))
            _nsm("enclave", "terminate", "--enclave-id", info["EnclaveID"])
            wall, res = _nsm("vm", "run", "--", "true")
            if res.returncode != 0:
                print(res.stderr, file=sys.stderr)
                return 1
            vm_wall.append(wall)
            print(f"round {i + 1}: enclave run {enclave_wall[-1]:.1f} s (QEMU to heartbeat "
                  f"{enclave_ready[-1]:.1f} s), vm run {vm_wall[-1]:.1f} s", flush=True)
    em, rm, vm = (statistics.median(x) for x in (enclave_wall, enclave_ready, vm_wall))
    print(f"median of {args.rounds}: nsm enclave run -> ready {em:.1f} s "
          f"(QEMU start -> heartbeat {rm:.1f} s); nsm vm run -- true {vm:.1f} s; "
          f"ratio {em / vm:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
