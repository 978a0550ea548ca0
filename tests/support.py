"""Helpers shared by the test modules."""

from __future__ import annotations


class FakeClock:
    """A settable clock (seconds since the epoch) for devices and CAs."""

    def __init__(self, now: float = 1_767_225_600.0) -> None:  # 2026-01-01T00:00:00Z
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

