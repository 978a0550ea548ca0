"""The client API and the /dev/nsm transport's ioctl packing."""

from __future__ import annotations

import ctypes
import errno
import hashlib
from pathlib import Path

import pytest

from virtio_nsm import DeviceNotFoundError, ErrorCode, Nsm, NsmDevice, NsmError
from virtio_nsm import client as c
from virtio_nsm.nsm import protocol as p


def test_client_round_trip(device: NsmDevice) -> None:
    with Nsm.local(device) as nsm:
        assert nsm.describe_nsm().module_id == "i-0123456789abcdef0-enc0123456789abcdef"
        assert nsm.extend_pcr(16, b"a") == hashlib.sha384(bytes(48) + b"a").digest()
        nsm.lock_pcr(16)
        d = nsm.describe_pcr(16)
        assert d.lock is True and d.data == hashlib.sha384(bytes(48) + b"a").digest()
        nsm.lock_pcrs(20)
        assert nsm.describe_nsm().locked_pcrs == tuple(range(20))
        assert len(nsm.get_random()) == 256
        assert nsm.attestation(nonce=b"n")[:1] == b"\x84"


@pytest.mark.parametrize(("action", "code"), [
    (lambda n: n.describe_pcr(32), ErrorCode.InvalidIndex),
    (lambda n: n.extend_pcr(0, b""), ErrorCode.ReadOnlyIndex),
    (lambda n: n.lock_pcr(1), ErrorCode.ReadOnlyIndex),
    (lambda n: n.lock_pcrs(33), ErrorCode.InvalidIndex),
    (lambda n: n.attestation(public_key=b"k" * 5000), ErrorCode.InputTooLarge),
])
def test_errors_raise_nsm_error(device: NsmDevice, action, code: ErrorCode) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NsmError) as info:
        action(Nsm.local(device))
    assert info.value.code is code


def test_client_checks_arguments(device: NsmDevice) -> None:
    nsm = Nsm.local(device)
    with pytest.raises(ValueError):
        nsm.describe_pcr(-1)
    with pytest.raises(ValueError):
        nsm.lock_pcrs(70000)


class ScriptedTransport:
    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.sent: list[bytes] = []

    def exchange(self, request: bytes) -> bytes:
        self.sent.append(request)
        return self.answer

    def close(self) -> None:
        pass


def test_mismatched_or_malformed_answers_are_invalid_response() -> None:
    for answer in (p.encode_response(p.LockPCRResponse()), b"\xa1", p.encode_error(ErrorCode.InvalidIndex) + b"\0"):
        nsm = Nsm(ScriptedTransport(answer))
        with pytest.raises(NsmError) as info:
            nsm.describe_pcr(3)
        assert info.value.code is ErrorCode.InvalidResponse
    t = ScriptedTransport(p.encode_response(p.GetRandomResponse(b"r" * 256)))
    assert Nsm(t).get_random() == b"r" * 256
    assert t.sent == [b"\x69GetRandom"]


def test_ioctl_number_and_struct() -> None:
    assert c.NSM_IOCTL_RAW == 0xC0200A00
    assert c.NSM_RAW.size == 32
    raw = c.pack_nsm_raw(0x1122334455667788, 21, 0x99AABBCCDDEEFF00, 0x3000)
    assert raw == (bytes.fromhex("8877665544332211") + (21).to_bytes(8, "little")
                   + bytes.fromhex("00ffeeddccbbaa99") + (0x3000).to_bytes(8, "little"))
    assert c.unpack_nsm_raw(raw) == (0x1122334455667788, 21, 0x99AABBCCDDEEFF00, 0x3000)


def test_dev_nsm_transport_ioctl_arguments(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                           device: NsmDevice) -> None:
    """Emulate nsm.ko's ioctl: read the request at its address, write the answer back."""
    node = tmp_path / "nsm"
    node.touch()
    calls = []

    def fake_ioctl(fd: int, op: int, arg: bytearray, mutate: bool) -> int:
        assert op == c.NSM_IOCTL_RAW and mutate and isinstance(arg, bytearray)
        req_addr, req_len, resp_addr, resp_cap = c.unpack_nsm_raw(arg)
        request = ctypes.string_at(req_addr, req_len)
        calls.append(request)
        if req_len > p.MAX_REQUEST_SIZE:
            raise OSError(errno.EMSGSIZE, "Message too long")
        answer = device.handle(request)
        ctypes.memmove(resp_addr, answer, min(len(answer), resp_cap))
        arg[:] = c.pack_nsm_raw(req_addr, req_len, resp_addr, len(answer))
        return 0

    monkeypatch.setattr(c.fcntl, "ioctl", fake_ioctl)
    with Nsm.open(str(node)) as nsm:
        assert nsm.describe_pcr(0).lock is True
        assert nsm.extend_pcr(16, b"") == hashlib.sha384(bytes(48)).digest()
        with pytest.raises(NsmError) as info:
            nsm.attestation(user_data=b"u" * 5000)
        assert info.value.code is ErrorCode.InputTooLarge
    assert calls[0] == bytes.fromhex("a16b4465736372696265504352a165696e64657800")


def test_missing_device_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DeviceNotFoundError) as info:
        Nsm.open(str(tmp_path / "absent"))
    assert "nsm serve" in str(info.value)
    monkeypatch.setenv("NSM_DEVICE", str(tmp_path / "from-env"))
    with pytest.raises(DeviceNotFoundError, match="from-env"):
        Nsm.open()


def test_local_device_string() -> None:
    with Nsm.open("local") as nsm:
        assert nsm.describe_nsm().max_pcrs == 32
