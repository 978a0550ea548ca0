"""The real-kernel tier: boot Linux guests (QEMU TCG) with the NSM device attached.

:func:`virtio_nsm.vm.setup.setup` builds the cached toolchain (QEMU, Debian's
kernel with ``nsm.ko``, a busybox initramfs); :func:`virtio_nsm.vm.run.run`
boots a throwaway guest that runs one command chrooted into the host's root.
"""

from __future__ import annotations

from virtio_nsm.vm.run import RunOptions, RunResult, VmError
from virtio_nsm.vm.setup import SetupError, Toolchain, default_cache_dir, load_or_setup

__all__ = [
    "RunOptions",
    "RunResult",
    "SetupError",
    "Toolchain",
    "VmError",
    "default_cache_dir",
    "load_or_setup",
]
