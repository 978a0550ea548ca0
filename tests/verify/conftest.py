"""Fixtures for the verifier tests: the shared AWS documents and a local test PKI."""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import pytest
from verify_pki import Pki, make_pki

REPO = Path(__file__).resolve().parents[2]
#: Read-only test data shared between worktrees (never written by tests).
AWS_DATA = REPO.parent / "shared" / "testdata" / "aws"


@dataclass(frozen=True)
class AwsDocument:
    name: str
    raw: bytes
    #: The verification time NOTICE.md pins (the document's own timestamp).
    at: dt.datetime
    valid: bool


def _ms(ms: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=ms)


# Verdicts and pinned times as listed in AWS_DATA/NOTICE.md.
AWS_EXPECTED = {
    "nitrite_production.b64": (_ms(1725719859545), True),
    "nitrite_debug.b64": (_ms(1725719886508), True),
    "evervault_debug.b64": (_ms(1694102161556), True),
    # timestamp field is in seconds; pin to when its leaf is valid instead.
    "nitrite_selfsigned_invalid.b64": (_ms(1713379906 * 1000), False),
}


def load_aws(name: str) -> AwsDocument:
    path = AWS_DATA / name
    if not path.exists():
        pytest.skip(f"shared AWS test data not found at {path}")
    at, valid = AWS_EXPECTED[name]
    return AwsDocument(name, base64.b64decode(path.read_bytes()), at, valid)


def aws_names() -> list[str]:
    return sorted(AWS_EXPECTED)


@pytest.fixture(scope="session")
def production() -> AwsDocument:
    return load_aws("nitrite_production.b64")


@pytest.fixture(scope="session")
def pki() -> Pki:
    return make_pki()


@pytest.fixture(scope="session")
def other_pki() -> Pki:
    return make_pki()
