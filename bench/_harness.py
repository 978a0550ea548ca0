"""A tiny side-by-side rate harness for the benchmarks (not a test).

Each case is measured in alternating rounds with its baseline, so drift on a
noisy machine hits both; the reported rate is the median over rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``fn`` over about ``seconds``."""
    n = 0
    batch = 1
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(batch):
            fn()
        n += batch
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)
        batch = min(batch * 2, 4096)


def compare(name: str, ours: Callable[[], object], baseline: Callable[[], object],
            baseline_name: str, rounds: int = 5, seconds: float = 0.4,
            target: float | None = None) -> float:
    """Print our rate beside the baseline's and return the ratio of medians."""
    ours_rates, base_rates = [], []
    for _ in range(rounds):
        ours_rates.append(rate(ours, seconds))
        base_rates.append(rate(baseline, seconds))
    o, b = statistics.median(ours_rates), statistics.median(base_rates)
    ratio = o / b
    verdict = "" if target is None else ("  target >= {:.0%}: {}".format(
        target, "met" if ratio >= target else "NOT met"))
    print(f"{name:<14} {o:>11,.0f}/s   {baseline_name:<34} {b:>11,.0f}/s   "
          f"ratio {ratio:6.1%}{verdict}")
    return ratio
