"""``nsm demo --enclave``: the whole enclave loop in one command.

Build the sample image -> describe it (PCR0-2) -> run it (TCG microvm, our NSM and
vsock) -> ask the enclave's app for an attestation document over vsock with a fresh
nonce -> verify the document against the device's root with the described PCRs ->
terminate and check that nothing is left.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from virtio_nsm import _strict_cbor
from virtio_nsm.eif import read_eif
from virtio_nsm.enclave import image, launcher
from virtio_nsm.nsm.protocol import MAX_RESPONSE_SIZE
from virtio_nsm.verify import verify_document
from virtio_nsm.vm.setup import Toolchain, load_or_setup

#: An NSM answer fits the driver's response buffer; anything beyond is not one.
_MAX_ANSWER = MAX_RESPONSE_SIZE


class DemoError(RuntimeError):
    pass


def attest_over_vsock(enclave: launcher.Enclave, nonce: bytes, timeout: float = 120.0) -> bytes:
    """The sample app's protocol: send the nonce, read the NSM's CBOR answer; the document."""
    if len(nonce) != image.SAMPLE_NONCE_LEN:
        raise ValueError(f"the sample app takes a {image.SAMPLE_NONCE_LEN}-byte nonce")
    with enclave.connect(image.SAMPLE_PORT, timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(nonce)
        chunks = []
        size = 0
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > _MAX_ANSWER:  # the enclave is a guest: never read it without end
                raise DemoError(f"the enclave's answer is larger than {_MAX_ANSWER} bytes")
    raw = b"".join(chunks)
    try:
        # the strict decoder: no tags (a shared-reference graph cannot blow up, issue 11 D1)
        answer = _strict_cbor.loads(raw)
        document = answer["Attestation"]["document"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DemoError(f"the enclave's answer is not an attestation document "
                        f"({len(raw)} bytes: {raw[:80]!r}): {exc}") from None
    if not isinstance(document, bytes):
        raise DemoError("the enclave's answer carries no document bytes")
    return document


def run_demo(say: Callable[[str], None], tc: Toolchain | None = None,
             keep: Path | None = None) -> None:
    t_all = time.monotonic()
    tc = tc or load_or_setup(progress=say)
    tmp = Path(tempfile.mkdtemp(prefix="nsm-enclave-demo-"))
    enclave: launcher.Enclave | None = None
    try:
        eif = tmp / "sample.eif"
        say(f"1/6 build   the sample image from Debian's kernel "
            f"{image.enclave_kernel(tc).version} (AWS-like init, app on vsock port "
            f"{image.SAMPLE_PORT})")
        image.build_sample_eif(tc, eif, progress=say)
        described = read_eif(eif).describe()
        pcrs = {i: bytes.fromhex(described["Measurements"][f"PCR{i}"]) for i in (0, 1, 2)}
        say(f"2/6 describe {eif.name}: {eif.stat().st_size} bytes, CheckCRC "
            f"{described['CheckCRC']}")
        for i, v in pcrs.items():
            say(f"             PCR{i} {v.hex()}")
        say("3/6 run     booting under QEMU TCG (a microvm; tens of seconds) and waiting for "
            "the heartbeat on vsock port 9000 ...")
        t0 = time.monotonic()
        enclave = launcher.start(launcher.image_from_eif(eif), launcher.EnclaveOptions(), tc)
        say(f"             ready after {time.monotonic() - t0:.1f} s: {enclave.enclave_id}, "
            f"CID {enclave.cid}, vsock {enclave.vsock_socket}")
        nonce = secrets.token_bytes(image.SAMPLE_NONCE_LEN)
        say(f"4/6 attest  CONNECT {image.SAMPLE_PORT} on the vsock socket, send nonce "
            f"{nonce.hex()[:16]}..., the app asks /dev/nsm")
        document = attest_over_vsock(enclave, nonce)
        say(f"             got a {len(document)}-byte attestation document")
        root_pem = enclave.nsm_root_certificate.read_bytes()
        root = x509.load_pem_x509_certificate(root_pem)
        verified = verify_document(document, roots=[root], nonce=nonce, expected_pcrs=pcrs,
                                   max_age=300)
        say(f"5/6 verify  chain of {len(verified.chain)} certificates to the device's root; "
            "nonce and PCR0/1/2 equal the described values")
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            (keep / "document.cbor").write_bytes(document)
            (keep / "root.pem").write_bytes(root_pem)
            shutil.copy(eif, keep / "sample.eif")
            say(f"             kept {keep}/document.cbor, root.pem, sample.eif (try: nsm verify "
                f"{keep}/document.cbor --root {keep}/root.pem --nonce {nonce.hex()} "
                + " ".join(f"--pcr {i}={v.hex()}" for i, v in pcrs.items()) + ")")
        run_dir = enclave.run_dir
        enclave.terminate()
        enclave = None
        if run_dir.exists():
            raise DemoError(f"terminate left {run_dir} behind")
        say(f"6/6 terminate: no process, socket or file left; demo passed in "
            f"{time.monotonic() - t_all:.0f} s")
    finally:
        if enclave is not None:
            enclave.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
