"""Audit: ``nsm demo --enclave`` reads the enclave's answer; the enclave is a guest.

A hostile (or broken) enclave app must not be able to make the host side decode
a CBOR shared-reference graph (tags 28/29, issue 11 D1) or send without end.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest

from virtio_nsm import cbor
from virtio_nsm.enclave import demo, image


def _graph_key(depth: int) -> bytes:
    items = [b"\xd8\x1c" + cbor.bstr(b"x")]
    for i in range(depth):
        items.append(b"\xd8\x1c\x82" + (b"\xd8\x1d" + cbor.uint(i)) * 2)
    return cbor.array_head(len(items)) + b"".join(items)


class _FakeEnclave:
    """Answers every connection with ``answer`` (then ``endless`` bytes, if set)."""

    def __init__(self, answer: bytes, endless: bool = False) -> None:
        self.answer, self.endless = answer, endless

    def connect(self, port: int, timeout: float = 30.0) -> socket.socket:
        ours, theirs = socket.socketpair()

        def serve() -> None:
            try:
                theirs.recv(image.SAMPLE_NONCE_LEN)
                theirs.sendall(self.answer)
                while self.endless:
                    theirs.sendall(bytes(1 << 16))
            except OSError:
                pass
            finally:
                theirs.close()

        threading.Thread(target=serve, daemon=True).start()
        return ours


def _attest(enclave: Any) -> bytes:
    return demo.attest_over_vsock(enclave, bytes(image.SAMPLE_NONCE_LEN), timeout=20)


def test_shared_reference_graph_in_the_answer_is_refused_quickly() -> None:
    answer = cbor.map_head(1) + _graph_key(30) + cbor.uint(1)
    t0 = time.monotonic()
    with pytest.raises(demo.DemoError, match="not an attestation document"):
        _attest(_FakeEnclave(answer))
    assert time.monotonic() - t0 < 5


def test_endless_answer_is_refused() -> None:
    with pytest.raises(demo.DemoError, match="larger than"):
        _attest(_FakeEnclave(b"", endless=True))


def test_a_real_answer_still_gives_the_document() -> None:
    answer = (cbor.map_head(1) + cbor.tstr("Attestation") + cbor.map_head(1)
              + cbor.tstr("document") + cbor.bstr(b"doc"))
    assert _attest(_FakeEnclave(answer)) == b"doc"
