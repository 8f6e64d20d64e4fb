"""One timer for the benchmark scripts: a statistic of repeated calls, in ms, and
the turns that let two frameworks share a noisy machine fairly."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

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


def take_turns(turn: Callable[[str, int], Sequence[float]], names: Sequence[str],
               reps: int, *, block: int = 5) -> dict[str, list[list[float]]]:
    """Per name, the times of each turn: ``turn(name, n)`` runs one untimed call and
    then ``n`` timed ones of ``name`` (in this process or in a worker) and returns
    the ``n`` times. Turns of ``block`` calls go round the names until each has
    ``reps`` times, the order rotating from turn to turn so no name always runs
    first (right after the other framework's threads went idle). A slow spell of
    the machine then falls on neighbouring turns of every name alike."""
    if reps < 1 or block < 1:
        raise ValueError(f"take_turns: expected reps >= 1 and block >= 1, got "
                         f"{reps} and {block}")
    names = list(names)
    turns: dict[str, list[list[float]]] = {name: [] for name in names}
    for i in range(-(-reps // block)):
        n = min(block, reps - i * block)
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            times = [float(t) for t in turn(name, n)]
            if len(times) != n:
                raise ValueError(f"take_turns: turn({name!r}, {n}) returned "
                                 f"{len(times)} times")
            turns[name].append(times)
    return turns


def time_interleaved(fns: dict[str, Callable[[], object]], reps: int, *,
                     block: int = 5) -> dict[str, list[float]]:
    """Times (ms) of ``reps`` calls of each function, taken in turns of ``block``
    calls each after one untimed call (``take_turns`` in this process). Within a
    block a function runs warm, back to back, as in a loop over batches; across
    turns a noisy neighbour falls on all of them alike, so ratios of the same turn
    compare like with like (``paired_ratio``)."""
    def turn(name: str, n: int) -> list[float]:
        fns[name]()
        out = []
        for _ in range(n):
            t = time.perf_counter()
            fns[name]()
            out.append((time.perf_counter() - t) * 1e3)
        return out

    turns = take_turns(turn, list(fns), reps, block=block)
    return {name: [t for times in ts for t in times] for name, ts in turns.items()}


def turn_ratios(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> list[float]:
    """median(a's turn) / median(b's turn), turn by turn (same number of turns)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"turn_ratios: expected the same number (>= 1) of turns, "
                         f"got {len(a)} and {len(b)}")
    return [float(np.median(x) / np.median(y)) for x, y in zip(a, b, strict=True)]


def ratio_spread(ratios: Sequence[float]) -> dict[str, float | int]:
    """The reported statistic of paired ratios: their median, with min, max and the
    quartiles (IQR) over the turns."""
    r = np.asarray(ratios, dtype=float)
    if r.size == 0:
        raise ValueError("ratio_spread: expected at least one ratio")
    q1, median, q3 = np.percentile(r, [25, 50, 75])
    return {"ratio": float(median), "ratio_min": float(r.min()),
            "ratio_max": float(r.max()), "ratio_q1": float(q1), "ratio_q3": float(q3),
            "turns": int(r.size)}


def paired_ratio(a: list[float], b: list[float], block: int = 5) -> float:
    """Median over the turns of ``time_interleaved`` of median(a) / median(b) in
    that turn."""
    turns = range(0, len(a), block)
    return float(np.median(turn_ratios([a[i:i + block] for i in turns],
                                       [b[i:i + block] for i in turns])))
