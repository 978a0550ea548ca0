"""Run enclave images locally: EIF boot under QEMU TCG with our NSM and vsock devices."""
