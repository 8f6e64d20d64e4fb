"""Weight gradients from the kept (sparse) activations of the layer input (SWAT).

The "sparse" side is the layer input x, as ``topk.py`` compresses it (int32 flat
C-order indices, float32 values); grad_out is dense.

* conv: dW[o, c, i, j] = sum over kept x[n, c, h, w] of x * g[n, o, oh, ow] with
  h = oh*s - pad + i, w = ow*s - pad + j. Each kept element scatters into the taps
  it touches, so the work is (kept taps) * O multiply-adds, independent of N*C*H*W.
  Two loop orders: for many kept elements grad_out is first transposed to
  (N, OH, OW, O) so every tap is one contiguous O-long multiply-add into a
  (C, kh, kw, O) buffer (vectorised); for few kept elements the transpose (a pass
  over all of grad_out) would cost more than the taps, so they read grad_out in
  place, one (o, tap) at a time. The kept list is split into one contiguous part
  per thread, each with its own partial dW (summed at the end): no atomics.
* linear: dW[o, i] = sum over kept x[n, i] of x * g[n, o]; the same scheme with
  an (I, O) buffer (rows of g are already contiguous).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ..errors import DTypeError, ShapeError
from .config import JIT, JIT_PARALLEL, JIT_PARALLEL_FASTMATH, kernel
from .geometry import out_size


@nb.njit(inline="always")
def _tap_range(pos, pad, k, n_out, s):  # pragma: no cover - compiled
    # taps i in [lo, hi) step s with 0 <= (pos + pad - i) / s < n_out, an integer
    yy = pos + pad
    first = max(0, yy - (n_out - 1) * s)
    lo = first + (yy - first) % s
    hi = min(k - 1, yy) + 1
    return lo, max(lo, hi)


_CONV_SIG = ("i8(i4[::1], f4[::1], i8, i8, i8, f4[:, :, :, ::1], i8, i8, i8, i8,"
             " f4[:, :, :, :, ::1])")


@kernel(_CONV_SIG, **JIT_PARALLEL_FASTMATH)
def _conv_gw_nhwc(indices, values, n_ch, h, w, gt, kh, kw, s, pad,
                  part):  # pragma: no cover - compiled
    # gt: grad_out as (N, OH, OW, O); part[p]: (C, kh, kw, O) partial dW of the
    # p-th slice of the kept list. Returns the number of taps (MACs / O).
    n_kept = indices.size
    n_part = part.shape[0]
    oh_n, ow_n, n_out = gt.shape[1], gt.shape[2], gt.shape[3]
    taps = np.zeros(n_part, dtype=np.int64)
    for p in nb.prange(n_part):
        acc = part[p]
        acc[:] = 0.0
        count = 0
        e = p * n_kept // n_part
        e_hi = (p + 1) * n_kept // n_part
        while e < e_hi:
            # one row (n, c, y) of x at a time: divisions once per row, not element
            r = np.int64(indices[e]) // w
            n = r // (n_ch * h)
            c = (r // h) % n_ch
            y = r % h
            base = r * w
            i0, i1 = _tap_range(y, pad, kh, oh_n, s)
            while e < e_hi and indices[e] < base + w:
                x = indices[e] - base
                v = values[e]
                e += 1
                j0, j1 = _tap_range(x, pad, kw, ow_n, s)
                for i in range(i0, i1, s):
                    g_row = gt[n, (y + pad - i) // s]
                    a_row = acc[c, i]
                    for j in range(j0, j1, s):
                        g = g_row[(x + pad - j) // s]
                        a = a_row[j]
                        for o in range(n_out):
                            a[o] += v * g[o]
                        count += 1
        taps[p] = count
    return taps.sum()


@kernel(_CONV_SIG, **JIT_PARALLEL_FASTMATH)
def _conv_gw_nchw(indices, values, n_ch, h, w, g, kh, kw, s, pad,
                  part):  # pragma: no cover - compiled
    # g: grad_out as given (N, O, OH, OW); part[p]: (O, C, kh, kw). For few kept
    # elements: no transpose of grad_out, each (o, tap) is one scalar multiply-add.
    n_kept = indices.size
    n_part = part.shape[0]
    n_out, oh_n, ow_n = g.shape[1], g.shape[2], g.shape[3]
    taps = np.zeros(n_part, dtype=np.int64)
    for p in nb.prange(n_part):
        acc = part[p]
        acc[:] = 0.0
        count = 0
        e = p * n_kept // n_part
        e_hi = (p + 1) * n_kept // n_part
        while e < e_hi:
            r = np.int64(indices[e]) // w
            n = r // (n_ch * h)
            c = (r // h) % n_ch
            y = r % h
            base = r * w
            i0, i1 = _tap_range(y, pad, kh, oh_n, s)
            n_i = (i1 - i0 + s - 1) // s
            while e < e_hi and indices[e] < base + w:
                x = indices[e] - base
                v = values[e]
                e += 1
                j0, j1 = _tap_range(x, pad, kw, ow_n, s)
                count += n_i * ((j1 - j0 + s - 1) // s)
                for o in range(n_out):
                    g_img = g[n, o]
                    a_k = acc[o, c]
                    for i in range(i0, i1, s):
                        g_row = g_img[(y + pad - i) // s]
                        for j in range(j0, j1, s):
                            a_k[i, j] += v * g_row[(x + pad - j) // s]
        taps[p] = count
    return taps.sum()


@kernel("i8(i4[::1], i8, i8, i8, i8, i8, i8, i8)", **JIT)
def _conv_taps_count(indices, n_ch, h, w, kh, kw, s, pad):  # pragma: no cover - compiled
    # number of (kept element, tap) pairs that land inside grad_out
    oh_n = (h + 2 * pad - kh) // s + 1
    ow_n = (w + 2 * pad - kw) // s + 1
    count = 0
    e = 0
    while e < indices.size:
        r = np.int64(indices[e]) // w  # one row of x at a time, as in _conv_gw_*
        base = r * w
        i0, i1 = _tap_range(r % h, pad, kh, oh_n, s)
        n_i = (i1 - i0 + s - 1) // s
        while e < indices.size and indices[e] < base + w:
            j0, j1 = _tap_range(indices[e] - base, pad, kw, ow_n, s)
            count += n_i * ((j1 - j0 + s - 1) // s)
            e += 1
    return count


@kernel("void(f4[:, :, :, ::1], f4[:, :, :, ::1])", **JIT_PARALLEL)
def _to_nhwc(g, out):  # pragma: no cover - compiled
    n_img, n_out, oh_n, ow_n = g.shape
    for idx in nb.prange(n_img * oh_n):
        n = idx // oh_n
        a = idx % oh_n
        for b in range(ow_n):
            row = out[n, a, b]
            for o in range(n_out):
                row[o] = g[n, o, a, b]


@kernel("void(i4[::1], f4[::1], i8, f4[:, ::1], f4[:, :, ::1])",
         **JIT_PARALLEL_FASTMATH)
def _linear_gw(indices, values, n_in, g, part):  # pragma: no cover - compiled
    # part[p]: (I, O) partial dW^T of the p-th slice of the kept list
    n_kept = indices.size
    n_part = part.shape[0]
    n_out = g.shape[1]
    for p in nb.prange(n_part):
        acc = part[p]
        acc[:] = 0.0
        for e in range(p * n_kept // n_part, (p + 1) * n_kept // n_part):
            f = np.int64(indices[e])
            v = values[e]
            a = acc[f % n_in]
            g_row = g[f // n_in]
            for o in range(n_out):
                a[o] += v * g_row[o]


# In-place loop order (no transpose) while kept taps * 8 < N*OH*OW. Measured
# single-threaded, batch 32 (ms, in place / transposed, at taps / (N*OH*OW)):
# 16@32 k3: 0.24/0.30 at 0.14, 0.64/0.40 at 0.41; 64@8 k3: 0.17/0.10 at 0.50;
# 16@32 k1 s2: 0.05/0.12 at 0.02, 0.12/0.14 at 0.05, 0.36/0.24 at 0.16.
_NCHW_FACTOR = 8


def _num_parts(n_kept: int) -> int:
    # one slice of the kept list per thread; one slice when too few to share
    return max(1, min(nb.get_num_threads(), n_kept // 2048))


def _check_sparse(indices, values, size: int, what: str) -> None:
    if indices.dtype != np.int32 or values.dtype != np.float32:
        raise DTypeError(f"{what}: expected int32 indices and float32 values, got "
                         f"{indices.dtype} and {values.dtype}; use .astype")
    if indices.ndim != 1 or indices.shape != values.shape:
        raise ShapeError(f"{what}: expected indices and values of one shape (K,), "
                         f"got {indices.shape} and {values.shape}")
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= size):
        raise ShapeError(f"{what}: expected indices in [0, {size}), got "
                         f"[{int(indices.min())}, {int(indices.max())}]")


def conv2d_grad_weight_sparse_macs(indices: np.ndarray, x_shape: tuple,
                                   out_shape: tuple, kshape: tuple, stride: int,
                                   pad: int) -> int:
    """Multiply-adds that :func:`conv2d_grad_weight_sparse` performs (exactly).

    One per (kept element, tap inside grad_out, output channel); ``out_shape`` is
    grad_out's (N, O, OH, OW), checked against the others. The dense
    ``conv.conv2d_grad_weight`` does N*O*OH*OW*C*kh*kw.
    """
    n, c, h, w = x_shape
    o, _, kh, kw = kshape
    oh, ow = out_size(h, kh, stride, pad), out_size(w, kw, stride, pad)
    if tuple(out_shape) != (n, o, oh, ow):
        raise ShapeError(f"conv2d_grad_weight_sparse_macs: expected out_shape "
                         f"{(n, o, oh, ow)}, got {tuple(out_shape)}")
    idx = np.ascontiguousarray(indices, dtype=np.int32)
    return o * int(_conv_taps_count(idx, c, h, w, kh, kw, stride, pad))


def conv2d_grad_weight_sparse_count(indices: np.ndarray, values: np.ndarray,
                                    x_shape: tuple, grad_out: np.ndarray,
                                    kshape: tuple, stride: int, pad: int):
    """:func:`conv2d_grad_weight_sparse` and the multiply-adds it executed."""
    n, c, h, w = x_shape
    o, c_w, kh, kw = kshape
    what = "conv2d_grad_weight_sparse"
    _check_sparse(indices, values, n * c * h * w, what)
    oh, ow = out_size(h, kh, stride, pad), out_size(w, kw, stride, pad)
    if c_w != c or grad_out.shape != (n, o, oh, ow):
        raise ShapeError(f"{what}: expected kshape (O, {c}, kh, kw) and grad_out of "
                         f"shape {(n, o, oh, ow)}, got {tuple(kshape)} and "
                         f"{tuple(grad_out.shape)}")
    g = np.ascontiguousarray(grad_out, dtype=np.float32)
    n_part = _num_parts(indices.size)
    # kept taps, estimated from the kept count (boundary taps are rarer)
    est_taps = indices.size * -(-kh // stride) * -(-kw // stride)
    if est_taps * _NCHW_FACTOR < n * oh * ow:
        part = np.empty((n_part, o, c, kh, kw), dtype=np.float32)
        taps = _conv_gw_nchw(indices, values, c, h, w, g, kh, kw, stride, pad, part)
        grad_w = part[0] if n_part == 1 else part.sum(axis=0)
        return grad_w, int(taps) * o
    gt = np.empty((n, oh, ow, o), dtype=np.float32)
    _to_nhwc(g, gt)
    part = np.empty((n_part, c, kh, kw, o), dtype=np.float32)
    taps = _conv_gw_nhwc(indices, values, c, h, w, gt, kh, kw, stride, pad, part)
    grad_w = part[0] if n_part == 1 else part.sum(axis=0)
    return np.ascontiguousarray(grad_w.transpose(3, 0, 1, 2)), int(taps) * o


def conv2d_grad_weight_sparse(indices: np.ndarray, values: np.ndarray,
                              x_shape: tuple, grad_out: np.ndarray, kshape: tuple,
                              stride: int, pad: int) -> np.ndarray:
    """dL/dw (O, C, kh, kw) f4 from the kept elements of the layer input.

    Equals ``conv.conv2d_grad_weight(x_masked, grad_out, kshape, stride, pad)``
    where x_masked (N, C, H, W) = ``x_shape`` holds ``values`` (K,) f4 at the flat
    C-order positions ``indices`` (K,) i4 and zeros elsewhere. grad_out:
    (N, O, OH, OW) f4. Work: :func:`conv2d_grad_weight_sparse_macs` multiply-adds
    plus, when many elements are kept, one transpose of grad_out. Wraps
    ``_conv_gw_nhwc`` / ``_conv_gw_nchw`` (see the module docstring).
    """
    return conv2d_grad_weight_sparse_count(indices, values, x_shape, grad_out,
                                           kshape, stride, pad)[0]


def linear_grad_weight_sparse(indices: np.ndarray, values: np.ndarray,
                              x_shape: tuple, grad_out: np.ndarray) -> np.ndarray:
    """dL/dw (O, I) f4 = grad_out.T @ x_masked, x_masked (N, I) as in the conv case.

    grad_out: (N, O) f4. Work: K*O multiply-adds
    (:func:`linear_grad_weight_sparse_macs`). Wraps ``_linear_gw``.
    """
    n, n_in = x_shape
    what = "linear_grad_weight_sparse"
    _check_sparse(indices, values, n * n_in, what)
    if grad_out.ndim != 2 or grad_out.shape[0] != n:
        raise ShapeError(f"{what}: expected grad_out of shape ({n}, O), got "
                         f"{tuple(grad_out.shape)}")
    g = np.ascontiguousarray(grad_out, dtype=np.float32)
    n_part = _num_parts(indices.size)
    part = np.empty((n_part, n_in, g.shape[1]), dtype=np.float32)
    _linear_gw(indices, values, n_in, g, part)
    grad_w = part[0] if n_part == 1 else part.sum(axis=0)
    return np.ascontiguousarray(grad_w.T)


def linear_grad_weight_sparse_macs(indices: np.ndarray, out_features: int) -> int:
    """Multiply-adds of :func:`linear_grad_weight_sparse`: K * O."""
    return int(indices.size) * int(out_features)
