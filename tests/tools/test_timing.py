"""tools/bench/timing.py: turns of interleaved calls and the ratio of paired turns."""

from __future__ import annotations

import pytest
from sparsefedpp.tools.bench.timing import paired_ratio, time_interleaved


def test_interleaved_calls_take_turns_in_blocks_with_a_rotating_order():
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "abc"}

    times = time_interleaved(fns, reps=7, block=3)

    assert {k: len(v) for k, v in times.items()} == {"a": 7, "b": 7, "c": 7}
    # one untimed call, then the block; turns: a b c | b c a | c a b (1 timed each)
    turns = ["a" * 4 + "b" * 4 + "c" * 4, "b" * 4 + "c" * 4 + "a" * 4,
             "c" * 2 + "a" * 2 + "b" * 2]
    assert "".join(calls) == "".join(turns)
    assert all(t >= 0 for v in times.values() for t in v)


def test_paired_ratio_is_the_median_of_per_turn_ratios():
    # turns of 2: 2/1; 10/10 (a slow spell slowed both); 3/1 -> median 2, where the
    # ratio of the overall medians would be 3/1
    a = [2, 2, 9, 11, 3, 3]
    b = [1, 1, 10, 10, 1, 1]
    assert paired_ratio(a, b, block=2) == pytest.approx(2.0)
