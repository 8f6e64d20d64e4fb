"""One timer for the benchmark scripts: a statistic of repeated calls, in ms."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def time_ms(fn: Callable[[], object], reps: int, *, warmup: int = 1,
            stat: Callable = np.median) -> float:
    """``stat`` (median by default) of ``reps`` timed calls after ``warmup`` untimed
    ones (Numba compile or cache load, first allocations), in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(stat(times) * 1e3)
