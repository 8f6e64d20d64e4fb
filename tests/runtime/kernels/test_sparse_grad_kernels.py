"""The weight gradients from kept activations (runtime/kernels/sparse_grad.py)
against their float64 NumPy references (runtime/kernels/reference.py) and the
dense kernel on the masked input, within the float32 bound of kernel_checks.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kernel_checks import TOL, assert_close, f8, values
from sparsefedpp.runtime.errors import DTypeError, ShapeError
from sparsefedpp.runtime.kernels import conv, sparse_grad
from sparsefedpp.runtime.kernels import reference as ref

pytestmark = pytest.mark.device  # part of the emulated-ARM subset (.ci/aarch64.sh)


def kept_case(x, keep):
    """(indices, values, x_masked): the top ``keep`` of x by magnitude with every
    tie, as ActivationSparsifier keeps them (keep 1: every nonzero)."""
    k = min(x.size, max(1, math.ceil(keep * x.size)))
    t = 0.0 if keep >= 1 else ref.topk_abs_threshold(x, k)
    idx, vals = ref.compress(x, t)
    return idx, vals, ref.dense_of_kept(idx, vals, x.shape)


@st.composite
def conv_cases(draw):
    k = draw(st.sampled_from([1, 3]))
    s = draw(st.sampled_from([1, 2]))
    p = draw(st.sampled_from([0, 1]))
    n, c, o = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
    h = draw(st.integers(max(1, k - 2 * p), 9))
    w = draw(st.integers(max(1, k - 2 * p), 9))
    oh, ow = ref.out_size(h, k, s, p), ref.out_size(w, k, s, p)
    x = draw(values((n, c, h, w), zeros=True))
    g = draw(values((n, o, oh, ow), zeros=True))
    keep = draw(st.sampled_from([1e-3, 0.05, 0.3, 1.0]))
    return x, g, (o, c, k, k), s, p, keep


def conv_exact(idx, vals, x_shape, g, kshape, s, p):
    """(value, scale) of the float64 reference of conv2d_grad_weight_sparse."""
    args = (x_shape, f8(g), kshape, s, p)
    return (ref.conv2d_grad_weight_sparse(idx, f8(vals), *args),
            ref.conv2d_grad_weight_sparse(idx, np.abs(f8(vals)), x_shape,
                                          np.abs(f8(g)), kshape, s, p))


@given(conv_cases())
def test_conv2d_grad_weight_sparse_matches_dense(case):
    # Arrange
    x, g, kshape, s, p, keep = case
    idx, vals, xm = kept_case(x, keep)
    # Act
    grad_w, macs = sparse_grad.conv2d_grad_weight_sparse_count(
        idx, vals, x.shape, g, kshape, s, p)
    # Assert
    want, scale = conv_exact(idx, vals, x.shape, g, kshape, s, p)
    assert grad_w.dtype == np.float32 and grad_w.shape == kshape
    assert_close(grad_w, want, scale)
    dense = conv.conv2d_grad_weight(xm, g, kshape, s, p).astype(np.float64)
    assert_close(grad_w, dense, scale, tol=2 * TOL)
    assert macs == ref.conv2d_grad_weight_sparse_macs(idx, x.shape, g.shape, kshape,
                                                      s, p)
    assert macs == sparse_grad.conv2d_grad_weight_sparse_macs(idx, x.shape, g.shape,
                                                              kshape, s, p)


@pytest.mark.parametrize("keep", [1e-3, 0.02, 0.5, 1.0])
def test_conv2d_grad_weight_sparse_both_loop_orders(keep):
    # Arrange: large enough for several parts; small keep takes the in-place path
    rng = np.random.default_rng(2)
    x = np.maximum(rng.standard_normal((4, 8, 12, 12)), 0).astype(np.float32)
    g = rng.standard_normal((4, 16, 6, 6)).astype(np.float32)
    idx, vals, _ = kept_case(x, keep)
    # Act
    grad_w = sparse_grad.conv2d_grad_weight_sparse(idx, vals, x.shape, g,
                                                   (16, 8, 3, 3), 2, 1)
    # Assert
    assert_close(grad_w, *conv_exact(idx, vals, x.shape, g, (16, 8, 3, 3), 2, 1))


def test_conv2d_grad_weight_sparse_empty():
    g = np.ones((2, 3, 4, 4), dtype=np.float32)
    idx = np.empty(0, dtype=np.int32)
    vals = np.empty(0, dtype=np.float32)
    grad_w = sparse_grad.conv2d_grad_weight_sparse(idx, vals, (2, 5, 4, 4), g,
                                                   (3, 5, 3, 3), 1, 1)
    np.testing.assert_array_equal(grad_w, np.zeros((3, 5, 3, 3), np.float32))


def test_conv2d_grad_weight_sparse_bad_inputs():
    g = np.ones((2, 3, 4, 4), dtype=np.float32)
    idx = np.array([0, 200], dtype=np.int32)
    vals = np.ones(2, dtype=np.float32)
    with pytest.raises(ShapeError):  # index out of range
        sparse_grad.conv2d_grad_weight_sparse(idx, vals, (2, 5, 4, 4), g, (3, 5, 3, 3),
                                              1, 1)
    with pytest.raises(ShapeError):  # grad_out shape
        sparse_grad.conv2d_grad_weight_sparse(idx[:1], vals[:1], (2, 5, 4, 4), g,
                                              (3, 5, 3, 3), 1, 0)
    with pytest.raises(DTypeError):
        sparse_grad.conv2d_grad_weight_sparse(idx.astype(np.int64), vals, (2, 5, 4, 4),
                                              g, (3, 5, 3, 3), 1, 1)


@given(st.integers(1, 6), st.integers(1, 50), st.integers(1, 7),
       st.sampled_from([1e-3, 0.1, 0.5, 1.0]), st.data())
def test_linear_grad_weight_sparse_matches_dense(n, n_in, n_out, keep, data):
    # Arrange
    x = data.draw(values((n, n_in), zeros=True))
    g = data.draw(values((n, n_out), zeros=True))
    idx, vals, xm = kept_case(x, keep)
    # Act
    grad_w = sparse_grad.linear_grad_weight_sparse(idx, vals, x.shape, g)
    # Assert
    want = ref.linear_grad_weight_sparse(idx, f8(vals), x.shape, f8(g))
    scale = ref.linear_grad_weight_sparse(idx, np.abs(f8(vals)), x.shape, np.abs(f8(g)))
    assert grad_w.shape == (n_out, n_in) and grad_w.dtype == np.float32
    assert_close(grad_w, want, scale)
    assert_close(grad_w, f8(g.T @ xm), scale, tol=2 * TOL)
    assert sparse_grad.linear_grad_weight_sparse_macs(idx, n_out) == idx.size * n_out


@pytest.mark.parametrize("parts", [2, 3, 7])
def test_linear_grad_weight_sparse_many_parts(monkeypatch, parts):
    # Arrange: the kept list cut into `parts` slices (one per thread in use), whatever
    # the thread count of this machine; 7 does not divide the kept count evenly
    rng = np.random.default_rng(3)
    x = np.maximum(rng.standard_normal((64, 300)), 0).astype(np.float32)
    g = rng.standard_normal((64, 10)).astype(np.float32)
    idx, vals, xm = kept_case(x, 0.6)
    assert idx.size % 7 != 0
    asked = []
    monkeypatch.setattr(sparse_grad, "_num_parts",
                        lambda n_kept: asked.append(n_kept) or parts)

    # Act
    grad_w = sparse_grad.linear_grad_weight_sparse(idx, vals, x.shape, g)

    # Assert: the kernel was cut into the parts, and their partial sums add up to
    # the whole product (a lost or doubled slice would not)
    assert asked == [idx.size]
    np.testing.assert_allclose(grad_w, g.T @ xm, rtol=1e-4, atol=1e-4)
