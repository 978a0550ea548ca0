"""A fixed-size latency histogram: 1 µs buckets, constant time per sample, no allocation."""

from __future__ import annotations

import math

__all__ = ["LatencyHistogram"]


class LatencyHistogram:
    """Counts of durations in 1 µs buckets up to ``limit_us``; longer ones share the last bucket."""

    def __init__(self, limit_us: int = 10_000) -> None:
        if limit_us < 1:
            raise ValueError("limit_us must be >= 1")
        self.limit_us = limit_us
        self._buckets = [0] * (limit_us + 1)
        self.count = 0

    def __repr__(self) -> str:
        if not self.count:
            return "<LatencyHistogram empty>"
        return f"<LatencyHistogram n={self.count} p50={self.percentile(0.5)}us>"

    def add(self, ns: int) -> None:
        """Record one duration in nanoseconds (negative ones are a caller's bug)."""
        if ns < 0:
            raise ValueError("a duration cannot be negative")
        us = ns // 1000
        self._buckets[us if us < self.limit_us else self.limit_us] += 1
        self.count += 1

    def percentile(self, q: float) -> int:
        """The bucket (µs, lower bound) holding quantile ``q`` of the samples.

        ``limit_us`` means "at least that long".  Raises ValueError when empty.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError("q must be within [0, 1]")
        if not self.count:
            raise ValueError("no samples")
        rank = max(1, math.ceil(q * self.count - 1e-9))  # (the epsilon: 0.9 * 10 is 9.000...2)
        seen = 0
        for us, n in enumerate(self._buckets):
            seen += n
            if seen >= rank:
                return us
        raise AssertionError("unreachable: counts add up to count")

    def reset(self) -> None:
        self._buckets = [0] * (self.limit_us + 1)
        self.count = 0
