"""Helpers shared by the test modules."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings


class FakeClock:
    """A settable clock (seconds since the epoch) for devices and CAs."""

    def __init__(self, now: float = 1_767_225_600.0) -> None:  # 2026-01-01T00:00:00Z
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


#: Environment variable that sets the number of cases of every fuzz target (README, "Fuzzing").
FUZZ_ENV = "NSM_FUZZ_EXAMPLES"


def fuzz_settings(default: int) -> settings:
    """Hypothesis settings of a fuzz target: ``default`` cases, or ``$NSM_FUZZ_EXAMPLES``.

    The suite runs each target for a few seconds; a long run sets the variable
    (e.g. ``NSM_FUZZ_EXAMPLES=1000000``). No deadline: a loaded CI machine is
    not a finding.
    """
    return settings(
        max_examples=int(os.environ.get(FUZZ_ENV, "0")) or default,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
