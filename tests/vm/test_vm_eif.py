"""A device served with ``--eif`` reports a production enclave's PCRs through ``nsm.ko``.

Host side (``@pytest.mark.vm``): builds an image from the cache's Debian kernel and a
cpio, reads its PCRs with ``nsm eif describe``, boots a guest whose device is served
with ``nsm vm run --eif ... --parent-instance-id ...``, reads PCR0-15 through
``/dev/nsm`` and makes an attestation document in the guest, then verifies the document
here with ``nsm verify --pcr 0=<describe's PCR0> --pcr 1=... --pcr 2=...``.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from virtio_nsm.eif.measure import pcr_of_instance
from virtio_nsm.vm.setup import Toolchain, load_or_setup

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
INSTANCE = "i-0123456789abcdef0"
NONCE = "5eed0123abcd"


@pytest.fixture(scope="module")
def toolchain() -> Toolchain:
    return load_or_setup()


def _nsm(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("NSM_VM_BACKEND_CMD", None)
    env["PYTHONPATH"] = ":".join([str(REPO / "src"), *[p for p in env.get("PYTHONPATH", "").split(":") if p]])
    return subprocess.run([sys.executable, "-m", "virtio_nsm", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def test_eif_device_has_the_production_layout(toolchain: Toolchain, tmp_path: Path) -> None:
    kernel = toolchain.kernels[toolchain.default_kernel].vmlinuz
    cpios = sorted(glob.glob(os.path.join(toolchain.cache_dir, "initramfs", "*.cpio")))
    assert cpios, "the VM cache has no initramfs"
    app = tmp_path / "app.cpio"
    app.write_bytes(b"070701" + os.urandom(4096))  # the application ramdisk: only measured here
    image = tmp_path / "app.eif"
    built = _nsm("eif", "build", "--kernel", kernel, "--cmdline", "console=ttyS0 quiet",
                 "--ramdisk", cpios[0], "--ramdisk", str(app), "--name", "vm-tier", "-o", str(image))
    assert built.returncode == 0, built.stderr
    described = _nsm("eif", "describe", "--eif-path", str(image), "--json")
    assert described.returncode == 0, described.stderr
    info = json.loads(described.stdout)
    assert info["CheckCRC"] is True and info["ImageName"] == "vm-tier"
    pcrs = {i: info["Measurements"][f"PCR{i}"] for i in range(3)}

    out = tmp_path / "out"
    out.mkdir()
    state = tmp_path / "state"
    script = (f"for i in $(seq 0 16); do nsm pcr get $i --json; done > {out}/pcrs.json && "
              f"nsm attest --nonce {NONCE} -o {out}/doc.cose")
    run = _nsm("vm", "run", "--state-dir", str(state), "--eif", str(image),
               "--parent-instance-id", INSTANCE, "--share", str(out), "--timeout", "300",
               "--", "sh", "-c", script)
    assert run.returncode == 0, run.stdout + run.stderr
    text, seen, decoder = (out / "pcrs.json").read_text(), [], json.JSONDecoder()
    position = 0
    while text[position:].strip():  # one indented JSON object per `nsm pcr get --json`
        position += len(text[position:]) - len(text[position:].lstrip())
        entry, position = decoder.raw_decode(text, position)
        seen.append(entry)
    values = {entry["index"]: (entry["locked"], entry["data"]) for entry in seen}
    zero = "00" * 48
    expected = {0: pcrs[0], 1: pcrs[1], 2: pcrs[2], 4: pcr_of_instance(INSTANCE).hex()}
    for index in range(16):
        assert values[index] == (True, expected.get(index, zero)), index
    assert values[16] == (False, zero)

    verify = [f"--pcr={i}={pcrs[i]}" for i in range(3)]
    ok = _nsm("verify", str(out / "doc.cose"), "--root", str(state / "ca" / "root.pem"),
              "--nonce", NONCE, *verify, f"--pcr=3={zero}", f"--pcr=4={expected[4]}")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    wrong = _nsm("verify", str(out / "doc.cose"), "--root", str(state / "ca" / "root.pem"),
                 f"--pcr=0={'11' * 48}")
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr

    # the same state directory with another boot configuration is refused
    again = _nsm("vm", "run", "--state-dir", str(state), "--eif", str(image),
                 "--parent-instance-id", "i-00000000000000000", "--timeout", "60", "--", "true")
    assert again.returncode != 0
    assert "different boot configuration" in again.stderr + again.stdout
