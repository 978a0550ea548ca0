"""Fuzzing the snapshot decoders: state files, signed snapshots, device-state loads.

Whatever the bytes -- random, a mutated genuine snapshot, or a body of arbitrary
CBOR *signed with the right CA key* (what even the key holder could produce) --
decoding only ever raises :class:`StateError`, and a load or import that is
accepted never leaves a state the device could not have reached by itself: boot
PCRs locked, no lock lost, no locked value changed, no sequence number going back.

The suite runs ``NSM_FUZZ_EXAMPLES`` examples per target (default 150); for a
longer run: ``NSM_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/durable/test_snapshot_fuzz.py``.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from virtio_nsm import persist as ps
from virtio_nsm.cose import der_to_raw
from virtio_nsm.durable import DurableNsm
from virtio_nsm.nsm.device import DeviceState
from virtio_nsm.nsm.pcr import BOOT_LOCKED_PCRS, Digest, PcrBank
from virtio_nsm.nsm.pki import CertificateAuthority

EXAMPLES = int(os.environ.get("NSM_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

CA = CertificateAuthority.generate()


def sign_body(body: bytes, ca: CertificateAuthority = CA) -> bytes:
    """A signed snapshot around arbitrary body bytes (the signer is trusted, the body is not)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    head = ps._HEADER.pack(ps.SNAPSHOT_MAGIC, ps.SNAPSHOT_VERSION, len(body)) + body
    return head + der_to_raw(ca.key.sign(ps._SIGNATURE_CONTEXT + head, ec.ECDSA(hashes.SHA384())))


def checksummed(body: bytes) -> bytes:
    """A format-1 state file (no journal) around arbitrary body bytes."""
    head = ps._HEADER.pack(ps.MAGIC, 1, len(body)) + body
    return head + hashlib.sha256(head).digest()


def genuine_body(state: DeviceState, seq: int) -> dict[str, Any]:
    return {
        "module_id": state.module_id, "version": list(state.version), "digest": state.pcrs.digest.value,
        "pcrs": list(state.pcrs.values), "locked": state.pcrs.locked, "seq": seq, "last": None,
        "saved_at": int(time.time() * 1000),
    }


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True),
    st.binary(max_size=80), st.text(max_size=40),
)
cbor_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=40),
        st.dictionaries(st.one_of(st.text(max_size=12), st.integers()), inner, max_size=8),
        st.builds(cbor2.CBORTag, st.sampled_from([0, 1, 2, 24, 28, 29, 55799, 258]), inner),
    ),
    max_leaves=60,
)
FIELDS = ["module_id", "version", "digest", "pcrs", "locked", "seq", "last", "saved_at"]


@st.composite
def mutated_bodies(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    """A genuine body with some fields replaced, dropped or added."""
    body = dict(base)
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=4)):
        action = draw(st.sampled_from(["replace", "drop", "plausible", "plausible", "plausible"]))
        if action == "drop":
            body.pop(field, None)
        elif action == "replace":
            body[field] = draw(cbor_values)
        else:
            body[field] = draw(plausible(field, base))
    if draw(st.booleans()) and draw(st.booleans()):
        body[draw(st.text(max_size=8))] = draw(cbor_values)
    return body


def plausible(field: str, base: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values of the right type and near the edges: where semantic checks must hold."""
    size = len(base["pcrs"][0])
    match field:
        case "locked":
            return st.integers(min_value=-1, max_value=2**33)
        case "seq" | "saved_at":
            return st.integers(min_value=-2, max_value=2**64)
        case "pcrs":
            return st.lists(st.sampled_from([bytes(size), b"\xff" * size, bytes(32), bytes(64)]),
                            min_size=0, max_size=33)
        case "digest":
            return st.sampled_from(["SHA256", "SHA384", "SHA512", "sha384", "MD5", ""])
        case "version":
            return st.lists(st.integers(min_value=-1, max_value=70000), max_size=4)
        case "module_id":
            return st.sampled_from([base["module_id"], "i-other-enc0", "", "x" * 300])
        case "last":
            return st.builds(lambda t, h, r: {"token": t, "request_sha256": h, "response": r},
                             st.lists(st.integers(min_value=-1, max_value=2**65), max_size=5),
                             st.binary(min_size=31, max_size=33), st.binary(max_size=40))
    return cbor_values


def assert_reachable_from(before: ps.Snapshot, after: ps.Snapshot) -> None:
    """What no accepted load may break."""
    old, new = before.state.pcrs, after.state.pcrs
    boot = (1 << BOOT_LOCKED_PCRS) - 1
    assert new.locked & boot == boot
    assert old.locked & ~new.locked == 0
    assert (new.digest, new.max_pcrs, after.state.version) == (old.digest, old.max_pcrs, before.state.version)
    if after.state.module_id == before.state.module_id:
        assert after.seq >= before.seq
        assert all(new.values[i] == old.values[i] for i in old.locked_indices())
    else:
        assert before.seq == 0  # only a device that never changed adopts another identity


@pytest.fixture(scope="module")
def used_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A state directory (CA = ``CA``) that has changed: PCR16-17 extended, PCR16 locked."""
    d = tmp_path_factory.mktemp("fuzz") / "state"
    nsm = DurableNsm.open(d, ca=CA, durable=False)
    from virtio_nsm import Nsm
    client = Nsm.local(nsm.device)
    client.extend_pcr(16, b"a")
    client.extend_pcr(17, b"b")
    client.lock_pcr(16)
    nsm.close()
    yield d


def genuine(d: Path) -> ps.Snapshot:
    """The directory's state: state.bin and its journal."""
    return ps.current_state(d)


def load_into(d: Path, data: bytes) -> None:
    """Load ``data`` into a fresh backend on ``d``: refused (StateError) or reachable."""
    nsm = DurableNsm.open(d, durable=False)
    try:
        before = nsm.store.snapshot  # type: ignore[union-attr]
        try:
            nsm.load_state(data)
        except ps.StateError as exc:
            event("load refused: " + re.sub(r"[0-9]+", "N", str(exc).split(": ")[1])[:32])
            assert nsm.store.snapshot == before  # type: ignore[union-attr]
            assert genuine(d) == before
            return
        event("load accepted")
        assert_reachable_from(before, nsm.store.snapshot)  # type: ignore[union-attr]
        assert genuine(d) == nsm.store.snapshot  # type: ignore[union-attr]
        assert nsm.device.state == nsm.store.snapshot.state  # type: ignore[union-attr]
    finally:
        nsm.close()


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes_never_decode(data: bytes) -> None:
    for decode in (lambda: ps.decode_snapshot(data), lambda: ps.verify_snapshot(data, CA.certificate)):
        with pytest.raises(ps.StateError):
            decode()


@FUZZ
@given(st.data())
def test_mutated_genuine_snapshot_is_refused(used_store: Path, data: st.DataObject) -> None:
    good = bytearray(ps.export_state(used_store))
    edits = data.draw(st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(1, 255)),
                               min_size=1, max_size=4, unique_by=lambda edit: edit[0]))
    for offset, flip in edits:
        good[offset] ^= flip
    cut = data.draw(st.integers(0, len(good)))
    mutated = bytes(good[:cut]) if data.draw(st.booleans()) else bytes(good)
    with pytest.raises(ps.StateError):
        ps.verify_snapshot(mutated, CA.certificate)
    load_into(used_store, mutated)


@FUZZ
@given(st.data())
def test_signed_arbitrary_bodies_never_unlock(used_store: Path, data: st.DataObject) -> None:
    base = genuine_body(genuine(used_store).state, genuine(used_store).seq + 1)
    body = data.draw(mutated_bodies(base))
    try:
        raw = cbor2.dumps(body)
    except (ValueError, TypeError, OverflowError, cbor2.CBOREncodeError):
        return
    load_into(used_store, sign_body(raw))
    # the same body as a state file (checksum recomputed): refused or a reachable state
    try:
        snapshot = ps.decode_snapshot(checksummed(cbor2.dumps({k: v for k, v in body.items() if k != "saved_at"})))
    except ps.StateError:
        return
    snapshot.state.check_reachable()


@FUZZ
@given(st.data())
def test_signed_arbitrary_bodies_on_a_fresh_device(tmp_path_factory: pytest.TempPathFactory,
                                                   data: st.DataObject) -> None:
    d = tmp_path_factory.mktemp("fresh") / "state"
    ps.StateStore.open(d, ca=CA, durable=False).close()
    base = genuine_body(genuine(d).state, 7)
    base["module_id"] = "i-0123456789abcdef0-enc0123456789abcdef"  # another identity: adoption
    body = data.draw(mutated_bodies(base))
    try:
        raw = cbor2.dumps(body)
    except (ValueError, TypeError, OverflowError, cbor2.CBOREncodeError):
        return
    load_into(d, sign_body(raw))


@FUZZ
@given(st.data())
def test_import_of_signed_arbitrary_bodies(used_store: Path, tmp_path_factory: pytest.TempPathFactory,
                                           data: st.DataObject) -> None:
    base = genuine_body(genuine(used_store).state, genuine(used_store).seq + 1)
    body = data.draw(mutated_bodies(base))
    try:
        raw = cbor2.dumps(body)
    except (ValueError, TypeError, OverflowError, cbor2.CBOREncodeError):
        return
    before = genuine(used_store)
    try:
        ps.import_state(used_store, sign_body(raw), replace=True)
    except ps.StateError:
        assert genuine(used_store) == before
        return
    assert_reachable_from(before, genuine(used_store))


def test_shared_references_and_deep_nesting_are_refused(used_store: Path) -> None:
    base = genuine_body(genuine(used_store).state, genuine(used_store).seq + 1)
    # tag 28/29 (shared references): a value graph that doubles per level in a naive decoder
    shared: Any = cbor2.CBORTag(28, b"x")
    for level in range(30):
        shared = cbor2.CBORTag(28, [cbor2.CBORTag(29, level), cbor2.CBORTag(29, level)])
    for field in ("module_id", "pcrs", "last"):
        body = dict(base, **{field: shared})
        with pytest.raises(ps.StateError, match="tag"):
            ps.verify_snapshot(sign_body(cbor2.dumps(body, value_sharing=False)), CA.certificate)
    deep: Any = 0
    for _ in range(1000):
        deep = [deep]
    with pytest.raises(ps.StateError, match="nesting"):
        ps.verify_snapshot(sign_body(cbor2.dumps(dict(base, last=deep))), CA.certificate)
    huge_count = b"\x9b" + (2**63).to_bytes(8, "big")  # an array claiming 2**63 elements
    raw = cbor2.dumps(dict(base, last=None))
    with pytest.raises(ps.StateError, match="longer than the input"):
        ps.verify_snapshot(sign_body(raw.replace(b"\x64last\xf6", b"\x64last" + huge_count)), CA.certificate)


def test_a_genuine_snapshot_of_a_pcr_bank_variant(tmp_path: Path) -> None:
    """The decoder is strict but not narrower than the device: SHA-512 with 16 PCRs round-trips."""
    state = DeviceState.at_boot(digest=Digest.SHA512, max_pcrs=16)
    with ps.StateStore.open(tmp_path, initial=state, ca=CA, durable=False) as store:
        assert store.state == state
    snapshot = ps.verify_snapshot(ps.export_state(tmp_path), CA.certificate).snapshot
    assert snapshot.state == state
    assert isinstance(snapshot.state.pcrs, PcrBank)
