"""The real-kernel tier: boot Linux guests with the NSM device and test through ``nsm.ko``.

Host side. Each test boots one guest with ``nsm vm run`` (the CLI, as users run it);
the conformance checks themselves live in ``guest/test_guest_nsm.py`` and run inside
the guest against ``/dev/nsm``. Boots are few (each takes seconds under TCG).

Device: ``ours`` (``nsm serve --vhost-user``, started by ``nsm vm run``; the command
can be overridden with ``NSM_VM_BACKEND_CMD``). ``NSM_VM_DEVICES=ours,vhost-user:SOCK``
overrides the list.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from virtio_nsm.vm.setup import Toolchain, load_or_setup

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
GUEST_TESTS = Path(__file__).resolve().parent / "guest" / "test_guest_nsm.py"


def _serve_available() -> bool:
    from virtio_nsm.vm.run import backend_available

    return backend_available()


def _devices() -> list[str]:
    env = os.environ.get("NSM_VM_DEVICES")
    if env:
        return [d for d in env.split(",") if d]
    # QEMU's C device (`--device qemu`) is a reference, not a model: it differs from the
    # real device (no PCRs locked at boot, other key order, hangs on some malformed
    # requests), so the conformance suite runs against our backend only by default.
    return ["ours"]


@pytest.fixture(scope="session")
def toolchain() -> Toolchain:
    return load_or_setup()


def nsm_vm_run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    src = str(REPO / "src")
    env["PYTHONPATH"] = ":".join([src, *[p for p in env.get("PYTHONPATH", "").split(":") if p]])
    return subprocess.run([sys.executable, "-m", "virtio_nsm", "vm", "run", *args],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO)


def test_run_plumbing_without_device(toolchain: Toolchain) -> None:
    """Exit status, stdout+stderr relay, read-only host root, writable /tmp, same venv."""
    script = (
        "echo out; echo err >&2; "
        "touch /nsm-vm-should-fail 2>/dev/null && echo ROOT-WRITABLE; "
        "touch /tmp/ok && echo tmp-ok; "
        f"{sys.executable} -c 'import virtio_nsm, cbor2; print(\"py-ok\")'; "
        "exit 3"
    )
    r = nsm_vm_run("--device", "none", "--timeout", "120", "--", "sh", "-c", script)
    assert r.returncode == 3, r.stderr
    assert "out\n" in r.stdout and "err\n" in r.stdout
    assert "ROOT-WRITABLE" not in r.stdout
    assert "tmp-ok" in r.stdout and "py-ok" in r.stdout
    assert "console log:" in r.stderr  # printed because the status was non-zero


@pytest.mark.parametrize("device", _devices())
def test_guest_conformance(toolchain: Toolchain, device: str, tmp_path: Path) -> None:
    if device == "ours" and not _serve_available():
        pytest.fail("`nsm serve --vhost-user` is not available yet (vhost-user backend)")
    out = tmp_path / "out"
    out.mkdir()
    r = nsm_vm_run(
        "--device", device, "--share", str(out), "--env", f"NSM_VM_OUT={out}",
        "--timeout", "400", "--",
        sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-ra", "--color=no",
        "--rootdir", str(REPO), str(GUEST_TESTS),
    )
    print(r.stdout)
    print(r.stderr, file=sys.stderr)
    assert r.returncode == 0, f"guest suite failed on device {device}:\n{r.stdout}\n{r.stderr}"
    assert " passed" in r.stdout and " skipped" not in r.stdout.splitlines()[-1]
    doc = out / "attestation.cbor"
    assert doc.exists() and doc.stat().st_size > 1000
    # TODO(issue 5): verify `doc` on the host against the device's root with a nonce
    # policy once the verifier lands on main (the guest wrote the nonce in attestation.json).
