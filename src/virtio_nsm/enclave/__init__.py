"""Run enclave images locally: EIF boot under QEMU TCG with our NSM and vsock devices.

The library behind ``nsm enclave``::

    from virtio_nsm import enclave
    e = enclave.start(enclave.image_from_eif(Path("app.eif")), enclave.EnclaveOptions())
    with e.connect(5000) as sock: ...     # the enclave's vsock port 5000
    e.wait(timeout=None)                  # until it powers off
    e.terminate()

Modules: :mod:`.image` (the sample image), :mod:`.machine` (QEMU's microvm),
:mod:`.supervisor` (the per-enclave process), :mod:`.registry` (run directories),
:mod:`.launcher` (start, find, connect, terminate), :mod:`.demo`.
"""

from virtio_nsm.enclave.launcher import (
    BootImage,
    Enclave,
    EnclaveError,
    EnclaveOptions,
    connect_vsock,
    find,
    image_from_eif,
    image_from_parts,
    list_enclaves,
    start,
)

__all__ = [
    "BootImage",
    "Enclave",
    "EnclaveError",
    "EnclaveOptions",
    "connect_vsock",
    "find",
    "image_from_eif",
    "image_from_parts",
    "list_enclaves",
    "start",
]
