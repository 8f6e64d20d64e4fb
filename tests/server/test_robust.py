"""Tests of server/robust.py: change norms, screening, and the robust aggregators
against NumPy references written here, plus their robustness properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.server import robust
from sparsefedpp.server.aggregate import weighted_mean


def _global(rng) -> dict:
    return {"w": rng.normal(size=(4, 3)).astype(np.float32),
            "b": rng.normal(size=(5,)).astype(np.float32),
            "n": np.array(40, np.int64)}


def _clients(rng, g: dict, count: int, scale: float = 0.1, sparse: bool = True):
    """Honest updates: small changes, some coordinates pruned to exact zeros."""
    out = []
    for i in range(count):
        t = {}
        for name, a in g.items():
            if a.dtype.kind == "f":
                x = (a + scale * rng.normal(size=a.shape)).astype(np.float32)
                if sparse:
                    x[rng.random(a.shape) < 0.3] = 0.0
                t[name] = x
            else:
                t[name] = np.array(40 + 3 * i, np.int64)
        out.append((t, int(rng.integers(10, 100))))
    return out


def _flat(t: dict, names) -> np.ndarray:
    return np.concatenate([np.asarray(t[n], np.float64).reshape(-1) for n in names])


# ---------------------------------------------------------------- references
def _ref_trimmed(values: list[float], k: int) -> float:
    kept = sorted(values)[k:len(values) - k]
    return sum(kept) / len(kept)


def _ref_median(values: list[float]) -> float:
    v, n = sorted(values), len(values)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def _per_coordinate(results, name, fn):
    stack = [np.asarray(t[name], np.float64).reshape(-1) for t, _ in results]
    shape = np.asarray(results[0][0][name]).shape
    return np.array([fn([s[j] for s in stack]) for j in range(stack[0].size)]
                    ).reshape(shape).astype(np.float32)


@pytest.mark.parametrize("count, trim, k", [(10, 0.1, 1), (7, 0.2, 2), (5, 0.1, 1),
                                            (3, 0.1, 1), (2, 0.4, 0), (4, 0.0, 0)])
def test_trimmed_mean_equals_the_reference(count, trim, k):
    rng = np.random.default_rng(count)
    g = _global(rng)
    results = _clients(rng, g, count)
    assert robust.trim_count(count, trim) == k

    got = robust.robust_mean("trimmed-mean", g, results, trim=trim)

    assert list(got) == list(g)
    for name in ("w", "b"):
        want = _per_coordinate(results, name, lambda v: _ref_trimmed(v, k))
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-7)
        assert got[name].dtype == np.float32


@pytest.mark.parametrize("count", [1, 2, 5, 6])
def test_median_equals_the_reference(count):
    rng = np.random.default_rng(10 + count)
    g = _global(rng)
    results = _clients(rng, g, count)

    got = robust.robust_mean("median", g, results)

    for name in ("w", "b"):
        want = _per_coordinate(results, name, _ref_median)
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-7)


def test_clip_equals_the_reference():
    rng = np.random.default_rng(3)
    g = _global(rng)
    results = _clients(rng, g, 6)
    results[2] = ({k: (v * 5 if v.dtype.kind == "f" else v)
                   for k, v in results[2][0].items()}, results[2][1])
    names = ["w", "b"]
    deltas = [_flat(t, names) - _flat(g, names) for t, _ in results]
    norms = [float(np.linalg.norm(d)) for d in deltas]
    m = float(np.median(norms))
    weights = [w for _, w in results]
    step = sum(w * min(1.0, m / n) * d for w, n, d in
               zip(weights, norms, deltas, strict=True)) / sum(weights)
    want = _flat(g, names) + step

    got = robust.robust_mean("clip", g, results)

    np.testing.assert_allclose(_flat(got, names), want.astype(np.float32), rtol=1e-6,
                               atol=1e-6)
    # a given norms list is used as is
    same = robust.robust_mean("clip", g, results, norms=norms)
    np.testing.assert_array_equal(same["w"], got["w"])


@pytest.mark.parametrize("aggregator", ["clip", "trimmed-mean", "median"])
def test_integer_buffers_keep_the_rounded_weighted_mean(aggregator):
    rng = np.random.default_rng(4)
    g = _global(rng)
    results = _clients(rng, g, 5)

    got = robust.robust_mean(aggregator, g, results)

    want = weighted_mean([({"n": t["n"]}, w) for t, w in results])["n"]
    assert got["n"].dtype == np.int64 and got["n"] == want


# ---------------------------------------------------------------- properties
@pytest.mark.parametrize("aggregator", ["trimmed-mean", "median"])
@pytest.mark.parametrize("outlier", [1e30, -1e30, 1e3, np.float32(3.4e38)])
def test_one_huge_outlier_stays_within_the_honest_range(aggregator, outlier):
    rng = np.random.default_rng(5)
    g = _global(rng)
    honest = _clients(rng, g, 9)
    bad = ({k: (np.full_like(v, outlier) if v.dtype.kind == "f" else v)
            for k, v in g.items()}, 10**6)

    got = robust.robust_mean(aggregator, g, [*honest[:4], bad, *honest[4:]], trim=0.1)

    for name in ("w", "b"):
        stack = np.stack([t[name] for t, _ in honest])
        assert np.isfinite(got[name]).all()
        assert (got[name] >= stack.min(axis=0)).all(), name
        assert (got[name] <= stack.max(axis=0)).all(), name


def test_clipping_bounds_the_change_by_the_median_norm():
    rng = np.random.default_rng(6)
    g = _global(rng)
    results = _clients(rng, g, 7)
    results.append(({k: (v * 1e30 if v.dtype.kind == "f" else v)
                     for k, v in g.items()}, 10**6))
    norms = [robust.delta_norm(t, g) for t, _ in results]

    got = robust.robust_mean("clip", g, results)

    change = robust.delta_norm(got, g)
    assert math.isfinite(change)
    assert change <= float(np.median(norms)) * (1 + 1e-6)


# ---------------------------------------------------------------- norms and screening
def test_delta_norm_is_float64_and_does_not_overflow():
    g = {"w": np.ones((1000,), np.float32), "n": np.array(1, np.int64)}
    big = {"w": np.full((1000,), 3e38, np.float32), "n": np.array(10**9, np.int64)}

    got = robust.delta_norm(big, g)

    assert math.isfinite(got)
    assert got == pytest.approx(math.sqrt(1000) * (3e38 - 1), rel=1e-6)
    assert robust.model_norm(g) == pytest.approx(math.sqrt(1000))


def test_screen_rejects_outliers_and_keeps_honest_norms():
    norms = [1.0, 1.2, 0.8, 0.9, 1.1, 1e3, 1e30, math.nan]

    bound, reasons = robust.screen(norms, 5.0, median_ratio=10, global_ratio=10)

    median = float(np.median(norms[:-1]))  # over the finite norms
    assert bound == pytest.approx(min(10 * median, 50.0)) == 10 * median
    assert [bool(r) for r in reasons] == [False] * 5 + [True] * 3
    assert "exceeds the bound" in reasons[5] and "median" in reasons[5]


def test_screen_of_one_or_two_updates_uses_the_global_norm_only():
    bound, reasons = robust.screen([1.0, 900.0], 20.0, median_ratio=10,
                                   global_ratio=10)
    assert bound == 200.0 and reasons[0] == "" and reasons[1]
    bound, reasons = robust.screen([900.0], 20.0, median_ratio=10, global_ratio=0)
    assert bound == math.inf and reasons == [""]  # both bounds off for one update


@pytest.mark.parametrize("name, trim", [("mean", 0.1), ("clip", 0.5), ("median", -0.1),
                                        ("trimmed-mean", "x")])
def test_bad_aggregator_settings_raise_config_error(name, trim):
    with pytest.raises(ConfigError, match="aggregator|trim"):
        robust.check_aggregator(name, trim)
