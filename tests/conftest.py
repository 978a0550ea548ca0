from __future__ import annotations

import pytest
from support import FakeClock

from virtio_nsm import NsmDevice


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def device(clock: FakeClock) -> NsmDevice:
    return NsmDevice(module_id="i-0123456789abcdef0-enc0123456789abcdef", clock=clock)

