"""Audit: the vhost-user message/ring fuzzer of issue 11, against the vsock device.

``tests/vhost_user/test_vhost_fuzz.py`` fuzzes message sequences against the NSM
and a two-queue test device; the vsock device (three queues, a config space, a
Unix-socket host side) came later. Same generator, same invariants (no exception
but the two that drop a connection, every descriptor consumed or closed, no
leak), with ring 0 and ring 1 (tx: the guest's packets, from noise in memory)
set up, so hostile packets and chains reach the bridge.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "vhost_user"))

from test_vhost_fuzz import FUZZ, Fuzzer, open_fds

from virtio_nsm.vhost_user.backend import VhostUserBackend
from virtio_nsm.vhost_user.message import FrontendRequest as R
from virtio_nsm.vhost_user.message import Message, VringFd, VringState
from virtio_nsm.vsock.device import VsockDevice


class VsockFuzzer(Fuzzer):
    def __init__(self, tmp: Path, draw: object) -> None:
        super().__init__(tmp, draw)  # type: ignore[arg-type]
        self.backend.disconnect()  # the backend and device the base class made: not used here
        if self.other is not None:
            self.other.detach()
        self.vsock = VsockDevice(5, tmp / "v.sock")
        self.other = None
        self.backend = VhostUserBackend(self.vsock)

    def setup(self) -> list[Message]:
        steps = super().setup()
        # ring 1 (tx) on the same rings as ring 0: the guest's packets are the noise
        kick = os.eventfd(0)
        self.pending.append(kick)
        self.ours.append(os.dup(kick))
        ring0 = [m for m in steps if m.request in (R.VHOST_USER_SET_VRING_NUM, R.VHOST_USER_SET_VRING_ADDR)]
        extra = []
        for m in ring0:
            payload = bytearray(m.payload)
            payload[0:4] = (1).to_bytes(4, "little")
            extra.append(Message(m.request, m.flags, bytes(payload), []))
        extra += [
            Message(R.VHOST_USER_SET_VRING_KICK, payload=VringFd(1, False).encode(), fds=[kick]),
            Message(R.VHOST_USER_SET_VRING_ENABLE, payload=VringState(1, 1).encode()),
        ]
        return steps + extra


@FUZZ
@given(st.data())
def test_fuzz_vsock_backend_message_sequences(tmp_path: Path, data: st.DataObject) -> None:
    before = open_fds()
    fuzzer = VsockFuzzer(tmp_path, data.draw)
    try:
        fuzzer.run()
    finally:
        fuzzer.vsock.detach()  # even when Hypothesis ends the example early
    after = open_fds()
    leaked = {fd: what for fd, what in after.items() if before.get(fd) != what}
    assert not leaked, f"descriptors leaked: {leaked}"
