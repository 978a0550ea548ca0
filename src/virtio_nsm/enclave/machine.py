"""The QEMU side of an enclave: a TCG ``microvm`` with our devices on virtio-mmio.

Like QEMU's ``nitro-enclave`` machine (a microvm with the NSM and a vhost-user
vsock device on virtio-mmio transports), built from stock QEMU:

* ``-M microvm`` with ACPI (Debian's kernel has no ``virtio_mmio.device=``
  support: it finds the transports in microvm's ACPI tables) and
  ``virtio-mmio.force-legacy=false`` (our devices are VERSION_1 only);
* guest RAM in a shared memfd (vhost-user backends map it);
* the NSM as ``vhost-user-test-device`` (virtio ID 33, one queue), the vsock
  device as ``vhost-user-vsock-device`` (its config, the guest CID, comes from
  the backend);
* the image's kernel, its ramdisks concatenated as the initrd, its cmdline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from virtio_nsm.vm.setup import Toolchain


def _opt(value: object) -> str:
    """A value inside a QEMU ``key=value,...`` option: commas are doubled."""
    return str(value).replace(",", ",,")


@dataclass
class MachineSpec:
    kernel: str
    """path QEMU reads the kernel from (a file or ``/dev/fd/N``)"""
    initrd: str
    cmdline: str
    cpus: int
    memory_mib: int
    console_log: Path
    nsm_socket: Path | None = None
    vsock_socket: Path | None = None


def qemu_argv(tc: Toolchain, spec: MachineSpec) -> list[str]:
    mem = spec.memory_mib
    argv = [
        *tc.qemu,
        "-accel", "tcg", "-M", "microvm,acpi=on,pit=on,pic=on,rtc=on,memory-backend=mem", "-cpu", "max",
        "-smp", str(spec.cpus), "-m", f"{mem}M",
        "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none", "-monitor", "none",
        "-object", f"memory-backend-memfd,id=mem,size={mem}M,share=on",
        "-global", "virtio-mmio.force-legacy=false",
        "-kernel", spec.kernel, "-initrd", spec.initrd, "-append", spec.cmdline,
        "-chardev", f"file,id=con,path={_opt(spec.console_log)}",
        "-serial", "chardev:con",
    ]
    if spec.nsm_socket is not None:
        argv += ["-chardev", f"socket,id=nsm0,path={_opt(spec.nsm_socket)}",
                 "-device", "vhost-user-test-device,chardev=nsm0,virtio-id=33,num_vqs=1"]
    if spec.vsock_socket is not None:
        argv += ["-chardev", f"socket,id=vsock0,path={_opt(spec.vsock_socket)}",
                 "-device", "vhost-user-vsock-device,chardev=vsock0"]
    return argv
