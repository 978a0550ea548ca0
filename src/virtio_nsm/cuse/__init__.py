"""``/dev/nsm`` without a VM: the NSM ioctl served through Linux's CUSE.

* :mod:`.protocol`: the FUSE/CUSE wire format (sans-IO codec);
* :mod:`.session`: the CUSE session and the ``NSM_IOCTL_RAW`` retry protocol (sans-IO);
* :mod:`.server`: the ``/dev/cuse`` loop and the device node (``nsm cuse``).
"""

from .server import CuseServer, CuseUnavailable
from .session import NSM_IOCTL_RAW, CuseSession, nsm_ioctl

__all__ = ["NSM_IOCTL_RAW", "CuseServer", "CuseSession", "CuseUnavailable", "nsm_ioctl"]
