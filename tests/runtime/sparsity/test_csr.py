"""runtime/sparse.py: CSRMatrix validation, to_csr/from_csr round trips."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sparsefedpp.runtime.errors import ConfigError, DTypeError, ShapeError
from sparsefedpp.runtime.sparsity.csr import CSRMatrix, check_csr, from_csr, to_csr

pytestmark = pytest.mark.device  # part of the emulated-ARM subset (.ci/aarch64.sh)


@st.composite
def sparse_weights(draw):
    """A 2-D (out, in) or 4-D (O, C, kh, kw) float32 weight, all-zero, dense, or
    a drawn mask (which also gives empty rows)."""
    shape = draw(st.sampled_from([
        (draw(st.integers(0, 6)), draw(st.integers(0, 7))),
        (draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 3)),
         draw(st.integers(1, 3)))]))
    vals = draw(arrays(np.float32, shape, elements=st.floats(
        -1e3, 1e3, width=32, allow_subnormal=False).filter(lambda v: v != 0)))
    kind = draw(st.sampled_from(["zero", "dense", "mask"]))
    if kind == "zero":
        return np.zeros(shape, dtype=np.float32)
    if kind == "dense":
        return vals
    return np.where(draw(arrays(np.bool_, shape)), vals, np.float32(0))


def small_csr():
    """[[1, 0, 2], [0, 0, 0], [0, 3, 0]] as (data, indices, indptr, shape)."""
    return (np.array([1, 2, 3], np.float32), np.array([0, 2, 1], np.int32),
            np.array([0, 2, 2, 3], np.int64), (3, 3))


# ---------------------------------------------------------------- round trips
@given(w=sparse_weights())
def test_round_trip_restores_the_exact_array(w):
    m = to_csr(w)
    back = from_csr(m)
    assert back.dtype == np.float32
    assert back.shape == w.shape
    np.testing.assert_array_equal(back, w)
    np.testing.assert_array_equal(m.to_dense(), w)


@given(w=sparse_weights())
def test_to_csr_stores_exactly_the_nonzeros_in_row_order(w):
    m = to_csr(w)
    rows = w.shape[0]
    mat = w.reshape(rows, int(np.prod(w.shape[1:])))
    assert m.shape == mat.shape
    assert m.dense_shape == w.shape
    assert (m.data.dtype, m.indices.dtype, m.indptr.dtype) == (
        np.float32, np.int32, np.int64)
    assert m.nnz == np.count_nonzero(w)
    np.testing.assert_array_equal(np.diff(m.indptr), np.count_nonzero(mat, axis=1))
    assert m.nbytes == 4 * m.nnz + 4 * m.nnz + 8 * (rows + 1)
    assert m.density == (m.nnz / mat.size if mat.size else 0.0)
    check_csr(m.data, m.indices, m.indptr, m.shape)  # sorted, in range


def test_conv_weight_is_stored_as_o_by_c_kh_kw():
    # Arrange: w[1, 0, 2, 1] is column c*kh*kw + i*kw + j = 0 + 2*3 + 1 = 7 of row 1
    w = np.zeros((2, 2, 3, 3), np.float32)
    w[1, 0, 2, 1] = 5.0
    w[0, 1, 0, 0] = -1.0  # column 9 of row 0
    # Act
    m = to_csr(w)
    # Assert
    assert m.shape == (2, 18)
    np.testing.assert_array_equal(m.indptr, [0, 1, 2])
    np.testing.assert_array_equal(m.indices, [9, 7])
    np.testing.assert_array_equal(m.data, [-1.0, 5.0])


def test_nan_and_inf_are_kept_and_negative_zero_is_dropped():
    w = np.array([[np.nan, 0.0, -0.0], [np.inf, 1.0, 0.0]], np.float32)
    m = to_csr(w)
    assert m.nnz == 3
    np.testing.assert_array_equal(from_csr(m), w)  # -0.0 == 0.0; NaN == NaN here


def test_float64_input_is_stored_as_float32():
    m = to_csr(np.array([[0.5, 0.0]], np.float64))
    assert m.data.dtype == np.float32
    assert from_csr(m).dtype == np.float32


def test_csr_matrix_is_frozen_and_has_a_short_repr():
    m = to_csr(np.eye(3, dtype=np.float32))
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.data = np.zeros(3, np.float32)
    assert repr(m) == ("CSRMatrix(shape=(3, 3), dense_shape=(3, 3), nnz=3, "
                       "density=0.3333)")


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("bad, error, match", [
    (np.zeros((2, 2), np.int32), DTypeError, "floating-point"),
    (np.zeros((2, 2), bool), DTypeError, "floating-point"),
    (np.zeros(4, np.float32), ShapeError, "got shape \\(4,\\)"),
    (np.zeros((2, 2, 2), np.float32), ShapeError, "2-D .* or 4-D"),
])
def test_to_csr_rejects_bad_input(bad, error, match):
    with pytest.raises(error, match=match):
        to_csr(bad)


def _replace(index, value):
    parts = list(small_csr())
    parts[index] = value
    return parts


@pytest.mark.parametrize("parts, error, match", [
    (_replace(0, np.array([1, 2, 3], np.float64)), DTypeError, "data: .*float32"),
    (_replace(1, np.array([0, 2, 1], np.int64)), DTypeError, "indices: .*int32"),
    (_replace(2, np.array([0, 2, 2, 3], np.int32)), DTypeError, "indptr: .*int64"),
    (_replace(2, [0, 2, 2, 3]), DTypeError, "indptr: .*got list"),
    (_replace(0, np.ones((3, 1), np.float32)), ShapeError, "data: expected a 1-D"),
    (_replace(1, np.array([0, 2], np.int32)), ShapeError, "expected 3 entries"),
    (_replace(2, np.array([0, 2, 3], np.int64)), ShapeError, "expected 4 entries"),
    (_replace(3, (3, -1)), ShapeError, "non-negative"),
    (_replace(3, (3,)), ShapeError, "non-negative"),
    (_replace(2, np.array([1, 2, 2, 3], np.int64)), ConfigError, "from 0 to nnz=3"),
    (_replace(2, np.array([0, 2, 2, 2], np.int64)), ConfigError, "from 0 to nnz=3"),
    (_replace(2, np.array([0, 3, 2, 3], np.int64)), ConfigError, "non-decreasing"),
    (_replace(1, np.array([0, 3, 1], np.int32)), ConfigError, "in \\[0, 3\\)"),
    (_replace(1, np.array([-1, 2, 1], np.int32)), ConfigError, "in \\[0, 3\\)"),
    (_replace(1, np.array([2, 0, 1], np.int32)), ConfigError, "increasing .* row 0"),
    (_replace(1, np.array([1, 1, 1], np.int32)), ConfigError, "got 1 then 1"),
])
def test_corrupt_csr_raises_a_clear_error(parts, error, match):
    with pytest.raises(error, match=match):
        CSRMatrix(*parts)


def test_unsorted_check_can_be_skipped_but_bounds_cannot():
    data, _, indptr, shape = small_csr()
    check_csr(data, np.array([2, 0, 1], np.int32), indptr, shape, check_sorted=False)
    with pytest.raises(ConfigError):
        check_csr(data, np.array([2, 0, 3], np.int32), indptr, shape,
                  check_sorted=False)


def test_dense_shape_must_match_the_matrix():
    with pytest.raises(ShapeError, match="dense_shape"):
        CSRMatrix(*small_csr(), dense_shape=(3, 2, 2))
    m = CSRMatrix(*small_csr(), dense_shape=(3, 1, 3, 1))
    assert from_csr(m).shape == (3, 1, 3, 1)


def test_empty_rows_and_empty_matrices():
    m = CSRMatrix(*small_csr())
    np.testing.assert_array_equal(from_csr(m), [[1, 0, 2], [0, 0, 0], [0, 3, 0]])
    empty = to_csr(np.zeros((0, 5), np.float32))
    assert (empty.nnz, empty.density, empty.indptr.tolist()) == (0, 0.0, [0])
    assert from_csr(empty).shape == (0, 5)
