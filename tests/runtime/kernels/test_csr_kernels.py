"""The CSR-weight kernels (runtime/kernels/csr_conv.py, csr_linear.py, csr_direct.py,
csr_transpose.py, csr_build.py) against their float64 NumPy references
(runtime/kernels/reference.py) and the dense kernels, within the float32 bound of
kernel_checks.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from kernel_checks import assert_close, exact, values
from sparsefedpp.runtime.errors import ConfigError, DTypeError, ShapeError
from sparsefedpp.runtime.kernels import (
    conv,
    csr_build,
    csr_conv,
    csr_direct,
    csr_linear,
    csr_transpose,
)
from sparsefedpp.runtime.kernels import reference as ref
from sparsefedpp.runtime.sparsity.csr import to_csr

pytestmark = pytest.mark.device  # part of the emulated-ARM subset (.ci/aarch64.sh)


def sparse_values(data, shape):
    """Drawn values with density 0, 1 or a drawn mask (empty rows included)."""
    vals = data.draw(values(shape))
    kind = data.draw(st.sampled_from(["zero", "dense", "mask"]))
    if kind == "zero":
        return np.zeros(shape, np.float32)
    if kind == "dense":
        return vals
    return np.where(data.draw(arrays(np.bool_, shape)), vals, np.float32(0))


def csr_args(w):
    m = to_csr(w)
    return m.data, m.indices, m.indptr


@st.composite
def conv_geometry(draw):
    """(n, c, o, h, w, kh, kw, stride, pad): k in {1, 2, 3}, stride 1-3, pad 0-2."""
    n, c, o = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    kh = draw(st.sampled_from([1, 3, 2]))
    kw = draw(st.sampled_from([kh, 1, 3]))
    stride = draw(st.sampled_from([1, 2, 3]))
    pad = draw(st.sampled_from([0, 1, 2]))
    assume(h + 2 * pad >= kh and w + 2 * pad >= kw)
    return n, c, o, h, w, kh, kw, stride, pad


# ------------------------------------------------------------------- conv
@given(data=st.data(), geom=conv_geometry())
def test_csr_conv2d_forward_matches_reference_and_dense(data, geom):
    # Arrange
    n, c, o, h, w, kh, kw, stride, pad = geom
    x = data.draw(values((n, c, h, w)))
    wt = sparse_values(data, (o, c, kh, kw))
    data_, indices, indptr = csr_args(wt)
    # Act
    y = csr_conv.csr_conv2d_forward(x, data_, indices, indptr, wt.shape, stride, pad)
    # Assert
    want, scale = exact(ref.csr_conv2d_forward, (x, data_), indices, indptr,
                        wt.shape, stride, pad)
    assert_close(y, want, scale)
    dense = conv.conv2d_forward(x, wt, stride, pad).astype(np.float64)
    assert_close(y, dense, 2 * scale)


@given(data=st.data(), geom=conv_geometry())
def test_csr_conv2d_grad_input_matches_reference_and_dense(data, geom):
    # Arrange
    n, c, o, h, w, kh, kw, stride, pad = geom
    wt = sparse_values(data, (o, c, kh, kw))
    g = data.draw(values((n, o, ref.out_size(h, kh, stride, pad),
                          ref.out_size(w, kw, stride, pad))))
    data_, indices, indptr = csr_args(wt)
    # Act
    gx = csr_conv.csr_conv2d_grad_input(g, data_, indices, indptr, wt.shape,
                                        (n, c, h, w), stride, pad)
    # Assert
    want, scale = exact(ref.csr_conv2d_grad_input, (g, data_), indices, indptr,
                        wt.shape, (n, c, h, w), stride, pad)
    assert_close(gx, want, scale)
    dense = conv.conv2d_grad_input(g, wt, (n, c, h, w), stride, pad)
    assert_close(gx, dense.astype(np.float64), 2 * scale)


PATHS = ["planes", "direct"]


@given(data=st.data(), geom=conv_geometry(), path=st.sampled_from(PATHS))
def test_each_conv_path_matches_reference_and_dense(data, geom, path):
    # the private entry points force the phase-plane or the direct path
    # Arrange
    n, c, o, h, w, kh, kw, stride, pad = geom
    x = data.draw(values((n, c, h, w)))
    wt = sparse_values(data, (o, c, kh, kw))
    g = data.draw(values((n, o, ref.out_size(h, kh, stride, pad),
                          ref.out_size(w, kw, stride, pad))))
    data_, indices, indptr = csr_args(wt)
    # Act
    y = csr_conv._conv_forward(x, data_, indices, indptr, wt.shape, stride, pad, path)
    gx = csr_conv._conv_grad_input(g, data_, indices, indptr, wt.shape, x.shape,
                                   stride, pad, path)
    # Assert
    want, scale = exact(ref.csr_conv2d_forward, (x, data_), indices, indptr,
                        wt.shape, stride, pad)
    assert_close(y, want, scale)
    assert_close(y, conv.conv2d_forward(x, wt, stride, pad).astype(np.float64),
                 2 * scale)
    want, gscale = exact(ref.csr_conv2d_grad_input, (g, data_), indices, indptr,
                         wt.shape, x.shape, stride, pad)
    assert_close(gx, want, gscale)
    dense = conv.conv2d_grad_input(g, wt, x.shape, stride, pad).astype(np.float64)
    assert_close(gx, dense, 2 * gscale)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("c, h, wd, o, kh, kw, stride, pad", [
    (16, 32, 32, 16, 3, 3, 1, 1), (16, 32, 32, 32, 3, 3, 2, 1),
    (8, 16, 16, 8, 1, 1, 2, 0),
    (4, 12, 17, 6, 3, 1, 2, 2), (4, 9, 13, 5, 1, 3, 1, 2), (3, 11, 10, 4, 3, 3, 3, 0),
    (64, 4, 4, 8, 3, 3, 1, 1)])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 1.0])
def test_both_paths_agree_on_larger_maps(path, c, h, wd, o, kh, kw, stride, pad,
                                         density):
    # rows longer than one vector, kh != kw, empty rows, nnz 0 and density 1
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, c, h, wd)).astype(np.float32)
    wt = rng.standard_normal((o, c, kh, kw)).astype(np.float32)
    wt[rng.random(wt.shape) >= density] = 0.0
    if density < 1.0:
        wt[::2] = 0.0
    y = csr_conv._conv_forward(x, *csr_args(wt), wt.shape, stride, pad, path)
    np.testing.assert_allclose(y, conv.conv2d_forward(x, wt, stride, pad),
                               rtol=1e-5, atol=1e-4)
    g = rng.standard_normal(y.shape).astype(np.float32)
    gx = csr_conv._conv_grad_input(g, *csr_args(wt), wt.shape, x.shape, stride, pad,
                                   path)
    np.testing.assert_allclose(gx, conv.conv2d_grad_input(g, wt, x.shape, stride, pad),
                               rtol=1e-5, atol=1e-4)


@given(data=st.data(), geom=conv_geometry(), path=st.sampled_from(PATHS),
       relu=st.booleans())
def test_a_plan_adds_the_bias_and_relu_as_a_second_pass_would(data, geom, path, relu):
    # the fused bias is the same float32 add as y += b; the fused ReLU np.maximum
    # (bit for bit), on both paths, empty rows and nnz 0 included
    n, c, o, h, w, kh, kw, stride, pad = geom
    x = data.draw(values((n, c, h, w)))
    wt = sparse_values(data, (o, c, kh, kw))
    bias = data.draw(values((o,)))
    plan = csr_conv.plan_conv2d_forward(*csr_args(wt), wt.shape, x.shape, stride, pad,
                                        path)

    got = plan.run(x, bias, relu)

    want = csr_conv._conv_forward(x, *csr_args(wt), wt.shape, stride, pad, path)
    want += bias[None, :, None, None]
    if relu:
        want = np.maximum(want, np.float32(0))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(plan.run(x), csr_conv._conv_forward(
        x, *csr_args(wt), wt.shape, stride, pad, path))


def test_a_fused_relu_keeps_nan_as_np_maximum_does():
    x = np.ones((1, 2, 4, 4), np.float32)
    wt = np.zeros((3, 2, 3, 3), np.float32)
    wt[1, 0, 1, 1] = np.nan
    wt[2, 1, 0, 0] = -1.0
    for path in PATHS:
        plan = csr_conv.plan_conv2d_forward(*csr_args(wt), wt.shape, x.shape, 1, 1,
                                            path)
        y = plan.run(x, np.array([-1.0, 0.5, 0.0], np.float32), relu=True)
        assert not y[0, 0].any()                       # empty row, negative bias
        assert np.isnan(y[0, 1]).all()                 # NaN weight
        assert (y[0, 2] >= 0).all() and not np.isnan(y[0, 2]).any()


@pytest.mark.parametrize("change, match", [
    ({"x": np.zeros((2, 3, 5, 5), np.float32)}, "shape \\(1, 3, 5, 5\\)"),
    ({"x": np.zeros((1, 3, 5, 5))}, "float32 x"),
    ({"bias": np.zeros(3, np.float32)}, "bias of shape \\(4,\\)"),
    ({"bias": np.zeros(4)}, "float32 bias"),
])
def test_a_plan_refuses_other_inputs_than_it_was_made_for(change, match):
    wt = np.ones((4, 3, 3, 3), np.float32)
    plan = csr_conv.plan_conv2d_forward(*csr_args(wt), wt.shape, (1, 3, 5, 5), 1, 1)
    args = {"x": np.zeros((1, 3, 5, 5), np.float32), "bias": None}
    args.update(change)
    with pytest.raises(ShapeError, match=match):
        plan.run(**args)


def test_low_density_takes_the_direct_path_and_high_density_the_planes():
    # ResNet-8 16@32x32->16 3x3: 23 nonzeros (1 %) -> direct; 30 % -> planes
    assert csr_direct.use_direct(23, 32 * 32, 16 * 34 * 34, "forward")
    assert csr_direct.use_direct(23, 32 * 32, 16 * 32 * 32, "grad_input")
    assert not csr_direct.use_direct(691, 32 * 32, 16 * 34 * 34, "forward")
    assert not csr_direct.use_direct(691, 32 * 32, 16 * 32 * 32, "grad_input")


@given(data=st.data(), geom=conv_geometry())
def test_csr_conv2d_macs_counts_exactly_the_valid_taps(data, geom):
    n, c, o, h, w, kh, kw, stride, pad = geom
    wt = sparse_values(data, (o, c, kh, kw))
    oh, ow = ref.out_size(h, kh, stride, pad), ref.out_size(w, kw, stride, pad)
    _, indices, indptr = csr_args(wt)
    args = (indices, indptr, wt.shape, (n, c, h, w), stride, pad, n)
    macs = csr_conv.csr_conv2d_macs(*args)
    assert macs == ref.csr_conv2d_macs(*args)
    assert macs <= n * np.count_nonzero(wt) * oh * ow


@pytest.mark.parametrize("c, h, o, k, stride, pad", [
    (16, 32, 16, 3, 1, 1), (16, 32, 32, 3, 2, 1), (32, 16, 64, 1, 2, 0),
    (64, 4, 8, 3, 1, 1)])
def test_resnet_shapes_at_batch_two(c, h, o, k, stride, pad):
    # multi-image chunks (4x4) and one-image chunks (32x32), partly empty rows
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, c, h, h)).astype(np.float32)
    wt = rng.standard_normal((o, c, k, k)).astype(np.float32)
    wt[rng.random(wt.shape) < 0.8] = 0.0
    wt[::3] = 0.0
    y = csr_conv.csr_conv2d_forward(x, *csr_args(wt), wt.shape, stride, pad)
    np.testing.assert_allclose(y, conv.conv2d_forward(x, wt, stride, pad),
                               rtol=1e-5, atol=1e-5)
    g = rng.standard_normal(y.shape).astype(np.float32)
    gx = csr_conv.csr_conv2d_grad_input(g, *csr_args(wt), wt.shape, x.shape, stride,
                                        pad)
    np.testing.assert_allclose(gx, conv.conv2d_grad_input(g, wt, x.shape, stride, pad),
                               rtol=1e-5, atol=1e-5)


def test_parallel_transpose_gives_the_serial_result(monkeypatch):
    # large matrices regroup their nonzeros with prange over row blocks
    rng = np.random.default_rng(4)
    wt = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    wt[rng.random(wt.shape) < 0.5] = 0.0
    wt[2] = 0.0
    data, indices, indptr = csr_args(wt)
    group = rng.integers(0, 7, 27)
    serial = csr_transpose.transposed(data, indices, indptr, group, group * 10, 7)
    monkeypatch.setattr(csr_transpose, "_PARALLEL_NNZ", 0)
    parallel = csr_transpose.transposed(data, indices, indptr, group, group * 10, 7)
    for a, b in zip(parallel, serial, strict=True):
        np.testing.assert_array_equal(a, b)
    g = rng.standard_normal((2, 5, 3, 3)).astype(np.float32)
    gx = csr_conv.csr_conv2d_grad_input(g, data, indices, indptr, wt.shape,
                                        (2, 3, 5, 5), 2, 1)
    np.testing.assert_allclose(gx, conv.conv2d_grad_input(g, wt, (2, 3, 5, 5), 2, 1),
                               rtol=1e-5, atol=1e-5)


def test_nan_weight_propagates_and_empty_weight_gives_zeros():
    x = np.ones((1, 2, 4, 4), np.float32)
    wt = np.zeros((3, 2, 3, 3), np.float32)
    wt[1, 0, 1, 1] = np.nan
    y = csr_conv.csr_conv2d_forward(x, *csr_args(wt), wt.shape, 1, 1)
    assert np.isnan(y[0, 1]).all() and not np.isnan(y[0, [0, 2]]).any()
    assert not y[0, [0, 2]].any()
    empty = csr_args(np.zeros_like(wt))
    assert not csr_conv.csr_conv2d_forward(x, *empty, wt.shape, 2, 1).any()
    gx = csr_conv.csr_conv2d_grad_input(np.ones((1, 3, 2, 2), np.float32), *empty,
                                        wt.shape, x.shape, 2, 1)
    assert gx.shape == x.shape and not gx.any()


def test_read_only_inputs_are_accepted():
    # decoded wire buffers are read-only np.frombuffer views (STYLE.md, Codec)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    wt = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    data, indices, indptr = csr_args(wt)
    ro = [np.frombuffer(a.tobytes(), a.dtype) for a in (x.ravel(), data, indices,
                                                          indptr)]
    y = csr_conv.csr_conv2d_forward(ro[0].reshape(x.shape), *ro[1:], wt.shape, 1, 0)
    np.testing.assert_allclose(y, conv.conv2d_forward(x, wt, 1, 0), rtol=1e-5,
                               atol=1e-4)
    g = np.frombuffer(y.tobytes(), np.float32).reshape(y.shape)
    gx = csr_conv.csr_conv2d_grad_input(g, *ro[1:], wt.shape, x.shape, 1, 0)
    np.testing.assert_allclose(gx, conv.conv2d_grad_input(y, wt, x.shape, 1, 0),
                               rtol=1e-5, atol=1e-3)
    x2 = ro[0][:54].reshape(2, 27)
    w2 = wt.reshape(4, 27)
    np.testing.assert_allclose(csr_linear.csr_linear_forward(x2, *ro[1:], 4), x2 @ w2.T,
                               rtol=1e-5, atol=1e-4)


def test_other_integer_index_dtypes_are_converted():
    # int32 indptr is STYLE.md's wire choice; int64 indices come from np.nonzero
    rng = np.random.default_rng(5)
    wt = rng.standard_normal((3, 4)).astype(np.float32)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    data, indices, indptr = csr_args(wt)
    y = csr_linear.csr_linear_forward(x, data, indices.astype(np.int64),
                               indptr.astype(np.int32), 3)
    np.testing.assert_allclose(y, x @ wt.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="below 2\\*\\*31"):
        csr_linear.csr_linear_forward(x, data, indices.astype(np.int64) + 2**32, indptr,
                                      3)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"stride": 0}, ConfigError, "stride >= 1"),
    ({"pad": -1}, ConfigError, "pad >= 0"),
    ({"kshape": (4, 3, 9, 9)}, ConfigError, "at least 9x9"),
    ({"kshape": (4, 3, 0, 3)}, ConfigError, "kh, kw >= 1"),
    ({"kshape": (4, 2, 3, 3)}, ShapeError, "C=2"),
    ({"x": np.zeros((3, 5, 5), np.float32)}, ShapeError, "\\(N, C, H, W\\)"),
    ({"data": np.zeros(108, np.int32)}, DTypeError, "data of dtype float32"),
    ({"indices": np.zeros(108, np.float32)}, DTypeError, "indices of dtype int32"),
    ({"indptr": np.zeros(5, np.int64)}, ConfigError, "from 0 to nnz"),
    ({"indices": np.full(108, 27, np.int32)}, ConfigError, "in \\[0, 27\\)"),
])
def test_csr_conv2d_forward_rejects_bad_arguments(kwargs, error, match):
    rng = np.random.default_rng(2)
    data, indices, indptr = csr_args(rng.standard_normal((4, 3, 3, 3)).astype(
        np.float32))
    args = {"x": np.zeros((1, 3, 5, 5), np.float32), "data": data, "indices": indices,
            "indptr": indptr, "kshape": (4, 3, 3, 3), "stride": 1, "pad": 1}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        csr_conv.csr_conv2d_forward(**args)


def test_csr_conv2d_grad_input_rejects_a_wrong_grad_shape():
    data, indices, indptr = csr_args(np.ones((4, 3, 3, 3), np.float32))
    with pytest.raises(ShapeError, match="expected grad_out of shape"):
        csr_conv.csr_conv2d_grad_input(np.zeros((1, 4, 5, 4), np.float32), data,
                                       indices, indptr, (4, 3, 3, 3), (1, 3, 5, 5), 1,
                                       1)


# ----------------------------------------------------------------- linear
@given(data=st.data(), n=st.integers(1, 40), k=st.integers(1, 12),
       o=st.integers(1, 12))
def test_csr_linear_matches_numpy(data, n, k, o):
    # Arrange
    x = data.draw(values((n, k)))
    g = data.draw(values((n, o)))
    wt = sparse_values(data, (o, k))
    data_, indices, indptr = csr_args(wt)
    # Act
    y = csr_linear.csr_linear_forward(x, data_, indices, indptr, o)
    gx = csr_linear.csr_linear_grad_input(g, data_, indices, indptr, k)
    # Assert
    assert_close(y, *exact(ref.csr_linear_forward, (x, data_), indices, indptr, o))
    assert_close(gx, *exact(ref.csr_linear_grad_input, (g, data_), indices, indptr, k))


def test_csr_linear_beyond_one_chunk_of_images():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2100, 5)).astype(np.float32)
    wt = rng.standard_normal((3, 5)).astype(np.float32)
    wt[1] = 0.0
    np.testing.assert_allclose(csr_linear.csr_linear_forward(x, *csr_args(wt), 3),
                               x @ wt.T, rtol=1e-5, atol=1e-5)
    g = rng.standard_normal((2100, 3)).astype(np.float32)
    np.testing.assert_allclose(csr_linear.csr_linear_grad_input(g, *csr_args(wt), 5),
                               g @ wt, rtol=1e-5, atol=1e-5)


def test_csr_linear_rejects_mismatched_shapes():
    args = csr_args(np.ones((3, 4), np.float32))
    with pytest.raises(ShapeError, match="expected 3 entries"):
        csr_linear.csr_linear_forward(np.zeros((2, 4), np.float32), *args, 2)
    with pytest.raises(ConfigError, match="in \\[0, 3\\)"):
        csr_linear.csr_linear_forward(np.zeros((2, 3), np.float32), *args, 3)
    with pytest.raises(ShapeError, match="\\(N, out_features\\)"):
        csr_linear.csr_linear_grad_input(np.zeros(3, np.float32), *args, 4)


# -------------------------------------------------------------- csr_build
@pytest.mark.parametrize("alpha", [1.0, 1.25, 1.5, 2.0, 3.0])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 1.0])
def test_csr_of_weight_equals_to_csr_of_the_effective_weight(alpha, density):
    from sparsefedpp.runtime.layers import powerprop

    rng = np.random.default_rng(int(alpha * 100 + density * 10))
    v = rng.standard_normal((12, 5, 3, 3)).astype(np.float32)
    v[rng.random(v.shape) >= density] = 0.0
    v[3] = 0.0  # an empty row
    want = to_csr(powerprop.effective_weight(v, alpha)[0])
    counts = csr_build.weight_row_nnz(v)
    np.testing.assert_array_equal(counts, ref.weight_row_nnz(v))
    twin = ref.csr_of_weight(v, alpha)
    for got in (csr_build.csr_of_weight(v, alpha),
                csr_build.csr_of_weight(v, alpha, counts)):
        data, indices, indptr = got
        np.testing.assert_array_equal(indptr, want.indptr)
        np.testing.assert_array_equal(indices, want.indices)
        np.testing.assert_allclose(data, want.data, rtol=1e-6)  # general p: powf vs npy
        if alpha in (1.0, 1.25, 1.5):
            np.testing.assert_array_equal(data, want.data)  # same sqrt path: bit-exact
        for a, b in zip(got[1:], twin[1:], strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(data, twin[0], rtol=1e-6)
