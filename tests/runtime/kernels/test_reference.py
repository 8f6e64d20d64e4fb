"""The NumPy references (runtime/kernels/reference.py) checked themselves: each
against an independent formulation on small cases (explicit loops, an adjoint
identity, plain Python), so the kernels are not compared with a wrong twin."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sparsefedpp.runtime.kernels import reference as ref
from sparsefedpp.runtime.sparsity.csr import to_csr

pytestmark = pytest.mark.device  # part of the emulated-ARM subset (.ci/aarch64.sh)

RNG = np.random.default_rng(0)
#: (n, c, o, h, w, kh, kw, stride, pad): odd sizes, kh != kw, strides 1-3
GEOMS = [(2, 2, 3, 5, 4, 3, 2, 2, 1), (1, 3, 2, 6, 6, 3, 3, 1, 1),
         (2, 1, 2, 7, 5, 1, 3, 3, 0), (1, 2, 1, 4, 4, 2, 2, 1, 2)]


def rand(*shape):
    return RNG.standard_normal(shape)


def loop_conv(x, w, s, p):
    """y[n, o, a, b] = sum over c, i, j of w[o, c, i, j] x[n, c, a*s-p+i, b*s-p+j]."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh, ow = (h + 2 * p - kh) // s + 1, (wd + 2 * p - kw) // s + 1
    y = np.zeros((n, o, oh, ow))
    for nn, oo, a, b, cc, i, j in itertools.product(
            range(n), range(o), range(oh), range(ow), range(c), range(kh), range(kw)):
        r, q = a * s - p + i, b * s - p + j
        if 0 <= r < h and 0 <= q < wd:
            y[nn, oo, a, b] += w[oo, cc, i, j] * x[nn, cc, r, q]
    return y


def valid_taps(col, kshape, in_hw, s, p):
    """(a, b) output positions whose input for column col of w lies inside x."""
    _, _, kh, kw = kshape
    h, wd = in_hw
    i, j = col // kw % kh, col % kw
    oh, ow = (h + 2 * p - kh) // s + 1, (wd + 2 * p - kw) // s + 1
    return [(a, b) for a in range(oh) for b in range(ow)
            if 0 <= a * s - p + i < h and 0 <= b * s - p + j < wd]


# ---------------------------------------------------------------- dense conv


@pytest.mark.parametrize("geom", GEOMS)
def test_conv_references_are_the_loops_and_their_adjoints(geom):
    n, c, o, h, w, kh, kw, s, p = geom
    x, wt = rand(n, c, h, w), rand(o, c, kh, kw)
    y = ref.conv2d_forward(x, wt, s, p)
    g = rand(*y.shape)
    assert y.shape == (n, o, ref.out_size(h, kh, s, p), ref.out_size(w, kw, s, p))
    assert ref.out_size(h, kh, s, p) == (h + 2 * p - kh) // s + 1
    np.testing.assert_allclose(y, loop_conv(x, wt, s, p), rtol=1e-12, atol=1e-12)
    # <conv(x, w), g> is linear in w and in x: its gradients are the references'
    gw = ref.conv2d_grad_weight(x, g, wt.shape, s, p)
    gx = ref.conv2d_grad_input(g, wt, x.shape, s, p)
    dw, dx = rand(*wt.shape), rand(*x.shape)
    inner = np.vdot(ref.conv2d_forward(x, dw, s, p), g)
    np.testing.assert_allclose(np.vdot(gw, dw), inner, rtol=1e-12)
    inner = np.vdot(ref.conv2d_forward(dx, wt, s, p), g)
    np.testing.assert_allclose(np.vdot(gx, dx), inner, rtol=1e-12)
    assert ref.conv2d_forward(x.astype(np.float32), wt, s, p).dtype == np.float64
    assert ref.conv2d_forward(*(a.astype(np.float32) for a in (x, wt)), s,
                              p).dtype == np.float32


def test_maxpool_references_are_the_loops():
    x = RNG.integers(-3, 4, (2, 2, 5, 6)).astype(np.float32)  # many ties
    k, s, p = 3, 2, 1
    y, argmax = ref.maxpool2d_forward(x, k, s, p)
    g = rand(*y.shape)
    gx = ref.maxpool2d_backward(g, argmax, x.shape)
    want_gx = np.zeros(x.shape)
    for n, c, a, b in np.ndindex(*y.shape):
        window = [(a * s - p + i, b * s - p + j) for i in range(k) for j in range(k)]
        inside = [(r, q) for r, q in window if 0 <= r < 5 and 0 <= q < 6]
        best = max(x[n, c, r, q] for r, q in inside)
        first = next((r, q) for r, q in inside if x[n, c, r, q] == best)
        assert y[n, c, a, b] == best and argmax[n, c, a, b] == first[0] * 6 + first[1]
        want_gx[n, c, first[0], first[1]] += g[n, c, a, b]
    np.testing.assert_allclose(gx, want_gx, rtol=1e-12)
    assert argmax.dtype == np.int32


# ---------------------------------------------------------------- BatchNorm


def test_batchnorm_references_are_the_per_channel_formulas():
    x = rand(3, 4, 2, 5).astype(np.float32)
    g = rand(*x.shape)
    s, t, a, b, k = (rand(4).astype(np.float32) for _ in range(5))
    mean, var = ref.channel_mean_var(x)
    xhat = ref.scale_shift(x, s, t).astype(np.float64)  # rounded as the kernels'
    for c in range(4):
        plane = x[:, c].astype(np.float64).ravel()
        assert mean[c] == pytest.approx(sum(plane) / plane.size, rel=1e-12)
        assert var[c] == pytest.approx(sum((plane - mean[c]) ** 2) / plane.size,
                                       rel=1e-10)
    sum_g, sum_gx = ref.grad_sums(g, x, s, t)
    np.testing.assert_allclose(sum_g, g.sum(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(sum_gx, (g * xhat).sum(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(
        ref.bn_grad_input(g, x, s, t, a, b, k),
        a[None, :, None, None] * g - b[None, :, None, None]
        - k[None, :, None, None] * xhat, rtol=1e-12)


def test_fused_batchnorm_references_reduce_to_the_unfused_ones():
    x, res = (rand(2, 3, 4, 4).astype(np.float32) for _ in range(2))
    g = rand(*x.shape)
    s, t, a, b, k = (rand(3).astype(np.float32) for _ in range(5))
    fs, ft = rand(3).astype(np.float32), rand(3).astype(np.float32)
    y, mask = ref.bn_relu_forward(x, fs, ft)
    v = x.astype(np.float64) * fs[None, :, None, None] + ft[None, :, None, None]
    np.testing.assert_allclose(y, np.maximum(v, 0), rtol=1e-6)
    assert mask is None
    y, mask = ref.bn_relu_forward(x, fs, ft, res)
    np.testing.assert_allclose(y, np.maximum(v + res, 0), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(mask.reshape(x.shape), v + res > 0)
    # the ReLU's gradient mask from the recomputed input, or from the kept mask
    relu = ref.scale_shift(x, fs, ft) > 0
    gm = g * relu
    for got, want in zip(ref.bn_relu_grad_sums(g, x, s, t, fs, ft),
                         ref.grad_sums(gm, x, s, t), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(ref.bn_relu_grad_input(g, x, s, t, fs, ft, a, b, k),
                               ref.bn_grad_input(gm, x, s, t, a, b, k), rtol=1e-12)
    keep = relu.astype(np.uint8).reshape(6, 16)
    for got, want in zip(ref.bn_mask_grad_sums(g, x, keep, s, t),
                         ref.grad_sums(gm, x, s, t), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    grad_in, g_masked = ref.bn_mask_grad_input(g, x, keep, s, t, a, b, k)
    np.testing.assert_array_equal(g_masked, gm)
    np.testing.assert_allclose(grad_in, ref.bn_grad_input(gm, x, s, t, a, b, k),
                               rtol=1e-12)


# ---------------------------------------------------------------- CSR weights


@pytest.mark.parametrize("geom", GEOMS)
def test_csr_references_are_the_dense_ones_on_the_densified_weight(geom):
    n, c, o, h, w, kh, kw, s, p = geom
    wt = (rand(o, c, kh, kw) * (RNG.random((o, c, kh, kw)) < 0.4)).astype(np.float32)
    m = to_csr(wt)
    csr = (m.data, m.indices, m.indptr)
    np.testing.assert_array_equal(
        ref.dense_of_csr(*csr, (o, c * kh * kw)).reshape(wt.shape), wt)
    x, bias = rand(n, c, h, w), rand(o)
    y = ref.csr_conv2d_forward(x, *csr, wt.shape, s, p, bias, relu=True)
    want = np.maximum(loop_conv(x, wt, s, p) + bias[None, :, None, None], 0)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    g = rand(*y.shape)
    gx = ref.csr_conv2d_grad_input(g, *csr, wt.shape, x.shape, s, p)
    np.testing.assert_allclose(gx, ref.conv2d_grad_input(g, wt, x.shape, s, p),
                               rtol=1e-12)
    macs = sum(len(valid_taps(col, wt.shape, (h, w), s, p)) for col in m.indices)
    assert ref.csr_conv2d_macs(m.indices, m.indptr, wt.shape, x.shape, s, p, n) == \
        n * macs
    x2, g2 = rand(n, c * kh * kw), rand(n, o)
    w2 = wt.reshape(o, -1)
    np.testing.assert_allclose(ref.csr_linear_forward(x2, *csr, o), x2 @ w2.T,
                               rtol=1e-12)
    np.testing.assert_allclose(ref.csr_linear_grad_input(g2, *csr, c * kh * kw),
                               g2 @ w2, rtol=1e-12)


@pytest.mark.parametrize("alpha", [1.0, 1.25, 2.0])
def test_csr_of_weight_reference_is_the_csr_of_the_powered_weight(alpha):
    v = (rand(5, 3, 3, 3) * (RNG.random((5, 3, 3, 3)) < 0.5)).astype(np.float32)
    v[2] = 0.0
    data, indices, indptr = ref.csr_of_weight(v, alpha)
    want = to_csr((v * np.abs(v) ** (alpha - 1)).astype(np.float32))
    np.testing.assert_array_equal(indptr, want.indptr)
    np.testing.assert_array_equal(indices, want.indices)
    np.testing.assert_allclose(data, want.data, rtol=1e-6)
    np.testing.assert_array_equal(ref.weight_row_nnz(v), np.diff(want.indptr))
    assert (data.dtype, indices.dtype, indptr.dtype) == (np.float32, np.int32, np.int64)


# ---------------------------------------------------------------- kept activations


def test_kept_set_references_are_the_python_rules():
    x = np.array([0.0, 2.0, -1.0, 1.0, np.nan, -2.0, 1.0, 0.5, -0.0, 3.0], np.float32)
    assert ref.topk_abs_threshold(x, 1) != ref.topk_abs_threshold(x, 1)  # NaN first
    assert ref.topk_abs_threshold(x, 2) == 3.0
    assert ref.topk_abs_threshold(x, 4) == 2.0 and ref.topk_abs_threshold(x, 5) == 1.0
    for t, limit in itertools.product([0.0, 1.0, 2.0, 5.0], [-1, 0, 4, 5, 6, 20]):
        a = np.abs(x.astype(np.float64))
        above = [i for i in range(x.size) if not a[i] <= t]
        ties = [i for i in range(x.size) if a[i] == t and a[i] > 0]
        if limit >= 0:
            ties = ties[:max(0, limit - len(above))]
        want = sorted(above + ties)
        idx, vals = ref.compress(x, t, limit)
        assert idx.tolist() == want and idx.dtype == np.int32
        np.testing.assert_array_equal(vals, x[want])
        bitmap = ref.to_bitmap(idx, x.size)
        bits = [(bitmap[i // 8] >> (7 - i % 8)) & 1 for i in range(x.size)]
        assert [i for i, bit in enumerate(bits) if bit] == want
        np.testing.assert_array_equal(ref.bitmap_to_indices(bitmap, len(want)), idx)
        dense = ref.dense_of_kept(idx, vals, (2, 5))
        np.testing.assert_array_equal(dense.ravel()[want], x[want])
        assert not np.any(np.delete(dense.ravel(), want))


@pytest.mark.parametrize("geom", GEOMS)
def test_sparse_grad_references_are_the_masked_dense_gradients(geom):
    n, c, o, h, w, kh, kw, s, p = geom
    x = rand(n, c, h, w) * (RNG.random((n, c, h, w)) < 0.3)
    idx = np.flatnonzero(x).astype(np.int32)
    vals = x.ravel()[idx]
    g = rand(n, o, ref.out_size(h, kh, s, p), ref.out_size(w, kw, s, p))
    kshape = (o, c, kh, kw)
    np.testing.assert_allclose(
        ref.conv2d_grad_weight_sparse(idx, vals, x.shape, g, kshape, s, p),
        ref.conv2d_grad_weight(x, g, kshape, s, p), rtol=1e-12, atol=1e-12)
    taps = 0  # (kept element, tap) pairs inside grad_out, by the definition
    for f in idx:
        _, _, y, q = np.unravel_index(f, x.shape)
        for i, j in np.ndindex(kh, kw):
            r, t = y + p - i, q + p - j
            taps += (r >= 0 and t >= 0 and r % s == 0 and t % s == 0
                     and r // s < g.shape[2] and t // s < g.shape[3])
    assert ref.conv2d_grad_weight_sparse_macs(idx, x.shape, g.shape, kshape, s,
                                              p) == o * taps
    x2 = x.reshape(n, -1)
    g2 = rand(n, o)
    np.testing.assert_allclose(
        ref.linear_grad_weight_sparse(idx, vals, x2.shape, g2), g2.T @ x2, rtol=1e-12)


# ---------------------------------------------------------------- fixed pattern


@pytest.mark.parametrize("geom", GEOMS)
def test_pattern_references_are_the_dense_gradient_at_the_pattern(geom):
    n, c, o, h, w, kh, kw, s, p = geom
    kshape = (o, c, kh, kw)
    m = to_csr((rand(*kshape) * (RNG.random(kshape) < 0.5)).astype(np.float32))
    x = rand(n, c, h, w) * (RNG.random((n, c, h, w)) < 0.5)
    g = rand(n, o, ref.out_size(h, kh, s, p), ref.out_size(w, kw, s, p))
    dense = ref.conv2d_grad_weight(x, g, kshape, s, p).reshape(o, -1)
    rows = [r for r in range(o) for _ in range(m.indptr[r], m.indptr[r + 1])]
    want = [dense[r, col] for r, col in zip(rows, m.indices, strict=True)]
    got, macs = ref.conv_grad_pattern_dense(x, g, m.indptr, m.indices, kshape, s, p)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert macs == n * sum(len(valid_taps(col, kshape, (h, w), s, p))
                           for col in m.indices)
    kept = np.flatnonzero(x).astype(np.int32)
    got, macs = ref.conv_grad_pattern_kept(kept, x.ravel()[kept], x.shape, g,
                                           m.indptr, m.indices, kshape, s, p)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    pairs = 0  # (kept element of channel c, entry (o, c, i, j)) inside grad_out
    for f in kept:
        _, ch, y, q = np.unravel_index(f, x.shape)
        for col in m.indices:
            i, j = col // kw % kh, col % kw
            r, t = y + p - i, q + p - j
            pairs += (col // (kh * kw) == ch and r >= 0 and t >= 0 and r % s == 0
                      and t % s == 0 and r // s < g.shape[2] and t // s < g.shape[3])
    assert macs == pairs


def test_pattern_values_reference_is_the_power():
    v = np.array([[-2.0, 0.5], [0.0, 3.0]], np.float32)
    flat = np.array([0, 1, 3])
    w, dw_dv = ref.pattern_values(v, flat, 1.5)
    np.testing.assert_allclose(w, [-2.0 * 2 ** 0.5, 0.5 ** 1.5, 3.0 ** 1.5], rtol=1e-6)
    np.testing.assert_allclose(dw_dv, [1.5 * 2 ** 0.5, 1.5 * 0.5 ** 0.5,
                                       1.5 * 3 ** 0.5], rtol=1e-6)


def test_the_references_import_no_numba():
    # a twin must not share the machinery it checks
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(ref))
    names = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
             for a in node.names}
    names |= {node.module or "" for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom)}
    assert names <= {"__future__", "numpy"}, names
