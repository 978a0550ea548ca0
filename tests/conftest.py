from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from support import FakeClock, shared_data_missing

from virtio_nsm import NsmDevice

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
AWS_TESTDATA = SHARED / "testdata" / "aws"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def device(clock: FakeClock) -> NsmDevice:
    return NsmDevice(module_id="i-0123456789abcdef0-enc0123456789abcdef", clock=clock)


@pytest.fixture
def aws_testdata() -> Path:
    if not AWS_TESTDATA.is_dir():
        shared_data_missing(AWS_TESTDATA)
    return AWS_TESTDATA


DeviceFactory = Callable[..., NsmDevice]
