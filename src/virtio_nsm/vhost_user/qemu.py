"""QEMU's command-line options that attach a vhost-user device: the one place that writes them.

A vhost-user backend needs three things from QEMU: guest RAM that the backend can
map (``-object memory-backend-memfd,...,share=on`` and ``-machine memory-backend``;
the memfd is sealed against shrinking by default, which our backend requires), a
socket chardev, and a device front-end on PCI or virtio-mmio:

* devices QEMU has no dedicated front-end for (the NSM, virtio id 33) use the
  generic ``vhost-user-test-device-pci`` / ``vhost-user-test-device`` with
  ``virtio-id`` and ``num_vqs`` (QEMU >= 10.2);
* virtio-vsock (id 19) has its own, ``vhost-user-vsock-pci`` /
  ``vhost-user-vsock-device`` (the guest CID comes from the backend's config space).

Values inside ``key=value,...`` options have their commas doubled (QEMU's escaping).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

__all__ = [
    "VIRTIO_ID_VSOCK",
    "QemuDevice",
    "device_args",
    "for_device",
    "memory_args",
    "option",
    "options_text",
]

VIRTIO_ID_VSOCK: Final = 19

Transport = Literal["pci", "mmio"]


def option(value: object) -> str:
    """A value inside a QEMU ``key=value,...`` option: commas are doubled."""
    return str(value).replace(",", ",,")


@dataclass(frozen=True, slots=True)
class QemuDevice:
    """How QEMU attaches one vhost-user device: its front-end on each bus and its properties."""

    pci: str
    mmio: str
    properties: tuple[tuple[str, str], ...] = ()

    def driver(self, transport: Transport) -> str:
        return self.pci if transport == "pci" else self.mmio


def for_device(device_id: int, num_queues: int) -> QemuDevice:
    """The QEMU front-end for a device with this virtio id and queue count."""
    if device_id == VIRTIO_ID_VSOCK:
        return QemuDevice("vhost-user-vsock-pci", "vhost-user-vsock-device")
    return QemuDevice(
        "vhost-user-test-device-pci",
        "vhost-user-test-device",
        (("virtio-id", str(device_id)), ("num_vqs", str(num_queues))),
    )


def memory_args(size: str) -> list[str]:
    """Guest RAM the backend can map: a shared memfd (``size`` as for ``-m``, e.g. ``512M``)."""
    return [
        "-object", f"memory-backend-memfd,id=mem,size={option(size)},share=on",
        "-machine", "memory-backend=mem",
    ]


def device_args(
    device: QemuDevice,
    socket_path: str | Path,
    *,
    chardev: str = "nsm0",
    transport: Transport = "pci",
) -> list[str]:
    """The chardev and ``-device`` options attaching ``device`` served on ``socket_path``."""
    props = "".join(f",{key}={option(value)}" for key, value in device.properties)
    return [
        "-chardev", f"socket,id={chardev},path={option(socket_path)}",
        "-device", f"{device.driver(transport)},chardev={chardev}{props}",
    ]


def options_text(argv: list[str]) -> str:
    """Options as one line to paste into a shell."""
    return shlex.join(argv)
