"""Kernels in runtime/kernels/ against plain NumPy references written here in float64
(np.pad + strided slices), over hypothesis-drawn shapes and values.

Float32 kernels are compared with an error bound per element: a float32 sum of K
products is within about K * 2^-24 * sum|terms| of the exact value, so each check
uses ``tol * (reference of the absolute values) + atol`` instead of a bare rtol,
which cancellation would break.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sparsefedpp.runtime.kernels import conv, norm, pool

pytestmark = pytest.mark.device  # part of the emulated-ARM subset (.ci/aarch64.sh)

TOL = 1e-5
ATOL = 1e-6


def values(shape):
    """Float32 arrays as STYLE.md asks: finite, no subnormals, |x| <= 1e3."""
    return arrays(np.float32, shape,
                  elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=False))


def assert_close(actual, ref, scale):
    """|actual - ref| <= TOL * scale + ATOL elementwise, scale = |terms| summed."""
    assert actual.dtype == np.float32
    assert actual.shape == ref.shape
    err = np.abs(actual.astype(np.float64) - ref)
    bound = TOL * scale + ATOL
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (
        f"at {worst}: got {actual[worst]}, expected {ref[worst]}, "
        f"bound {bound[worst]}")


# ---------------------------------------------------------------- geometry
@st.composite
def conv_geometry(draw, square=False):
    """(n, c, o, h, w, kh, kw, stride, pad) with at least one output pixel."""
    n, c, o = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    kh = draw(st.integers(1, 3))
    kw = kh if square else draw(st.integers(1, 3))
    stride = draw(st.integers(1, 3))
    pad = draw(st.integers(0, min(kh, kw) // 2))
    assume(h + 2 * pad >= kh and w + 2 * pad >= kw)
    return n, c, o, h, w, kh, kw, stride, pad


def out_len(size, k, stride, pad):
    return (size + 2 * pad - k) // stride + 1


# -------------------------------------------------------- NumPy references
def pad_hw(x, pad, value=0.0):
    return np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=value)


def windows(xp, kh, kw, stride, oh, ow):
    """Yield (i, j, xp[:, :, i + stride*a, j + stride*b]) for every kernel offset."""
    for i in range(kh):
        for j in range(kw):
            yield i, j, xp[:, :, i:i + stride * (oh - 1) + 1:stride,
                           j:j + stride * (ow - 1) + 1:stride]


def ref_col2im(cols, shape, kh, kw, stride, pad):
    n, c, h, w = shape
    oh, ow = out_len(h, kh, stride, pad), out_len(w, kw, stride, pad)
    cols = cols.astype(np.float64).reshape(n, c, kh, kw, oh, ow)
    xp = np.zeros((n, c, h + 2 * pad, w + 2 * pad))
    for i in range(kh):
        for j in range(kw):
            xp[:, :, i:i + stride * (oh - 1) + 1:stride,
               j:j + stride * (ow - 1) + 1:stride] += cols[:, :, i, j]
    return xp[:, :, pad:pad + h, pad:pad + w]


def ref_conv2d(x, w, stride, pad):
    n, _, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh, ow = out_len(h, kh, stride, pad), out_len(wd, kw, stride, pad)
    y = np.zeros((n, o, oh, ow))
    xp = pad_hw(x.astype(np.float64), pad)
    for i, j, patch in windows(xp, kh, kw, stride, oh, ow):
        y += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j].astype(np.float64))
    return y


def ref_conv2d_grad_weight(x, g, kshape, stride, pad):
    _, _, kh, kw = kshape
    oh, ow = g.shape[2:]
    gw = np.zeros(kshape)
    xp = pad_hw(x.astype(np.float64), pad)
    for i, j, patch in windows(xp, kh, kw, stride, oh, ow):
        gw[:, :, i, j] = np.einsum("nohw,nchw->oc", g.astype(np.float64), patch)
    return gw


def ref_conv2d_grad_input(g, w, in_shape, stride, pad):
    o, c, kh, kw = w.shape
    n, oh, ow = g.shape[0], g.shape[2], g.shape[3]
    cols = np.einsum("nop,ok->nkp", g.reshape(n, o, oh * ow).astype(np.float64),
                     w.reshape(o, c * kh * kw).astype(np.float64))
    return ref_col2im(cols, in_shape, kh, kw, stride, pad)


def ref_maxpool(x, k, stride, pad):
    """Max of each window and the flat in-plane index of its first maximum."""
    h, w = x.shape[2:]
    oh, ow = out_len(h, k, stride, pad), out_len(w, k, stride, pad)
    xp = pad_hw(x.astype(np.float64), pad, value=-np.inf)
    stacked = np.stack([patch for _, _, patch in windows(xp, k, k, stride, oh, ow)])
    first = np.argmax(stacked, axis=0)  # window order is row-major, as the kernel's
    i, j = np.divmod(first, k)
    rows = np.arange(oh)[:, None] * stride - pad + i
    cols = np.arange(ow)[None, :] * stride - pad + j
    return stacked.max(axis=0), rows * w + cols


# ------------------------------------------------------------- conv kernels
@given(data=st.data(), geom=conv_geometry())
def test_conv2d_forward_matches_reference(data, geom):
    n, c, o, h, w, kh, kw, stride, pad = geom
    x = data.draw(values((n, c, h, w)))
    wt = data.draw(values((o, c, kh, kw)))
    y = conv.conv2d_forward(x, wt, stride, pad)
    scale = ref_conv2d(np.abs(x), np.abs(wt), stride, pad)
    assert_close(y, ref_conv2d(x, wt, stride, pad), scale)


@given(data=st.data(), geom=conv_geometry())
def test_conv2d_grad_weight_matches_reference(data, geom):
    n, c, o, h, w, kh, kw, stride, pad = geom
    x = data.draw(values((n, c, h, w)))
    g = data.draw(values((n, o, out_len(h, kh, stride, pad),
                          out_len(w, kw, stride, pad))))
    gw = conv.conv2d_grad_weight(x, g, (o, c, kh, kw), stride, pad)
    scale = ref_conv2d_grad_weight(np.abs(x), np.abs(g), (o, c, kh, kw), stride, pad)
    assert_close(gw, ref_conv2d_grad_weight(x, g, (o, c, kh, kw), stride, pad), scale)


@given(data=st.data(), geom=conv_geometry(), square=st.booleans())
def test_conv2d_grad_input_matches_reference(data, geom, square):
    # square kernels with "same" geometry take the flipped-kernel shortcut
    n, c, o, h, w, kh, kw, stride, pad = geom
    if square:
        kw = kh
    assume(w + 2 * pad >= kw)
    wt = data.draw(values((o, c, kh, kw)))
    g = data.draw(values((n, o, out_len(h, kh, stride, pad),
                          out_len(w, kw, stride, pad))))
    gx = conv.conv2d_grad_input(g, wt, (n, c, h, w), stride, pad)
    scale = ref_conv2d_grad_input(np.abs(g), np.abs(wt), (n, c, h, w), stride, pad)
    assert_close(gx, ref_conv2d_grad_input(g, wt, (n, c, h, w), stride, pad), scale)


@pytest.mark.parametrize("path", ["rows", "planes"])
@given(data=st.data(), geom=conv_geometry(), square=st.booleans())
def test_both_conv_paths_match_reference(path, data, geom, square):
    # conv2d_forward / conv2d_grad_input pick a path by the row width kw*C (kw*O);
    # each path is checked here on every geometry, whatever it would pick
    n, c, o, h, w, kh, kw, stride, pad = geom
    if square:
        kw = kh
    assume(w + 2 * pad >= kw)
    x = data.draw(values((n, c, h, w)))
    wt = data.draw(values((o, c, kh, kw)))
    g = data.draw(values((n, o, out_len(h, kh, stride, pad),
                          out_len(w, kw, stride, pad))))
    forward = getattr(conv, f"_forward_{path}")
    grad_input = getattr(conv, f"_grad_input_{path}")

    y = forward(x, wt, stride, pad)
    gx = grad_input(g, wt, (n, c, h, w), stride, pad)

    assert_close(y, ref_conv2d(x, wt, stride, pad),
                 ref_conv2d(np.abs(x), np.abs(wt), stride, pad))
    shape = (n, c, h, w)
    assert_close(gx, ref_conv2d_grad_input(g, wt, shape, stride, pad),
                 ref_conv2d_grad_input(np.abs(g), np.abs(wt), shape, stride, pad))


@pytest.mark.parametrize("geom", [
    # (n, c, o, h, w, k, stride, pad): wide rows take _conv_rows; odd widths and
    # channel counts that are not multiples of six leave short groups and pairs
    (3, 23, 13, 7, 9, 3, 1, 1), (2, 17, 23, 9, 7, 3, 2, 1), (2, 49, 7, 5, 6, 1, 2, 0),
    (13, 24, 50, 4, 4, 3, 1, 1), (1, 64, 6, 3, 3, 3, 2, 1), (2, 22, 16, 6, 5, 3, 1, 0)])
def test_wide_convs_match_reference(geom):
    n, c, o, h, w, k, stride, pad = geom
    rng = np.random.default_rng(sum(geom))
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((o, c, k, k)).astype(np.float32)
    oh, ow = out_len(h, k, stride, pad), out_len(w, k, stride, pad)
    g = rng.standard_normal((n, o, oh, ow)).astype(np.float32)
    assert conv._use_rows(c * k, stride) or conv._use_rows(o * k, stride)

    y = conv.conv2d_forward(x, wt, stride, pad)
    gx = conv.conv2d_grad_input(g, wt, x.shape, stride, pad)
    gw = conv.conv2d_grad_weight(x, g, wt.shape, stride, pad)

    assert_close(y, ref_conv2d(x, wt, stride, pad),
                 ref_conv2d(np.abs(x), np.abs(wt), stride, pad))
    assert_close(gx, ref_conv2d_grad_input(g, wt, x.shape, stride, pad),
                 ref_conv2d_grad_input(np.abs(g), np.abs(wt), x.shape, stride, pad))
    assert_close(gw, ref_conv2d_grad_weight(x, g, wt.shape, stride, pad),
                 ref_conv2d_grad_weight(np.abs(x), np.abs(g), wt.shape, stride, pad))


@pytest.mark.parametrize("geom", [
    # (n, c, o, h, w, k, stride, pad): a grid of >= 8192 floats per thread splits
    # the rows between threads (partial sums), a short one the output channels
    (16, 3, 5, 32, 32, 3, 1, 1), (9, 2, 3, 40, 31, 3, 2, 1), (2, 5, 3, 4, 4, 3, 1, 1),
    (1, 4, 1, 3, 5, 3, 1, 1)])
def test_conv2d_grad_weight_thread_splits(geom):
    n, c, o, h, w, k, stride, pad = geom
    rng = np.random.default_rng(sum(geom))
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    g = rng.standard_normal((n, o, out_len(h, k, stride, pad),
                             out_len(w, k, stride, pad))).astype(np.float32)
    kshape = (o, c, k, k)

    gw = conv.conv2d_grad_weight(x, g, kshape, stride, pad)

    assert_close(gw, ref_conv2d_grad_weight(x, g, kshape, stride, pad),
                 ref_conv2d_grad_weight(np.abs(x), np.abs(g), kshape, stride, pad))


@given(size=st.integers(1, 12), k=st.integers(1, 3), stride=st.integers(1, 3),
       pad=st.integers(0, 3))
def test_out_size_counts_every_window_that_fits(size, k, stride, pad):
    assume(size + 2 * pad >= k)
    starts = range(-pad, size + pad - k + 1, stride)
    assert conv.out_size(size, k, stride, pad) == len(starts)


# ------------------------------------------------------------------ maxpool
@st.composite
def pool_geometry(draw):
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    k, stride = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    pad = draw(st.integers(0, k // 2))
    assume(min(h, w) + 2 * pad >= k)
    return n, c, h, w, k, stride, pad


@given(data=st.data(), geom=pool_geometry())
def test_maxpool_forward_matches_reference(data, geom):
    # ties are common in drawn data: the first maximum in row-major order wins
    n, c, h, w, k, stride, pad = geom
    x = data.draw(values((n, c, h, w)))
    y, argmax = pool.maxpool2d_forward(x, k, stride, pad)
    ref_y, ref_argmax = ref_maxpool(x, k, stride, pad)
    np.testing.assert_array_equal(y, ref_y)
    np.testing.assert_array_equal(argmax, ref_argmax)


@given(data=st.data(), geom=pool_geometry())
def test_maxpool_backward_routes_grad_to_the_argmax(data, geom):
    # Arrange
    n, c, h, w, k, stride, pad = geom
    x = data.draw(values((n, c, h, w)))
    y, argmax = pool.maxpool2d_forward(x, k, stride, pad)
    g = data.draw(values(y.shape))
    # Act
    gx = pool.maxpool2d_backward(g, argmax, x.shape)
    # Assert: a scatter-add of g into each window's argmax
    ref = np.zeros((n, c, h * w))
    flat_g = g.astype(np.float64).reshape(n, c, -1)
    flat_idx = argmax.reshape(n, c, -1)
    for a in range(n):
        for b in range(c):
            np.add.at(ref[a, b], flat_idx[a, b], flat_g[a, b])
    scale = np.zeros_like(ref)
    for a in range(n):
        for b in range(c):
            np.add.at(scale[a, b], flat_idx[a, b], np.abs(flat_g[a, b]))
    assert_close(gx, ref.reshape(x.shape), scale.reshape(x.shape))


# --------------------------------------------------------------------- norm
@st.composite
def nchw(draw):
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 4)),
             draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    return draw(values(shape))


@given(x=nchw())
def test_channel_mean_var_matches_reference(x):
    mean, var = norm.channel_mean_var(x)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=(0, 2, 3)), rtol=1e-12,
                               atol=1e-12 * np.abs(x64).max())
    np.testing.assert_allclose(var, x64.var(axis=(0, 2, 3)), rtol=1e-10,
                               atol=1e-12 * np.abs(x64).max() ** 2)


@given(data=st.data(), x=nchw())
def test_scale_shift_matches_reference(data, x):
    c = x.shape[1]
    scale, shift = data.draw(values((c,))), data.draw(values((c,)))
    y = norm.scale_shift(x, scale, shift)
    terms = x.astype(np.float64) * scale[None, :, None, None]
    ref = terms + shift[None, :, None, None]
    assert_close(y, ref, np.abs(terms) + np.abs(shift)[None, :, None, None])


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
    prod = g.astype(np.float64) * xhat
    np.testing.assert_allclose(sum_g, g.astype(np.float64).sum(axis=(0, 2, 3)),
                               rtol=0, atol=1e-12 * np.abs(g).sum() + 1e-12)
    # xhat and the product are rounded to float32 before the float64 sum (xhat
    # may be fused into one multiply-add: bound by |x*s| + |t| as well)
    scale = np.abs(g.astype(np.float64)) * (
        np.abs(x.astype(np.float64) * s[None, :, None, None])
        + np.abs(t)[None, :, None, None])
    bound = 1e-7 * (np.abs(prod) + 2 * scale).sum(axis=(0, 2, 3)) + 1e-12
    assert np.all(np.abs(sum_gx - prod.sum(axis=(0, 2, 3))) <= bound)


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
    assert_close(out, sum(terms), sum(np.abs(tm) for tm in terms) + 2 * np.abs(k64) * xs)
