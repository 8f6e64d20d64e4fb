"""The dense conv kernels (runtime/kernels/conv.py, conv_planes.py, conv_rows.py)
against their float64 NumPy references (runtime/kernels/reference.py), over
hypothesis-drawn shapes and values, within the float32 bound of kernel_checks.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from kernel_checks import assert_matches, values
from sparsefedpp.runtime.kernels import conv, conv_planes, conv_rows, geometry
from sparsefedpp.runtime.kernels import reference as ref

pytestmark = pytest.mark.device  # part of the emulated-ARM subset (.ci/aarch64.sh)


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


@given(data=st.data(), geom=conv_geometry())
def test_conv2d_forward_matches_reference(data, geom):
    n, c, o, h, w, kh, kw, stride, pad = geom
    x = data.draw(values((n, c, h, w)))
    wt = data.draw(values((o, c, kh, kw)))
    y = conv.conv2d_forward(x, wt, stride, pad)
    assert_matches(y, ref.conv2d_forward, (x, wt), stride, pad)


@given(data=st.data(), geom=conv_geometry())
def test_conv2d_grad_weight_matches_reference(data, geom):
    n, c, o, h, w, kh, kw, stride, pad = geom
    x = data.draw(values((n, c, h, w)))
    g = data.draw(values((n, o, ref.out_size(h, kh, stride, pad),
                          ref.out_size(w, kw, stride, pad))))
    gw = conv.conv2d_grad_weight(x, g, (o, c, kh, kw), stride, pad)
    assert_matches(gw, ref.conv2d_grad_weight, (x, g), (o, c, kh, kw), stride, pad)


@given(data=st.data(), geom=conv_geometry(), square=st.booleans())
def test_conv2d_grad_input_matches_reference(data, geom, square):
    # square kernels with "same" geometry take the flipped-kernel shortcut
    n, c, o, h, w, kh, kw, stride, pad = geom
    if square:
        kw = kh
    assume(w + 2 * pad >= kw)
    wt = data.draw(values((o, c, kh, kw)))
    g = data.draw(values((n, o, ref.out_size(h, kh, stride, pad),
                          ref.out_size(w, kw, stride, pad))))
    gx = conv.conv2d_grad_input(g, wt, (n, c, h, w), stride, pad)
    assert_matches(gx, ref.conv2d_grad_input, (g, wt), (n, c, h, w), stride, pad)


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
    g = data.draw(values((n, o, ref.out_size(h, kh, stride, pad),
                          ref.out_size(w, kw, stride, pad))))
    layout = {"rows": conv_rows, "planes": conv_planes}[path]

    y = layout.forward(x, wt, stride, pad)
    gx = layout.grad_input(g, wt, (n, c, h, w), stride, pad)

    assert_matches(y, ref.conv2d_forward, (x, wt), stride, pad)
    shape = (n, c, h, w)
    assert_matches(gx, ref.conv2d_grad_input, (g, wt), shape, stride, pad)


@pytest.mark.parametrize("geom", [
    # (n, c, o, h, w, k, stride, pad): wide rows take conv_rows; odd widths and
    # channel counts that are not multiples of six leave short groups and pairs
    (3, 23, 13, 7, 9, 3, 1, 1), (2, 17, 23, 9, 7, 3, 2, 1), (2, 49, 7, 5, 6, 1, 2, 0),
    (13, 24, 50, 4, 4, 3, 1, 1), (1, 64, 6, 3, 3, 3, 2, 1), (2, 22, 16, 6, 5, 3, 1, 0)])
def test_wide_convs_match_reference(geom):
    n, c, o, h, w, k, stride, pad = geom
    rng = np.random.default_rng(sum(geom))
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((o, c, k, k)).astype(np.float32)
    oh, ow = ref.out_size(h, k, stride, pad), ref.out_size(w, k, stride, pad)
    g = rng.standard_normal((n, o, oh, ow)).astype(np.float32)
    assert conv._use_rows(c * k, stride) or conv._use_rows(o * k, stride)

    y = conv.conv2d_forward(x, wt, stride, pad)
    gx = conv.conv2d_grad_input(g, wt, x.shape, stride, pad)
    gw = conv.conv2d_grad_weight(x, g, wt.shape, stride, pad)

    assert_matches(y, ref.conv2d_forward, (x, wt), stride, pad)
    assert_matches(gx, ref.conv2d_grad_input, (g, wt), x.shape, stride, pad)
    assert_matches(gw, ref.conv2d_grad_weight, (x, g), wt.shape, stride, pad)


@pytest.mark.parametrize("geom", [
    # (n, c, o, h, w, k, stride, pad): a grid of >= 8192 floats per thread splits
    # the rows between threads (partial sums), a short one the output channels
    (16, 3, 5, 32, 32, 3, 1, 1), (9, 2, 3, 40, 31, 3, 2, 1), (2, 5, 3, 4, 4, 3, 1, 1),
    (1, 4, 1, 3, 5, 3, 1, 1)])
def test_conv2d_grad_weight_thread_splits(geom):
    n, c, o, h, w, k, stride, pad = geom
    rng = np.random.default_rng(sum(geom))
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    g = rng.standard_normal((n, o, ref.out_size(h, k, stride, pad),
                             ref.out_size(w, k, stride, pad))).astype(np.float32)
    kshape = (o, c, k, k)

    gw = conv.conv2d_grad_weight(x, g, kshape, stride, pad)

    assert_matches(gw, ref.conv2d_grad_weight, (x, g), kshape, stride, pad)


@given(size=st.integers(1, 12), k=st.integers(1, 3), stride=st.integers(1, 3),
       pad=st.integers(0, 3))
def test_out_size_counts_every_window_that_fits(size, k, stride, pad):
    assume(size + 2 * pad >= k)
    starts = range(-pad, size + pad - k + 1, stride)
    assert geometry.out_size(size, k, stride, pad) == len(starts)
