"""Fixtures for the verifier tests: the shared AWS documents and a local test PKI."""

from __future__ import annotations

import pytest
from verify_support import AwsDocument, Pki, load_aws, make_pki


@pytest.fixture(scope="session")
def production() -> AwsDocument:
    return load_aws("nitrite_production.b64")


@pytest.fixture(scope="session")
def pki() -> Pki:
    return make_pki()


@pytest.fixture(scope="session")
def other_pki() -> Pki:
    return make_pki()
