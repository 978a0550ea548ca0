"""`nsm demo`: the whole stack end to end on an embedded device, no VM needed.

An in-process NsmDevice is served by the vhost-user backend on a private
socket; our Python virtio driver (the vhost-user frontend) sends every kind of
request over a real split virtqueue in shared memory; the attestation
document is then verified against the device's root with nonce and PCR
policies.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from pathlib import Path

import click
from cryptography import x509

from ..client import Nsm
from ..errors import ErrorCode, NsmError
from ..nsm.frontend import VhostUserTransport
from ..serving import ServeConfig, Served, serving
from ..verify import VerificationError, verify_document
from . import main


class DemoFailed(Exception):
    pass


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise DemoFailed(what)


@main.command()
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Also write the attestation document here (with --enclave: a directory "
              "for the document, its root certificate and the image).")
@click.option("--enclave", is_flag=True,
              help="Instead: the enclave loop (build the sample image, describe, run it under "
              "QEMU, attest over vsock, verify against the described PCRs, terminate). Needs "
              "root and the VM toolchain (`nsm vm setup`, built on first use).")
def demo(output: Path | None, enclave: bool) -> None:
    """Run every NSM request through vhost-user on an embedded device and verify a document."""
    if enclave:
        _enclave_demo(output)
        return
    step = click.echo
    # An in-memory device on a socket in a private temporary directory (removed on exit).
    config = ServeConfig(socket_path=None, ephemeral=True)
    try:
        with serving(config) as served:
            _run_demo(served, output, step)
    except (DemoFailed, NsmError, VerificationError, OSError) as exc:
        click.echo(f"nsm demo: FAILED: {exc}", err=True)
        raise SystemExit(1) from None


def _run_demo(served: Served, output: Path | None, step: Callable[[str], None]) -> None:
    daemon, socket_path = served.daemon, served.socket_path
    assert served.nsm is not None
    device = served.nsm.device
    thread = threading.Thread(target=daemon.serve_forever, name="nsm-backend", daemon=True)
    thread.start()
    try:
        step(f"backend: vhost-user NSM device on {socket_path} (virtio id 33)")
        # poll_us=0: the backend is a thread of this process, which a spinning driver
        # would keep from the GIL; the driver sleeps until the interrupt instead.
        with Nsm(VhostUserTransport(str(socket_path), poll_us=0)) as nsm:
            step("driver:  Python virtio driver connected (split ring in shared memfd memory)")
            d = nsm.describe_nsm()
            step(f"DescribeNSM   module_id={d.module_id} digest={d.digest} max_pcrs={d.max_pcrs} "
                 f"locked={d.locked_pcrs[0]}-{d.locked_pcrs[-1]}")
            _check(d.locked_pcrs == tuple(range(16)), "boot PCRs 0-15 should be locked")
            pcr4 = nsm.describe_pcr(4)
            step(f"DescribePCR   PCR4 locked={pcr4.lock} {pcr4.data.hex()[:32]}...")
            measurement = b"demo application v1"
            value = nsm.extend_pcr(16, measurement)
            step(f"ExtendPCR     PCR16 <- H(PCR16 || {measurement!r}) = {value.hex()[:32]}...")
            nsm.lock_pcr(16)
            step("LockPCR       PCR16 locked")
            try:
                nsm.extend_pcr(16, b"tampering")
                raise DemoFailed("a locked PCR accepted an extend")
            except NsmError as exc:
                _check(exc.code is ErrorCode.ReadOnlyIndex, f"expected ReadOnlyIndex, got {exc.code.name}")
                step("ExtendPCR     PCR16 again -> ReadOnlyIndex (as the real device answers)")
            nsm.lock_pcrs(17)
            step("LockPCRs      PCR0-16 locked (already locked: not an error)")
            random = nsm.get_random()
            step(f"GetRandom     {len(random)} bytes {random.hex()[:32]}...")
            nonce = secrets.token_bytes(32)
            document = nsm.attestation(nonce=nonce, user_data=b"hello from the demo")
            step(f"Attestation   {len(document)}-byte COSE_Sign1 document (ES384)")
        root = x509.load_pem_x509_certificate(device.root_certificate_pem)
        verified = verify_document(document, roots=[root], nonce=nonce,
                                   expected_pcrs={16: value}, max_age=60)
        step(f"verified:     chain of {len(verified.chain)} certificates to the device root, "
             f"nonce and PCR16 match, {len(verified.pcrs)} PCRs attested")
        try:
            verify_document(document)
            raise DemoFailed("our document verified against the AWS root")
        except VerificationError:
            step("verified:     the same document is rejected against the AWS Nitro root")
        if output is not None:
            output.write_bytes(document)
            (output.with_suffix(output.suffix + ".root.pem")).write_bytes(device.root_certificate_pem)
            step(f"wrote {output} and its root {output}.root.pem "
                 f"(try: nsm verify {output} --root {output}.root.pem)")
        step("demo passed")
    finally:
        daemon.stop()
        thread.join(timeout=10)


def _enclave_demo(output: Path | None) -> None:
    from ..enclave.demo import DemoError, run_demo
    from ..enclave.launcher import EnclaveError
    from ..enclave.registry import RegistryError
    from ..vm.setup import SetupError

    try:
        run_demo(click.echo, keep=output)
    except (DemoError, EnclaveError, RegistryError, SetupError, VerificationError, OSError) as exc:
        click.echo(f"nsm demo --enclave: FAILED: {exc}", err=True)
        raise SystemExit(1) from None
