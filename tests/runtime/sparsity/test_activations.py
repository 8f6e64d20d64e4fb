"""Sparse activations (runtime/sparse_activation.py) against plain NumPy; their
kernels are tested in tests/runtime/kernels/ (test_topk_kernels.py,
test_sparse_grad_kernels.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sparsefedpp.runtime.errors import ConfigError, DTypeError, ShapeError
from sparsefedpp.runtime.kernels import topk as kern
from sparsefedpp.runtime.sparsity.activations import (
    ActivationSparsifier,
    SparseActivations,
    compress,
    topk_threshold,
)


def values(shape):
    """Float32 arrays as STYLE.md asks, with many exact zeros (a ReLU output)."""
    finite = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)
    return arrays(np.float32, shape, elements=st.one_of(st.just(0.0), finite))


shapes = st.one_of(
    st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 7),
              st.integers(1, 7)),
    st.tuples(st.integers(1, 5), st.integers(1, 40)),
)


def masked(x, threshold):
    """Dense reference of compress(x, threshold): zeros below the threshold."""
    return np.where(np.abs(x) >= threshold, x, np.float32(0.0))


# ---------------------------------------------------------------- container


@given(shapes.flatmap(values), st.floats(0, 1e3), st.sampled_from(
    ["auto", "indices", "bitmap"]))
def test_compress_round_trip(x, threshold, encoding):
    # Act
    act = compress(x, threshold, encoding=encoding)
    # Assert
    ref = masked(x, np.float32(threshold))
    np.testing.assert_array_equal(act.to_dense(), ref)
    assert act.shape == x.shape and act.to_dense().dtype == np.float32
    assert act.kept == np.count_nonzero(ref)
    assert np.all(act.values != 0)  # zeros never stored
    np.testing.assert_array_equal(act.indices(), np.flatnonzero(ref))
    assert act.indices().dtype == np.int32
    assert act.encoding == (encoding if encoding != "auto" else act.encoding)
    assert act.dense_nbytes == 4 * x.size


@given(shapes.flatmap(values), st.floats(0, 1e3))
def test_encoding_choice_and_nbytes(x, threshold):
    # Arrange
    by_enc = {e: compress(x, threshold, encoding=e) for e in ("indices", "bitmap")}
    # Act
    auto = compress(x, threshold)
    # Assert: auto picks the smaller (indices on a draw); nbytes is the arrays'
    held = {e: a.nbytes for e, a in by_enc.items()}
    assert held["indices"] == 8 * auto.kept
    assert held["bitmap"] == math.ceil(x.size / 8) + 4 * auto.kept
    assert auto.nbytes == min(held.values())
    assert auto.encoding == ("bitmap" if held["bitmap"] < held["indices"]
                             else "indices")
    for act in (auto, *by_enc.values()):
        arrays_held = [v for v in vars(act).values() if isinstance(v, np.ndarray)]
        assert act.nbytes == sum(a.nbytes for a in arrays_held)


@pytest.mark.parametrize("encoding", ["indices", "bitmap"])
def test_all_zero_and_fully_kept(encoding):
    # Arrange
    zeros = np.zeros((2, 3, 5, 5), dtype=np.float32)
    full = np.arange(1, 151, dtype=np.float32).reshape(2, 3, 5, 5) - 75.5
    # Act
    empty = compress(zeros, 0.0, encoding=encoding)
    kept = compress(full, 0.0, encoding=encoding)
    # Assert
    assert empty.kept == 0 and empty.indices().size == 0
    np.testing.assert_array_equal(empty.to_dense(), zeros)
    assert kept.kept == full.size
    np.testing.assert_array_equal(kept.to_dense(), full)


def test_nan_is_kept():
    x = np.array([0.0, np.nan, 0.5, -2.0], dtype=np.float32)
    act = compress(x, 1.0)
    np.testing.assert_array_equal(act.indices(), [1, 3])
    assert topk_threshold(np.array([np.nan, np.nan, 1.0], np.float32), 0.5) == math.inf


@pytest.mark.parametrize("x", [np.ones(4, dtype=np.int32), np.ones(4, dtype=bool),
                               np.array(["a"])])
def test_non_float_is_dtype_error(x):
    with pytest.raises(DTypeError):
        compress(x, 0.0)
    with pytest.raises(DTypeError):
        ActivationSparsifier(0.5)(x)


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5, float("nan")])
def test_bad_keep_fraction_is_config_error(keep):
    x = np.ones(8, dtype=np.float32)
    with pytest.raises(ConfigError):
        topk_threshold(x, keep)
    with pytest.raises(ConfigError):
        ActivationSparsifier(keep)
    sparsifier = ActivationSparsifier(0.5)
    with pytest.raises(ConfigError):
        sparsifier.keep_fraction = keep


def test_bad_threshold_encoding_and_shape():
    x = np.ones(8, dtype=np.float32)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ConfigError):
            compress(x, bad)
    with pytest.raises(ConfigError):
        compress(x, 0.0, encoding="csr")
    with pytest.raises(ShapeError):
        compress(np.float32(1.0), 0.0)
    with pytest.raises(ConfigError):
        ActivationSparsifier(0.5, refresh_every=-1)


# ---------------------------------------------------------------- top-k threshold


@given(st.integers(1, 3000), st.floats(1e-4, 1.0), st.integers(0, 2**32 - 1))
def test_topk_keeps_exactly_k_on_distinct_values(size, keep, seed):
    # Arrange: distinct nonzero magnitudes, random signs
    rng = np.random.default_rng(seed)
    x = (rng.permutation(size) + 1).astype(np.float32) * rng.choice([-1, 1], size)
    k = min(size, max(1, math.ceil(keep * size)))
    # Act
    t = topk_threshold(x, keep)
    act = compress(x, t)
    # Assert
    assert act.kept == k
    assert t == (0.0 if keep >= 1 else np.sort(np.abs(x))[::-1][k - 1])


@given(shapes.flatmap(values), st.floats(1e-3, 1.0))
def test_topk_with_ties_and_zeros(x, keep):
    # Arrange
    k = min(x.size, max(1, math.ceil(keep * x.size)))
    nonzero = np.count_nonzero(x)
    # Act
    t = topk_threshold(x, keep)
    act = compress(x, t, limit=k)
    # Assert: exactly min(k, nonzeros), every |x| > t, the first ties in C order
    assert act.kept == min(k, nonzero)
    a = np.abs(x).ravel()
    assert np.all(np.isin(np.flatnonzero(a > t), act.indices()))
    ties = np.flatnonzero((a == t) & (a > 0))
    np.testing.assert_array_equal(np.intersect1d(ties, act.indices()),
                                  ties[:act.kept - np.count_nonzero(a > t)])


def test_topk_full_keep_drops_zeros():
    x = np.array([[0.0, 1.0, -2.0, 0.0]], dtype=np.float32)
    assert topk_threshold(x, 1.0) == 0.0
    assert ActivationSparsifier(1.0)(x).kept == 2


# ---------------------------------------------------------------- sparsifier


@pytest.mark.parametrize("refresh_every", [0, 1, 3])
def test_sparsifier_refresh_schedule(refresh_every):
    # Arrange: every batch has a different scale, so each refresh moves the threshold
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((4, 3, 6, 6)).astype(np.float32) * (i + 1)
               for i in range(8)]
    sparsifier = ActivationSparsifier(0.1, refresh_every=refresh_every)
    # Act
    thresholds, kept = [], []
    for x in batches:
        kept.append(sparsifier(x).kept)
        thresholds.append(sparsifier.threshold)
    # Assert: the threshold changes exactly at the refresh calls
    refresh = [i == 0 or (refresh_every > 0 and i % refresh_every == 0)
               for i in range(8)]
    for i in range(1, 8):
        assert (thresholds[i] != thresholds[i - 1]) == refresh[i]
    for i in range(8):
        last = i - i % refresh_every if refresh_every else 0  # last refresh call
        assert thresholds[i] == topk_threshold(batches[last], 0.1)
    k = math.ceil(0.1 * batches[0].size)
    assert all(n == k for n, r in zip(kept, refresh, strict=True) if r)
    assert sparsifier.calls == 8


def test_sparsifier_reset_and_keep_fraction_force_refresh():
    # Arrange
    rng = np.random.default_rng(1)
    signs = rng.choice([-1.0, 1.0], (2, 50))
    x1 = (rng.uniform(1.0, 2.0, (2, 50)) * signs).astype(np.float32)
    x2 = x1 * 10
    sparsifier = ActivationSparsifier(0.2)
    # Act / Assert
    sparsifier(x1)
    t1 = sparsifier.threshold
    assert sparsifier(x2).kept == 100  # reused threshold: every |10 x| >= t1
    assert sparsifier.threshold == t1
    sparsifier.reset()
    assert sparsifier(x2).kept == 20 and sparsifier.threshold == pytest.approx(10 * t1)
    sparsifier.keep_fraction = 0.5
    assert sparsifier(x2).kept == 50
    assert sparsifier.keep_fraction == 0.5 and sparsifier.calls == 4


def assert_same_compression(a: SparseActivations, b: SparseActivations):
    assert (a.shape, a.encoding, a.kept) == (b.shape, b.encoding, b.kept)
    np.testing.assert_array_equal(a.indices(), b.indices())
    np.testing.assert_array_equal(a.values, b.values)  # NaN == NaN here


@pytest.mark.parametrize("keep", [0.001, 0.005, 0.01, 0.05])
def test_sparsifier_reuse_calls_equal_compress(monkeypatch, keep):
    # the reuse calls may take the one-pass path (compress_one_pass): the same
    # SparseActivations as compress(x, threshold), also when a batch keeps far more
    # than the last one (the one pass gives up and falls back), with NaN, ties
    # at the threshold and -0.0
    rng = np.random.default_rng(12)
    outcomes = []
    one_pass = kern.compress_one_pass

    def counted(*args):
        out = one_pass(*args)
        outcomes.append(out is not None)
        return out
    monkeypatch.setattr(kern, "compress_one_pass", counted)
    sparsifier = ActivationSparsifier(keep)
    scales = [1.0, 1.0, 1.05, 0.9, 3.0, 1.0]
    for i, scale in enumerate(scales):
        x = np.maximum(rng.standard_normal((8, 16, 16, 16)), 0).astype(np.float32)
        x *= np.float32(scale)
        x.flat[:: 1000 + i] = -0.0
        if i:
            x.flat[rng.choice(x.size, 40, replace=False)] = np.float32(
                sparsifier.threshold)  # ties
            x.flat[7 * i] = np.nan
        got = sparsifier(x)
        assert_same_compression(got, compress(x, sparsifier.threshold,
                                              limit=None if i else got.kept))
    if keep <= 0.01:  # few enough kept for the one pass: taken, and given up at x3
        assert True in outcomes and False in outcomes
