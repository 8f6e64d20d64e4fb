"""Weight gradients at a fixed sparse pattern only (sampled dense-dense products).

With Powerprop (alpha > 1) a weight that is exactly zero gets exactly zero
gradient, so during local training a layer needs dL/dw only at its nonzeros.
These kernels compute it there, for a pattern given as CSR arrays (SciPy names,
``indptr`` i8, ``indices`` i4; a conv weight (O, C, kh, kw) is the O x (C*kh*kw)
matrix with column ``c*kh*kw + i*kw + j``, as csr_gather.py):

    gw[e] = sum over n, oh, ow of g[n, o, oh, ow] * x[n, c, oh*s - p + i, ow*s - p + j]

for every entry e = (o, c, i, j), over the valid taps only.

* ``conv_grad_pattern_dense``: from a dense input x (N, C, H, W); parallel over
  output channels (rows of the pattern), each entry one reduction over
  N x (valid rows) x (valid columns): nnz * N * OH * OW multiply-adds at most.
* ``conv_grad_pattern_kept``: from the kept (SWAT-compressed) input, flat C-order
  int32 indices + values; an entry (o, c, i, j) meets only the kept elements of
  input channel c (regrouped by channel per call, a radix sort), so the work is
  kept * (entries per channel): the product of the two densities times the dense
  work. Parallel over output channels, one accumulator per entry: no atomics.
* ``pattern_values``: w = v|v|^(alpha-1) and dw/dv = alpha |v|^(alpha-1) at the
  pattern's flat positions, O(nnz), bit for bit what powerprop.effective_weight
  gives (two square roots for alpha 1.25).

Every kernel returns the multiply-adds it executed (what cost.macs_grad_weight
records). Contract: arrays C-contiguous, float32 values.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ..errors import ShapeError
from .config import FASTMATH, JIT, JIT_PARALLEL_FASTMATH, kernel
from .geometry import out_size

JIT_FASTMATH = {**JIT, "fastmath": FASTMATH}


@kernel("void(f4[::1], i8[::1], i8, f4, f4, f4[::1], f4[::1])", **JIT)
def _pattern_values(v, flat, mode, p, alpha, data, dw_dv):  # pragma: no cover - compiled
    # mode 1: p = 0.25 (two square roots, as powerprop.abs_pow), 2: p = 0.5, 3: general
    for e in range(flat.size):
        x = v[flat[e]]
        a = abs(x)
        if mode == 1:
            m = np.sqrt(np.sqrt(a))
        elif mode == 2:
            m = np.sqrt(a)
        else:
            m = a ** p
        data[e] = x * m
        dw_dv[e] = m * alpha


def pattern_values(v: np.ndarray, flat: np.ndarray, alpha: float):
    """(w, dw/dv) (nnz,) f4 each at the flat positions ``flat`` (nnz,) i8 of v.

    v: a C-contiguous float32 weight of any shape; alpha > 1 (alpha = 1 needs no
    pattern: dw/dv = 1 and w = v). Wraps ``_pattern_values``.
    """
    p = float(alpha) - 1.0
    if p <= 0.0:
        raise ShapeError(f"pattern_values: expected alpha > 1, got {alpha}")
    mode = 1 if p == 0.25 else 2 if p == 0.5 else 3
    data = np.empty(flat.size, dtype=np.float32)
    dw_dv = np.empty(flat.size, dtype=np.float32)
    _pattern_values(v.reshape(-1), flat, mode, np.float32(p), np.float32(alpha),
                    data, dw_dv)
    return data, dw_dv


@nb.njit(inline="always")
def _valid_range(k, s, pad, size, n_out):  # pragma: no cover - compiled
    # output positions a in [a0, a1) with 0 <= a*s - pad + k < size
    a0 = max(0, -((k - pad) // s))
    a1 = min(n_out, (size - 1 + pad - k) // s + 1)
    return a0, max(a0, a1)


@kernel("i8(f4[:, :, :, ::1], f4[:, :, :, ::1], i8[::1], i4[::1], i8, i8, i8, i8,"
         " f4[::1])", **JIT_PARALLEL_FASTMATH)
def _conv_grad_dense(x, g, indptr, indices, kh, kw, s, pad,
                     out):  # pragma: no cover - compiled
    n_img, _, h, w = x.shape
    n_out, oh_n, ow_n = g.shape[1], g.shape[2], g.shape[3]
    macs = np.zeros(n_out, dtype=np.int64)
    for o in nb.prange(n_out):
        count = 0
        for e in range(indptr[o], indptr[o + 1]):
            col = np.int64(indices[e])
            c = col // (kh * kw)
            i = (col // kw) % kh
            j = col % kw
            a0, a1 = _valid_range(i, s, pad, h, oh_n)
            b0, b1 = _valid_range(j, s, pad, w, ow_n)
            acc = np.float32(0.0)
            for n in range(n_img):
                for a in range(a0, a1):
                    g_row = g[n, o, a]
                    x_row = x[n, c, a * s - pad + i]
                    if s == 1:  # two unit-stride slices: a vectorised dot product
                        gs = g_row[b0:b1]
                        xs = x_row[b0 + j - pad:b1 + j - pad]
                        for t in range(gs.size):
                            acc += gs[t] * xs[t]
                    else:
                        for b in range(b0, b1):
                            acc += g_row[b] * x_row[b * s - pad + j]
            out[e] = acc
            count += n_img * (a1 - a0) * (b1 - b0)
        macs[o] = count
    return macs.sum()


def conv_grad_pattern_dense(x: np.ndarray, grad_out: np.ndarray, indptr: np.ndarray,
                            indices: np.ndarray, kshape: tuple, stride: int,
                            pad: int):
    """dL/dw (nnz,) f4 at the pattern from the dense input, and the MACs executed.

    x: (N, C, H, W) f4; grad_out: (N, O, OH, OW) f4; indptr (O+1,) i8, indices
    (nnz,) i4: the pattern; kshape (O, C, kh, kw). Wraps ``_conv_grad_dense``.
    """
    o, c, kh, kw = kshape
    n, _, h, w = x.shape
    oh, ow = out_size(h, kh, stride, pad), out_size(w, kw, stride, pad)
    if x.shape[1] != c or grad_out.shape != (n, o, oh, ow):
        raise ShapeError(f"conv_grad_pattern_dense: expected x (N, {c}, H, W) and "
                         f"grad_out {(n, o, oh, ow)}, got {x.shape} and "
                         f"{grad_out.shape}")
    out = np.empty(indices.size, dtype=np.float32)
    macs = _conv_grad_dense(np.require(x, np.float32, ["C", "W"]),
                            np.require(grad_out, np.float32, ["C", "W"]), indptr,
                            indices, kh, kw, stride, pad, out)
    return out, int(macs)


@nb.njit(inline="always")
def _kept_row(o, kn, ky, kx, kv, cptr, g, indptr, indices, kh, kw, s,
              pad, out):  # pragma: no cover - compiled
    # the entries of output channel o; returns the multiply-adds done
    oh_n, ow_n = g.shape[2], g.shape[3]
    count = 0
    for e in range(indptr[o], indptr[o + 1]):
        col = np.int64(indices[e])
        c = col // (kh * kw)
        dy = pad - (col // kw) % kh
        dx = pad - col % kw
        acc = np.float32(0.0)
        if s == 1:
            for q in range(cptr[c], cptr[c + 1]):
                yy = ky[q] + dy
                xx = kx[q] + dx
                if 0 <= yy < oh_n and 0 <= xx < ow_n:
                    acc += kv[q] * g[kn[q], o, yy, xx]
                    count += 1
        else:
            for q in range(cptr[c], cptr[c + 1]):
                yy = ky[q] + dy
                xx = kx[q] + dx
                if yy < 0 or xx < 0 or yy % s != 0 or xx % s != 0:
                    continue
                yy //= s
                xx //= s
                if yy < oh_n and xx < ow_n:
                    acc += kv[q] * g[kn[q], o, yy, xx]
                    count += 1
        out[e] = acc
    return count


_KEPT_SIG = ("i8(i4[::1], i4[::1], i4[::1], f4[::1], i8[::1], f4[:, :, :, ::1], i8[::1],"
             " i4[::1], i8, i8, i8, i8, f4[::1])")


@kernel(_KEPT_SIG, **JIT_PARALLEL_FASTMATH)
def _conv_grad_kept(kn, ky, kx, kv, cptr, g, indptr, indices, kh, kw, s, pad,
                    out):  # pragma: no cover - compiled
    # the kept elements regrouped by channel: those of channel c at [cptr[c],
    # cptr[c+1]) with their image, row, column and value (decoded once, outside:
    # an integer division costs more than the multiply-add)
    n_out = g.shape[1]
    macs = np.zeros(n_out, dtype=np.int64)
    for o in nb.prange(n_out):
        macs[o] = _kept_row(o, kn, ky, kx, kv, cptr, g, indptr, indices, kh, kw, s,
                            pad, out)
    return macs.sum()


@kernel(_KEPT_SIG, **JIT_FASTMATH)
def _conv_grad_kept_serial(kn, ky, kx, kv, cptr, g, indptr, indices, kh, kw, s, pad,
                           out):  # pragma: no cover - compiled
    # the same, on the calling thread: for little work a parallel launch costs more
    # (and waits for a descheduled thread when the machine is busy)
    total = 0
    for o in range(g.shape[1]):
        total += _kept_row(o, kn, ky, kx, kv, cptr, g, indptr, indices, kh, kw, s,
                           pad, out)
    return total


#: below this many (kept element, entry) pairs the serial kernel runs
SERIAL_PAIRS = 100_000


def conv_grad_pattern_kept(kept: np.ndarray, values: np.ndarray, x_shape: tuple,
                           grad_out: np.ndarray, indptr: np.ndarray,
                           indices: np.ndarray, kshape: tuple, stride: int, pad: int):
    """dL/dw (nnz,) f4 at the pattern from the kept input elements, and the MACs.

    kept (K,) i4 / values (K,) f4: the kept elements of x (``x_shape`` (N, C, H, W))
    in increasing flat C order; grad_out (N, O, OH, OW) f4; indptr (O+1,) i8 and
    indices (nnz,) i4: the pattern; kshape (O, C, kh, kw). Each entry (o, c, i, j)
    runs over the kept elements of channel c. Parallel over output channels.
    Wraps ``_conv_grad_kept``.
    """
    n, c, h, w = x_shape
    o, _, kh, kw = kshape
    oh, ow = out_size(h, kh, stride, pad), out_size(w, kw, stride, pad)
    if grad_out.shape != (n, o, oh, ow):
        raise ShapeError(f"conv_grad_pattern_kept: expected grad_out of shape "
                         f"{(n, o, oh, ow)}, got {grad_out.shape}")
    n_img, rest = np.divmod(kept, np.int32(c * h * w))
    chan, rest = np.divmod(rest, np.int32(h * w))
    ky, kx = np.divmod(rest, np.int32(w))
    # stable, so (n, y, x) order stays inside a channel; int16 keys: a radix sort
    order = np.argsort(chan.astype(np.int16 if c < 2**15 else np.int32), kind="stable")
    cptr = np.zeros(c + 1, dtype=np.int64)
    np.cumsum(np.bincount(chan, minlength=c), out=cptr[1:])
    out = np.empty(indices.size, dtype=np.float32)
    pairs = kept.size * indices.size // max(c, 1)
    kernel = _conv_grad_kept_serial if pairs < SERIAL_PAIRS else _conv_grad_kept
    macs = kernel(np.ascontiguousarray(n_img[order], dtype=np.int32),
                  np.ascontiguousarray(ky[order], dtype=np.int32),
                  np.ascontiguousarray(kx[order], dtype=np.int32),
                  np.ascontiguousarray(values[order]), cptr,
                  np.require(grad_out, np.float32, ["C", "W"]), indptr, indices, kh,
                  kw, stride, pad, out)
    return out, int(macs)
