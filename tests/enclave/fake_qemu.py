"""Stands in for QEMU in the launcher tests: plays the enclave's side of the heartbeat.

Finds the enclave's directory from the console chardev path, then, depending on
``$FAKE_QEMU_MODE``: ``ok`` (send 0xB7, expect it back, then run until SIGTERM),
``wrong`` (send another byte, then exit like a dying init), ``exit`` (exit at once),
``silent`` (never connect; run until SIGTERM).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path


def main() -> int:
    args = " ".join(sys.argv[1:])
    m = re.search(r"file,id=con,path=(\S+?)/console\.log", args)
    assert m, args
    run_dir = Path(m.group(1).replace(",,", ","))
    mode = os.environ.get("FAKE_QEMU_MODE", "ok")
    console = run_dir / "console.log"
    with open(console, "a") as fh:
        fh.write(f"fake enclave booting (mode {mode})\n")
    # kernel and initrd arrive as inherited memfds: prove they are readable
    kernel = re.search(r"-kernel (\S+)", args)
    initrd = re.search(r"-initrd (\S+)", args)
    assert kernel and initrd
    sizes = (len(Path(kernel.group(1)).read_bytes()), len(Path(initrd.group(1)).read_bytes()))
    (run_dir / "fake-qemu.txt").write_text(f"kernel {sizes[0]} bytes, initrd {sizes[1]} bytes\n")
    if mode == "exit":
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if mode in ("ok", "wrong"):
        rec = json.loads((run_dir / "enclave.json").read_text())
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(f"{rec['VsockSocket']}_9000")
        s.sendall(b"\xb7" if mode == "ok" else b"\x00")
        if mode == "wrong":
            time.sleep(0.5)
            return 0
        assert s.recv(1) == b"\xb7"
        s.close()
        with open(run_dir / "fake-qemu.txt", "a") as fh:
            fh.write("heartbeat answered\n")
    while True:
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
