"""Plain NumPy twins of the public kernels, for the tests and the benchmarks.

Each function mirrors one kernel, named in its docstring: the same arguments (less
the tuning ones) and the same result, computed the obvious way (a loop over the
kernel taps, einsum, a sort) in float64, so it is slow and exact to float64
rounding (einsum may use BLAS, so the benchmarks can check large layers too).
Results are float32, or float64 when an array argument is float64: the
tests call with float64 copies to compare the float32 kernels against exact values,
bounded by the same reference over |inputs| (a float32 sum of K terms is within
about K * 2^-24 * sum|terms| of the exact one). Index outputs are int32 and MAC
counts ints, as the kernels'. No Numba here, and nothing shared with the kernels.

Conventions as the kernels': NCHW float arrays; a conv weight (O, C, kh, kw) in
CSR as the O x (C*kh*kw) matrix (``data``, ``indices``, ``indptr``); kept
activations as increasing int32 flat C-order indices and their values; the
BatchNorm kernels' xhat = x*s[c] + t[c] rounded to float32, as they recompute it.
"""

from __future__ import annotations

import numpy as np

F8 = np.float64


def _out(result: np.ndarray, *inputs) -> np.ndarray:
    """result as float64 when an input array is float64, else float32."""
    wide = any(isinstance(a, np.ndarray) and a.dtype == F8 for a in inputs)
    return np.asarray(result, dtype=F8 if wide else np.float32)


def out_size(size: int, k: int, stride: int, pad: int) -> int:
    """Output length of a window (``geometry.out_size``): the starts that fit."""
    return len(range(-pad, size + pad - k + 1, stride))


def _windows(xp: np.ndarray, kh: int, kw: int, stride: int, oh: int, ow: int):
    """(i, j, view of xp[:, :, i + stride*a, j + stride*b]) for every kernel tap."""
    for i in range(kh):
        for j in range(kw):
            yield i, j, xp[:, :, i:i + stride * (oh - 1) + 1:stride,
                           j:j + stride * (ow - 1) + 1:stride]


def _pad(x: np.ndarray, pad: int, value: float = 0.0) -> np.ndarray:
    return np.pad(x.astype(F8), ((0, 0), (0, 0), (pad, pad), (pad, pad)),
                  constant_values=value)


# ---------------------------------------------------------------- dense conv


def conv2d_forward(x, w, stride: int, pad: int) -> np.ndarray:
    """``conv.conv2d_forward``: y (N, O, OH, OW) = conv(x (N, C, H, W), w)."""
    (n, _, h, wd), (o, _, kh, kw) = x.shape, w.shape
    oh, ow = out_size(h, kh, stride, pad), out_size(wd, kw, stride, pad)
    y = np.zeros((n, o, oh, ow))
    for i, j, patch in _windows(_pad(x, pad), kh, kw, stride, oh, ow):
        y += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j].astype(F8),
                       optimize=True)
    return _out(y, x, w)


def conv2d_grad_weight(x, grad_out, kshape: tuple, stride: int, pad: int
                       ) -> np.ndarray:
    """``conv.conv2d_grad_weight``: dL/dw (O, C, kh, kw) from x and grad_out."""
    oh, ow = grad_out.shape[2:]
    gw = np.zeros(kshape)
    for i, j, patch in _windows(_pad(x, pad), kshape[2], kshape[3], stride, oh, ow):
        gw[:, :, i, j] = np.einsum("nohw,nchw->oc", grad_out.astype(F8), patch,
                                   optimize=True)
    return _out(gw, x, grad_out)


def conv2d_grad_input(grad_out, w, in_shape: tuple, stride: int, pad: int
                      ) -> np.ndarray:
    """``conv.conv2d_grad_input``: dL/dx (N, C, H, W), every tap's share of grad_out
    scattered back to the input positions it read."""
    n, c, h, wd = in_shape
    oh, ow = grad_out.shape[2:]
    gp = np.zeros((n, c, h + 2 * pad, wd + 2 * pad))
    for i, j, view in _windows(gp, w.shape[2], w.shape[3], stride, oh, ow):
        view += np.einsum("nohw,oc->nchw", grad_out.astype(F8),
                          w[:, :, i, j].astype(F8), optimize=True)
    return _out(gp[:, :, pad:pad + h, pad:pad + wd], grad_out, w)


# ---------------------------------------------------------------- max-pool


def maxpool2d_forward(x, k: int, stride: int, pad: int):
    """``pool.maxpool2d_forward``: (y, argmax int32), argmax the flat in-plane index
    ih*W + iw of each window's first maximum in row-major order (finite x)."""
    h, w = x.shape[2:]
    oh, ow = out_size(h, k, stride, pad), out_size(w, k, stride, pad)
    stacked = np.stack([v for _, _, v in _windows(_pad(x, pad, -np.inf), k, k, stride,
                                                  oh, ow)])
    i, j = np.divmod(np.argmax(stacked, axis=0), k)
    rows = np.arange(oh)[:, None] * stride - pad + i
    cols = np.arange(ow)[None, :] * stride - pad + j
    return _out(stacked.max(axis=0), x), (rows * w + cols).astype(np.int32)


def maxpool2d_backward(grad_out, argmax, in_shape: tuple) -> np.ndarray:
    """``pool.maxpool2d_backward``: grad_out added into each window's argmax."""
    n, c, h, w = in_shape
    gx = np.zeros((n * c, h * w))
    planes = np.arange(n * c)[:, None]
    np.add.at(gx, (planes, argmax.reshape(n * c, -1)),
              grad_out.astype(F8).reshape(n * c, -1))
    return _out(gx.reshape(in_shape), grad_out)


# ---------------------------------------------------------------- BatchNorm


def _c(v) -> np.ndarray:
    """A per-channel vector (C,) as float64 (1, C, 1, 1)."""
    return np.asarray(v, dtype=F8)[None, :, None, None]


def _xhat(x, s, t) -> np.ndarray:
    """x*s[c] + t[c] rounded to float32, as the kernels recompute it, as float64."""
    return (x.astype(F8) * _c(s) + _c(t)).astype(np.float32).astype(F8)


def _relu_mask(x, fs, ft) -> np.ndarray:
    """x*fs[c] + ft[c] > 0 (the forward's ReLU input, recomputed), as float64."""
    return (_xhat(x, fs, ft) > 0).astype(F8)


def channel_mean_var(x):
    """``norm.channel_mean_var``: per-channel mean and biased variance, f8 (C,)."""
    x64 = x.astype(F8)
    return x64.mean(axis=(0, 2, 3)), x64.var(axis=(0, 2, 3))


def scale_shift(x, scale, shift) -> np.ndarray:
    """``norm.scale_shift``: y = x*scale[c] + shift[c]."""
    return _out(x.astype(F8) * _c(scale) + _c(shift), x)


def grad_sums(grad_out, x, s, t):
    """``norm.grad_sums``: per-channel f8 sum(g) and sum(g * xhat)."""
    g = grad_out.astype(F8)
    return g.sum(axis=(0, 2, 3)), (g * _xhat(x, s, t)).sum(axis=(0, 2, 3))


def bn_grad_input(grad_out, x, s, t, a, b, k) -> np.ndarray:
    """``norm.bn_grad_input``: a[c]*g - b[c] - k[c]*xhat."""
    return _out(_c(a) * grad_out.astype(F8) - _c(b) - _c(k) * _xhat(x, s, t), grad_out)


def bn_relu_forward(x, scale, shift, residual=None):
    """``norm.bn_relu_forward``: (y, mask), y = relu(x*scale[c] + shift[c] (+
    residual)) with NaN kept; mask = (v > 0) as (N*C, H*W) uint8 with a residual,
    else None."""
    v = x.astype(F8) * _c(scale) + _c(shift)
    if residual is not None:
        v = v + residual.astype(F8)
    y = _out(np.where(v <= 0, 0.0, v), x)
    if residual is None:
        return y, None
    n, c, h, w = x.shape
    return y, (v > 0).astype(np.uint8).reshape(n * c, h * w)


def bn_relu_grad_sums(grad_out, x, s, t, fs, ft):
    """``norm.bn_relu_grad_sums``: per-channel f8 sum(g') and sum(g' * xhat),
    g' = g * (x*fs[c] + ft[c] > 0)."""
    gm = grad_out.astype(F8) * _relu_mask(x, fs, ft)
    return gm.sum(axis=(0, 2, 3)), (gm * _xhat(x, s, t)).sum(axis=(0, 2, 3))


def bn_mask_grad_sums(grad_out, x, mask, s, t):
    """``norm.bn_mask_grad_sums``: per-channel f8 sum(g') and sum(g' * xhat),
    g' = g * mask (mask (N*C, H*W) as bn_relu_forward's)."""
    gm = grad_out.astype(F8) * mask.reshape(grad_out.shape)
    return gm.sum(axis=(0, 2, 3)), (gm * _xhat(x, s, t)).sum(axis=(0, 2, 3))


def bn_mask_grad_input(grad_out, x, mask, s, t, a, b, k):
    """``norm.bn_mask_grad_input``: (grad_in, g'), g' = g * mask and grad_in =
    a*g' - b - k*xhat."""
    gm = grad_out.astype(F8) * mask.reshape(grad_out.shape)
    grad_in = _c(a) * gm - _c(b) - _c(k) * _xhat(x, s, t)
    return _out(grad_in, grad_out), _out(gm, grad_out)


def bn_relu_grad_input(grad_out, x, s, t, fs, ft, a, b, k) -> np.ndarray:
    """``norm.bn_relu_grad_input``: a*g' - b - k*xhat, g' = g * (x*fs + ft > 0)."""
    gm = grad_out.astype(F8) * _relu_mask(x, fs, ft)
    return _out(_c(a) * gm - _c(b) - _c(k) * _xhat(x, s, t), grad_out)


# ---------------------------------------------------------------- CSR weights


def dense_of_csr(data, indices, indptr, shape: tuple) -> np.ndarray:
    """The dense (rows, cols) matrix of CSR arrays, in data's dtype."""
    m = np.zeros(shape, dtype=np.asarray(data).dtype)
    rows = np.repeat(np.arange(shape[0]), np.diff(indptr))
    m[rows, np.asarray(indices)[:len(rows)]] = np.asarray(data)[:len(rows)]
    return m


def _csr_weight(data, indices, indptr, kshape: tuple) -> np.ndarray:
    o = kshape[0]
    return dense_of_csr(data, indices, indptr, (o, int(np.prod(kshape[1:])))
                        ).reshape(kshape)


def csr_conv2d_forward(x, data, indices, indptr, kshape: tuple, stride: int,
                       pad: int, bias=None, relu: bool = False) -> np.ndarray:
    """``csr_conv.csr_conv2d_forward`` (and ``ConvForwardPlan.run`` with relu): the
    dense conv of the densified weight, + bias, then max(., 0) with NaN kept."""
    w = _csr_weight(data, indices, indptr, kshape).astype(F8)
    y = conv2d_forward(x.astype(F8), w, stride, pad) + (0.0 if bias is None
                                                         else _c(bias))
    return _out(np.where(y < 0, 0.0, y) if relu else y, x, data)


def csr_conv2d_grad_input(grad_out, data, indices, indptr, kshape: tuple,
                          in_shape: tuple, stride: int, pad: int) -> np.ndarray:
    """``csr_conv.csr_conv2d_grad_input``: the dense grad_input of the densified w."""
    w = _csr_weight(data, indices, indptr, kshape)
    return conv2d_grad_input(grad_out, w, in_shape, stride, pad)


def csr_conv2d_macs(indices, indptr, kshape: tuple, in_shape: tuple, stride: int,
                    pad: int, n_images: int) -> int:
    """``csr_conv.csr_conv2d_macs``: n_images x the (output pixel, nonzero) pairs
    whose input position lies inside the unpadded input."""
    _, _, kh, kw = kshape
    h, wd = in_shape[-2:]
    oh, ow = out_size(h, kh, stride, pad), out_size(wd, kw, stride, pad)
    a = np.arange(oh)[:, None] * stride - pad
    b = np.arange(ow)[None, :] * stride - pad
    total = 0
    for col in np.asarray(indices)[:int(indptr[-1])]:
        i, j = col // kw % kh, col % kw
        total += int(((a + i >= 0) & (a + i < h) & (b + j >= 0) & (b + j < wd)).sum())
    return int(n_images) * total


def csr_linear_forward(x, data, indices, indptr, out_features: int) -> np.ndarray:
    """``csr_linear.csr_linear_forward``: x @ w.T."""
    w = dense_of_csr(data, indices, indptr, (out_features, x.shape[1]))
    return _out(x.astype(F8) @ w.astype(F8).T, x, data)


def csr_linear_grad_input(grad_out, data, indices, indptr, in_features: int
                          ) -> np.ndarray:
    """``csr_linear.csr_linear_grad_input``: grad_out @ w."""
    w = dense_of_csr(data, indices, indptr, (grad_out.shape[1], in_features))
    return _out(grad_out.astype(F8) @ w.astype(F8), grad_out, data)


def weight_row_nnz(v) -> np.ndarray:
    """``csr_build.weight_row_nnz``: nonzeros (NaN included) per output row, int64."""
    return np.count_nonzero(v.reshape(v.shape[0], -1), axis=1).astype(np.int64)


def csr_of_weight(v, alpha: float = 1.0):
    """``csr_build.csr_of_weight``: (data f4, indices i4, indptr i8) of w =
    v|v|^(alpha-1) (the power in float64, rounded once)."""
    v2 = v.reshape(v.shape[0], -1)
    rows, cols = np.nonzero(v2)
    x = v2[rows, cols].astype(F8)
    indptr = np.concatenate([[0], np.cumsum(weight_row_nnz(v))]).astype(np.int64)
    data = (x * np.abs(x) ** (float(alpha) - 1.0)).astype(np.float32)
    return data, cols.astype(np.int32), indptr


# ---------------------------------------------------------------- kept activations


def topk_abs_threshold(x, k: int) -> float:
    """``topk.topk_abs_threshold``: the k-th largest |x| (NaN above inf)."""
    return float(np.sort(np.abs(x.astype(F8)).ravel())[-k])


def compress(x, threshold: float, limit: int = -1):
    """The kept set (int32 flat indices, values) of ``topk.compress_counts`` +
    ``compress_to_indices`` / ``compress_to_bitmap``: every element with not (|x| <=
    threshold), NaN included, then the ties |x| == threshold > 0 in C order, at
    most ``limit`` kept in all (limit < 0: every tie). With limit < 0 it is also
    ``topk.compress_one_pass``'s set (|x| >= threshold, x != 0, or NaN)."""
    flat = x.ravel()
    a = np.abs(flat.astype(F8))
    t = float(np.asarray(threshold, dtype=flat.dtype))  # the kernels compare in x's
    above = ~(a <= t)
    ties = np.flatnonzero((a == t) & (a > 0))
    if limit >= 0:
        ties = ties[:max(0, limit - int(above.sum()))]
    kept = above.copy()
    kept[ties] = True
    idx = np.flatnonzero(kept).astype(np.int32)
    return idx, flat[idx]


def to_bitmap(indices, size: int) -> np.ndarray:
    """The packbits bitmap of ``topk.compress_to_bitmap`` for kept ``indices``."""
    bits = np.zeros(size, dtype=np.uint8)
    bits[indices] = 1
    return np.packbits(bits)


def bitmap_to_indices(bitmap, kept: int) -> np.ndarray:
    """``topk.bitmap_to_indices``: the set bits' positions, int32 (kept,)."""
    idx = np.flatnonzero(np.unpackbits(bitmap)).astype(np.int32)
    assert idx.size == kept
    return idx


def dense_of_kept(indices, values, shape: tuple) -> np.ndarray:
    """x with ``values`` at the flat positions ``indices`` and zeros elsewhere."""
    x = np.zeros(int(np.prod(shape)), dtype=np.asarray(values).dtype)
    x[indices] = values
    return x.reshape(shape)


def conv2d_grad_weight_sparse(indices, values, x_shape: tuple, grad_out,
                              kshape: tuple, stride: int, pad: int) -> np.ndarray:
    """``sparse_grad.conv2d_grad_weight_sparse``: the dense grad_weight of the
    kept elements laid back on zeros."""
    x = dense_of_kept(indices, values, x_shape)
    return conv2d_grad_weight(x, grad_out, kshape, stride, pad)


def conv2d_grad_weight_sparse_macs(indices, x_shape: tuple, out_shape: tuple,
                                   kshape: tuple, stride: int, pad: int) -> int:
    """``sparse_grad.conv2d_grad_weight_sparse_macs``: O x the (kept element, tap)
    pairs whose output position lies inside grad_out."""
    _, _, h, w = x_shape
    o, _, kh, kw = kshape
    oh, ow = out_shape[2:]
    idx = np.asarray(indices, dtype=np.int64)
    y, x = idx // w % h, idx % w
    count = 0
    for i in range(kh):
        r = y + pad - i
        ok_r = (r % stride == 0) & (r >= 0) & (r // stride < oh)
        for j in range(kw):
            q = x + pad - j
            ok = ok_r & (q % stride == 0) & (q >= 0) & (q // stride < ow)
            count += int(ok.sum())
    return o * count


def linear_grad_weight_sparse(indices, values, x_shape: tuple, grad_out
                              ) -> np.ndarray:
    """``sparse_grad.linear_grad_weight_sparse``: grad_out.T @ x_masked."""
    x = dense_of_kept(indices, values, x_shape)
    return _out(grad_out.astype(F8).T @ x.astype(F8), values, grad_out)


# ---------------------------------------------------------------- fixed pattern


def pattern_values(v, flat, alpha: float):
    """``sddmm.pattern_values``: (w, dw/dv) at v's flat positions, w = v|v|^p and
    dw/dv = alpha|v|^p, p = alpha - 1."""
    x = v.ravel()[flat].astype(F8)
    m = np.abs(x) ** (float(alpha) - 1.0)
    return _out(x * m, v), _out(alpha * m, v)


def conv_grad_pattern_dense(x, grad_out, indptr, indices, kshape: tuple, stride: int,
                            pad: int):
    """``sddmm.conv_grad_pattern_dense``: (the dense grad_weight at the pattern's
    entries, the MACs: N x the valid taps of every entry)."""
    gw = conv2d_grad_weight(x, grad_out, kshape, stride, pad).reshape(kshape[0], -1)
    rows = np.repeat(np.arange(kshape[0]), np.diff(indptr))
    macs = csr_conv2d_macs(indices, indptr, kshape, x.shape, stride, pad, x.shape[0])
    return gw[rows, np.asarray(indices)[:len(rows)]], macs


def conv_grad_pattern_kept(kept, values, x_shape: tuple, grad_out, indptr, indices,
                           kshape: tuple, stride: int, pad: int):
    """``sddmm.conv_grad_pattern_kept``: (grad_weight at the pattern's entries from
    the kept elements, the MACs: the (kept element of channel c, entry (o, c, i,
    j)) pairs whose output position lies inside grad_out)."""
    _, _, kh, kw = kshape
    oh, ow = grad_out.shape[2:]
    gw, _ = conv_grad_pattern_dense(dense_of_kept(kept, values, x_shape), grad_out,
                                    indptr, indices, kshape, stride, pad)
    _, chan, y, x = np.unravel_index(np.asarray(kept, dtype=np.int64), x_shape)
    macs = 0
    for col in np.asarray(indices)[:int(indptr[-1])]:
        c, i, j = col // (kh * kw), col // kw % kh, col % kw
        r, q = y + pad - i, x + pad - j
        macs += int(((chan == c) & (r >= 0) & (q >= 0) & (r % stride == 0)
                     & (q % stride == 0) & (r // stride < oh) & (q // stride < ow)
                     ).sum())
    return gw, macs
