from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from support import FakeClock

from virtio_nsm import NsmDevice

REPO = Path(__file__).resolve().parent.parent
#: Real AWS documents, their sources and expected verdicts (NOTICE.md), shipped with the tests.
AWS_TESTDATA = REPO / "tests" / "data" / "aws"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def device(clock: FakeClock) -> NsmDevice:
    return NsmDevice(module_id="i-0123456789abcdef0-enc0123456789abcdef", clock=clock)


@pytest.fixture
def aws_testdata() -> Path:
    return AWS_TESTDATA


DeviceFactory = Callable[..., NsmDevice]
