"""Caller policy: expected PCRs, nonce, maximum age, clock skew, and arguments."""

from __future__ import annotations

import datetime as dt

import pytest
from verify_support import T0, Pki, document

from virtio_nsm.verify import DEFAULT_CLOCK_SKEW, VerificationError, verify_document

PCRS = {i: bytes([i]) * 48 for i in range(16)}


def reasons_of(doc: bytes, pki: Pki, **kwargs: object) -> list[str]:
    with pytest.raises(VerificationError) as info:
        verify_document(doc, roots=[pki.root], **kwargs)  # type: ignore[arg-type]
    return info.value.reasons


def test_expected_pcrs_match(pki: Pki) -> None:
    doc = document(pki, pcrs=PCRS)
    verify_document(doc, roots=[pki.root], at=T0, expected_pcrs={0: PCRS[0], 8: PCRS[8]})
    verify_document(doc, roots=[pki.root], at=T0, expected_pcrs={})


def test_expected_pcrs_mismatch_and_missing(pki: Pki) -> None:
    doc = document(pki, pcrs=PCRS)
    wrong = b"\xff" * 48
    reasons = reasons_of(doc, pki, at=T0, expected_pcrs={1: wrong, 2: PCRS[2], 20: bytes(48)})
    assert reasons == [
        f"PCR1 is {PCRS[1].hex()}, expected {wrong.hex()}",
        "PCR20 is not in the document",
    ]


def test_expected_pcr_arguments_are_checked(pki: Pki) -> None:
    doc = document(pki)
    with pytest.raises(ValueError):
        verify_document(doc, roots=[pki.root], at=T0, expected_pcrs={32: bytes(48)})
    with pytest.raises(TypeError):
        verify_document(doc, roots=[pki.root], at=T0, expected_pcrs={0: "00" * 48})  # type: ignore[dict-item]


def test_nonce(pki: Pki) -> None:
    doc = document(pki, nonce=b"fresh-nonce")
    assert verify_document(doc, roots=[pki.root], at=T0, nonce=b"fresh-nonce").nonce == b"fresh-nonce"
    assert reasons_of(doc, pki, at=T0, nonce=b"other")[0].startswith("nonce is ")
    assert reasons_of(document(pki), pki, at=T0, nonce=b"x") == [
        "the document has no nonce, one was expected"
    ]


@pytest.mark.parametrize("max_age", [dt.timedelta(minutes=5), 300, 300.0])
def test_max_age(pki: Pki, max_age: dt.timedelta | float) -> None:
    doc = document(pki, timestamp=T0)
    verify_document(doc, roots=[pki.root], at=T0 + dt.timedelta(minutes=5), max_age=max_age)
    reasons = reasons_of(doc, pki, at=T0 + dt.timedelta(minutes=5, milliseconds=1), max_age=max_age)
    assert reasons == ["document is 300.001 s old, older than the allowed 300 s"]


def test_max_age_zero_accepts_same_instant(pki: Pki) -> None:
    verify_document(document(pki), roots=[pki.root], at=T0, max_age=0)


def test_negative_max_age_is_an_argument_error(pki: Pki) -> None:
    with pytest.raises(ValueError):
        verify_document(document(pki), roots=[pki.root], at=T0, max_age=-1)


def test_future_timestamp_within_and_beyond_skew(pki: Pki) -> None:
    late = T0 + DEFAULT_CLOCK_SKEW
    doc = document(pki, timestamp=late)
    # Verifier clock slightly behind the enclave: accepted, and counts as fresh.
    verify_document(doc, roots=[pki.root], at=T0, max_age=0)
    reasons = reasons_of(doc, pki, at=T0 - dt.timedelta(milliseconds=1))
    assert len(reasons) == 1 and "after the verification time" in reasons[0], reasons
    verify_document(doc, roots=[pki.root], at=late - dt.timedelta(seconds=25), clock_skew=25)
    reasons_of(doc, pki, at=late - dt.timedelta(seconds=26), clock_skew=25)


def test_naive_and_other_timezones(pki: Pki) -> None:
    doc = document(pki)
    verify_document(doc, roots=[pki.root], at=T0.replace(tzinfo=None))
    plus2 = dt.timezone(dt.timedelta(hours=2))
    verify_document(doc, roots=[pki.root], at=T0.astimezone(plus2))


def test_default_time_is_now(pki: Pki) -> None:
    # T0 is in 2026-03; the test leaf lives 3 h, so "now" is after it expired
    # unless the clock says otherwise — either way a verdict, never a crash.
    now = dt.datetime.now(dt.UTC)
    doc = document(pki)
    if abs(now - T0) > dt.timedelta(hours=3):
        assert reasons_of(doc, pki)


def test_root_arguments(pki: Pki) -> None:
    with pytest.raises(ValueError):
        verify_document(document(pki), roots=[], at=T0)
    with pytest.raises(TypeError):
        verify_document(document(pki), roots=[b"pem"], at=T0)  # type: ignore[list-item]


def test_policy_failures_are_reported_with_chain_failures(pki: Pki, other_pki: Pki) -> None:
    doc = document(pki, nonce=b"a")
    reasons = reasons_of(
        doc, other_pki, at=T0 + dt.timedelta(hours=4), nonce=b"b", expected_pcrs={0: b"0" * 48}
    )
    text = "\n".join(reasons)
    for part in ("neither a trusted root", "expired", "nonce is", "PCR0 is"):
        assert part in text, reasons


@pytest.mark.parametrize(
    "at",
    [
        dt.datetime.max.replace(tzinfo=dt.UTC),
        dt.datetime.min.replace(tzinfo=dt.UTC),
        dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
    ],
)
def test_extreme_verification_times(pki: Pki, at: dt.datetime) -> None:
    reasons = reasons_of(document(pki), pki, at=at, max_age=dt.timedelta.max)
    assert not any("internal error" in r for r in reasons), reasons


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 1e300, -1, "60"])
def test_bad_max_age_arguments(pki: Pki, bad: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        verify_document(document(pki), roots=[pki.root], at=T0, max_age=bad)  # type: ignore[arg-type]


def test_verification_error_pickles_and_lists_reasons() -> None:
    import pickle

    err = VerificationError(["a", "b"])
    assert str(err) == "attestation document is invalid: a; b"
    again = pickle.loads(pickle.dumps(err))
    assert again.reasons == ["a", "b"] and str(again) == str(err)


def test_doc_must_be_bytes(pki: Pki) -> None:
    with pytest.raises(TypeError):
        verify_document("not bytes", roots=[pki.root], at=T0)  # type: ignore[arg-type]
    verify_document(bytearray(document(pki)), roots=[pki.root], at=T0)
