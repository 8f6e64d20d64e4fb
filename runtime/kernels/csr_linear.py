"""Linear layers with CSR weights: forward and grad_input.

The gather kernel of ``csr_gather.py`` with images of one pixel: forward reads the
rows of x.T (groups = rows of w), grad_input the rows of grad_out.T (groups =
columns of w, regrouped by ``csr_transpose.py``). At the sizes of the models here
the dense matmul wins at every density (``density.prefer_csr``): these run when a
layer is forced to CSR.
"""

from __future__ import annotations

import numpy as np

from ..arrays import as_f32, check_ndim
from . import csr_transpose
from .conv_planes import VL
from .csr_gather import NO_BIAS, chunk, csr_args, each, gather_taps


def _rows_padded(a: np.ndarray) -> np.ndarray:
    """a.T (K, N) with VL zero floats after every row (the vector loops overrun)."""
    out = np.zeros((a.shape[1], a.shape[0] + VL), dtype=np.float32)
    out[:, :a.shape[0]] = a.T
    return out


_ONE_PIXEL = np.array([[0, 1, 0, 1, 0, 0]], dtype=np.int64)


def csr_linear_forward(x: np.ndarray, data, indices, indptr,
                       out_features: int) -> np.ndarray:
    """y = x @ w.T (N, O) f4 with w (O, I) in CSR; wraps ``gather_taps``.

    x : (N, I) float32; data, indices, indptr : CSR of w (f4, i4, i8).
    """
    what = "csr_linear_forward"
    x = as_f32(x, f"{what}: x")
    check_ndim(x, 2, what, "(N, in_features)")
    n, k = x.shape
    o = int(out_features)
    data, indices, indptr = csr_args(data, indices, indptr, (o, k), what)
    if data.shape[0] == 0 or n == 0:
        return np.zeros((n, o), dtype=np.float32)
    y = np.empty((n, o, 1, 1), dtype=np.float32)
    gather_taps(_rows_padded(x), indptr, indices, np.arange(k, dtype=np.int64),
                np.zeros(k, dtype=np.int64), data, 1, 1, chunk(n, 1), 1, _ONE_PIXEL,
                NO_BIAS, False, y)
    return y.reshape(n, o)


def csr_linear_grad_input(grad_out: np.ndarray, data, indices, indptr,
                          in_features: int) -> np.ndarray:
    """dL/dx = grad_out @ w (N, I) f4 with w (O, I) in CSR.

    Wraps ``csr_transpose.transposed`` (CSR -> CSC) and ``gather_taps``.
    grad_out : (N, O) float32; data, indices, indptr : CSR of w (f4, i4, i8).
    """
    what = "csr_linear_grad_input"
    g = as_f32(grad_out, f"{what}: grad_out")
    check_ndim(g, 2, what, "(N, out_features)")
    n, o = g.shape
    k = int(in_features)
    data, indices, indptr = csr_args(data, indices, indptr, (o, k), what)
    if data.shape[0] == 0 or n == 0:
        return np.zeros((n, k), dtype=np.float32)
    gptr, grow, goff, gval = csr_transpose.transposed(data, indices, indptr,
                                                      np.arange(k), np.zeros(k), k)
    grad_x = np.empty((n, k, 1, 1), dtype=np.float32)
    gather_taps(_rows_padded(g), gptr, each(gval), grow, goff, gval, 1, 1,
                chunk(n, 1), 1, _ONE_PIXEL, NO_BIAS, False, grad_x)
    return grad_x.reshape(n, k)
