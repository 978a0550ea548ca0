"""Helpers shared by the test modules."""

from __future__ import annotations

from typing import NoReturn


class FakeClock:
    """A settable clock (seconds since the epoch) for devices and CAs."""

    def __init__(self, now: float = 1_767_225_600.0) -> None:  # 2026-01-01T00:00:00Z
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def shared_data_missing(path: object) -> NoReturn:
    """Skip when ../shared is absent on a developer machine; in CI it must be there."""
    import os

    import pytest

    message = f"shared AWS test data not found at {path}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI must run with ../shared beside the clone)")
    pytest.skip(message)
