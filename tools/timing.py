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


def time_interleaved(fns: dict[str, Callable[[], object]], reps: int, *,
                     block: int = 5) -> dict[str, list[float]]:
    """Times (ms) of ``reps`` calls of each function, taken in turns of ``block``
    calls each after one untimed call (the order of the functions rotates from
    turn to turn). Within a block a function runs warm, back to back, as in a
    loop over batches; across turns a noisy neighbour or a slow spell falls on all
    of them alike, so ratios of the same turn compare like with like
    (``paired_ratio``)."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for turn in range(-(-reps // block)):
        shift = turn % len(names)
        for name in names[shift:] + names[:shift]:
            fns[name]()
            for _ in range(min(block, reps - turn * block)):
                t = time.perf_counter()
                fns[name]()
                times[name].append((time.perf_counter() - t) * 1e3)
    return times


def paired_ratio(a: list[float], b: list[float], block: int = 5) -> float:
    """Median over the turns of ``time_interleaved`` of median(a) / median(b) in
    that turn."""
    turns = range(0, len(a), block)
    return float(np.median([np.median(a[i:i + block]) / np.median(b[i:i + block])
                            for i in turns]))
