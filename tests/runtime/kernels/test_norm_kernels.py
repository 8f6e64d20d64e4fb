"""The BatchNorm kernels (runtime/kernels/norm.py) against their NumPy references
(runtime/kernels/reference.py), which recompute xhat = x*s[c] + t[c] in float32 as
the kernels do and sum in float64."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kernel_checks import assert_close, assert_matches, f8, values
from sparsefedpp.runtime.kernels import norm
from sparsefedpp.runtime.kernels import reference as ref

pytestmark = pytest.mark.device  # part of the emulated-ARM subset (.ci/aarch64.sh)


@st.composite
def nchw(draw):
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 4)),
             draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    return draw(values(shape))


@given(x=nchw())
def test_channel_mean_var_matches_reference(x):
    mean, var = norm.channel_mean_var(x)
    ref_mean, ref_var = ref.channel_mean_var(x)
    top = np.abs(x.astype(np.float64)).max()
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12, atol=1e-12 * top)
    np.testing.assert_allclose(var, ref_var, rtol=1e-10, atol=1e-12 * top ** 2)


@given(data=st.data(), x=nchw())
def test_scale_shift_matches_reference(data, x):
    c = x.shape[1]
    scale, shift = data.draw(values((c,))), data.draw(values((c,)))
    y = norm.scale_shift(x, scale, shift)
    assert_matches(y, ref.scale_shift, (x, scale, shift))


def _affine(data, shape):
    """x and per-channel (s, t) with xhat = x * s + t rounded to float32, as the
    kernels recompute it (s = 1, t = 0 in a third of the draws: xhat = x)."""
    x = data.draw(values(shape))
    c = shape[1]
    if data.draw(st.integers(0, 2)) == 0:
        s, t = np.ones(c, np.float32), np.zeros(c, np.float32)
    else:
        s, t = data.draw(values((c,))), data.draw(values((c,)))
    xhat = (x.astype(np.float64) * s[None, :, None, None]
            + t[None, :, None, None]).astype(np.float32)
    return x, s, t, xhat


@given(data=st.data(), g=nchw())
def test_grad_sums_match_reference(data, g):
    x, s, t, xhat = _affine(data, g.shape)
    sum_g, sum_gx = norm.grad_sums(g, x, s, t)
    ref_g, ref_gx = ref.grad_sums(g, x, s, t)
    prod = g.astype(np.float64) * xhat
    np.testing.assert_allclose(sum_g, ref_g, rtol=0,
                               atol=1e-12 * np.abs(g).sum() + 1e-12)
    # xhat and the product are rounded to float32 before the float64 sum (xhat
    # may be fused into one multiply-add: bound by |x*s| + |t| as well)
    scale = np.abs(g.astype(np.float64)) * (
        np.abs(x.astype(np.float64) * s[None, :, None, None])
        + np.abs(t)[None, :, None, None])
    bound = 1e-7 * (np.abs(prod) + 2 * scale).sum(axis=(0, 2, 3)) + 1e-12
    assert np.all(np.abs(sum_gx - ref_gx) <= bound)


@given(data=st.data(), g=nchw())
def test_bn_grad_input_matches_reference(data, g):
    c = g.shape[1]
    x, s, t, xhat = _affine(data, g.shape)
    a, b, k = (data.draw(values((c,))) for _ in range(3))
    out = norm.bn_grad_input(g, x, s, t, a, b, k)
    a64, b64, k64 = (v.astype(np.float64)[None, :, None, None] for v in (a, b, k))
    terms = (a64 * g, np.broadcast_to(-b64, g.shape), -k64 * xhat)
    xs = np.abs(x.astype(np.float64) * s[None, :, None, None]) + np.abs(t)[
        None, :, None, None]
    assert_close(out, ref.bn_grad_input(*f8(g, x), s, t, a, b, k),
                 sum(np.abs(tm) for tm in terms) + 2 * np.abs(k64) * xs)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (4, 8, 4, 4)])
@pytest.mark.parametrize("residual", [False, True])
def test_fused_bn_relu_kernels_match_reference(shape, residual):
    # the kernels recompute x*s + t in float32 (possibly fused): seeded normal data
    # keeps every ReLU input far from 0 against that rounding
    rng = np.random.default_rng(sum(shape) + residual)
    c = shape[1]
    x, g = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    res = rng.standard_normal(shape).astype(np.float32) if residual else None
    s, t, fs, ft, a, b, k = (rng.standard_normal(c).astype(np.float32)
                             for _ in range(7))
    scale = (np.abs(x) * np.abs(fs)[None, :, None, None]
             + np.abs(ft)[None, :, None, None] + (0 if res is None else np.abs(res)))

    y, mask = norm.bn_relu_forward(x, fs, ft, res)
    ref_y, ref_mask = ref.bn_relu_forward(f8(x), fs, ft, res)

    assert_close(y, ref_y, scale)
    if residual:
        np.testing.assert_array_equal(mask, ref_mask)
        got_sums = norm.bn_mask_grad_sums(g, x, mask, s, t)
        want_sums = ref.bn_mask_grad_sums(g, x, mask, s, t)
        got_in, got_gm = norm.bn_mask_grad_input(g, x, mask, s, t, a, b, k)
        want_in, want_gm = ref.bn_mask_grad_input(f8(g), x, mask, s, t, a, b, k)
        np.testing.assert_array_equal(got_gm, want_gm)
    else:
        assert mask is None and ref_mask is None
        got_sums = norm.bn_relu_grad_sums(g, x, s, t, fs, ft)
        want_sums = ref.bn_relu_grad_sums(g, x, s, t, fs, ft)
        got_in = norm.bn_relu_grad_input(g, x, s, t, fs, ft, a, b, k)
        want_in = ref.bn_relu_grad_input(f8(g), x, s, t, fs, ft, a, b, k)
    for got, want in zip(got_sums, want_sums, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(got_in, want_in, rtol=1e-5, atol=1e-5)
