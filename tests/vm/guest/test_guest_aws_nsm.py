"""Guest-side: AWS's ``aws-nsm-interface`` (PyPI), unmodified, against ``/dev/nsm``.

Runs INSIDE a `nsm vm run` guest where ``nsm cuse`` serves ``/dev/nsm`` (the
package's own hard-coded path, opened by its own ``open_nsm_device()``): an
independent client, written for real Nitro hardware, talking to our device
through the kernel's ioctl path. Skipped anywhere else.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any

import cbor2
import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("NSM_VM_GUEST") != "1" or not os.path.exists("/dev/nsm"),
    reason="guest-side test: runs inside `nsm vm run` with /dev/nsm",
)

aws = pytest.importorskip("aws_nsm_interface")


@pytest.fixture(scope="module")
def fh() -> Iterator[Any]:
    handle = aws.open_nsm_device()
    yield handle
    aws.close_nsm_device(handle)


def test_describe_nsm(fh: Any) -> None:
    d = aws.describe_nsm(fh)
    assert d["max_pcrs"] == 32 and d["digest"] == "SHA384"
    assert set(range(16)) <= set(d["locked_pcrs"])
    assert (d["version_major"], d["version_minor"], d["version_patch"]) == (1, 0, 0)


def test_describe_extend_and_lock_pcr(fh: Any) -> None:
    before = aws.describe_pcr(fh, 16)
    assert before == {"lock": False, "data": bytes(48)}
    r = aws.extend_pcr(fh, 16, b"aws-nsm-interface")
    assert r["data"] == hashlib.sha384(bytes(48) + b"aws-nsm-interface").digest()
    assert aws.lock_pcr(fh, 16) is True
    assert aws.describe_pcr(fh, 16) == {"lock": True, "data": r["data"]}
    with pytest.raises(aws.IoctlError, match="ReadOnlyIndex"):
        aws.extend_pcr(fh, 16, b"again")
    with pytest.raises(aws.IoctlError, match="InvalidIndex"):
        aws.describe_pcr(fh, 40)


def test_lock_pcrs(fh: Any) -> None:
    assert aws.lock_pcrs(fh, 18) is True
    assert {16, 17} <= set(aws.describe_nsm(fh)["locked_pcrs"])


def test_get_random(fh: Any) -> None:
    a, b = aws.get_random(fh, 32), aws.get_random(fh, 256)
    assert len(a) == 32 and len(b) == 256 and a != b[:32]


def test_attestation_document(fh: Any) -> None:
    nonce = os.urandom(16)
    r = aws.get_attestation_doc(fh, user_data=b"ud", nonce=nonce, public_key=b"pk")
    cose = cbor2.loads(r["document"])
    cose = getattr(cose, "value", cose)
    payload = cbor2.loads(cose[2])
    assert payload["nonce"] == nonce and payload["user_data"] == b"ud"
    assert payload["public_key"] == b"pk" and 16 in payload["pcrs"]
    assert len(cose[3]) == 96
