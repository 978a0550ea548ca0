"""A vhost-user NSM backend whose CA comes from ``$NSM_VM_TEST_CA`` (test helper).

``nsm serve`` makes a fresh CA per process, so nothing outside it knows the root
its documents chain to. The conformance run uses this launcher instead (through
``NSM_VM_BACKEND_CMD``): the same :class:`NsmDevice` and :class:`VhostUserDaemon`
that ``nsm serve`` runs, with a CA the host test created, so the host can verify
the guest's attestation document against that root.

    python tests/vm/backend_with_ca.py --vhost-user SOCK
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import FrameType

from virtio_nsm.nsm.device import NsmDevice
from virtio_nsm.nsm.pki import CertificateAuthority
from virtio_nsm.vhost_user.daemon import VhostUserDaemon


def main(argv: list[str]) -> int:
    sock = Path(argv[argv.index("--vhost-user") + 1])
    device = NsmDevice(ca=CertificateAuthority.load(os.environ["NSM_VM_TEST_CA"]))
    daemon = VhostUserDaemon(sock, device.handle)
    daemon.bind()

    def stop(signum: int, frame: FrameType | None) -> None:
        daemon.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        daemon.serve_forever()
    finally:
        daemon.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
