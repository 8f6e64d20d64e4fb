"""Batch-normalisation kernels over NCHW: per-channel statistics in one pass each.

NumPy's reductions over axes (0, 2, 3) walk memory with strides; these loops read
each (n, c) plane contiguously, in parallel over channels (reductions) or over
(n, c) planes (elementwise). Sums are accumulated in float64 so that the
statistics of large batches stay exact to float32 precision.
"""

import numba as nb
import numpy as np
from numba import prange

from .config import JIT_PARALLEL_FASTMATH as JIT


@nb.njit("void(f4[:, :, :, ::1], f8[::1], f8[::1])", **JIT)
def _channel_mean_var(x, mean, var):  # pragma: no cover - compiled
    n_img, n_ch, h, w = x.shape
    count = n_img * h * w
    for c in prange(n_ch):
        s = 0.0
        for n in range(n_img):
            plane = x[n, c]
            for i in range(h):
                for j in range(w):
                    s += plane[i, j]
        m = s / count
        ss = 0.0
        for n in range(n_img):
            plane = x[n, c]
            for i in range(h):
                for j in range(w):
                    d = plane[i, j] - m
                    ss += d * d
        mean[c] = m
        var[c] = ss / count


@nb.njit("void(f4[:, :, :, ::1], f4[::1], f4[::1], f4[:, :, :, ::1])", **JIT)
def _scale_shift(x, scale, shift, y):  # pragma: no cover - compiled
    n_img, n_ch, h, w = x.shape
    for nc in prange(n_img * n_ch):
        n = nc // n_ch
        c = nc % n_ch
        a = scale[c]
        b = shift[c]
        for i in range(h):
            for j in range(w):
                y[n, c, i, j] = x[n, c, i, j] * a + b


@nb.njit("void(f4[:, :, :, ::1], f4[:, :, :, ::1], f8[::1], f8[::1])", **JIT)
def _grad_sums(grad_out, xhat, sum_g, sum_gx):  # pragma: no cover - compiled
    n_img, n_ch, h, w = grad_out.shape
    for c in prange(n_ch):
        s = 0.0
        sx = 0.0
        for n in range(n_img):
            for i in range(h):
                for j in range(w):
                    g = grad_out[n, c, i, j]
                    s += g
                    sx += g * xhat[n, c, i, j]
        sum_g[c] = s
        sum_gx[c] = sx


@nb.njit("void(f4[:, :, :, ::1], f4[:, :, :, ::1], f4[::1], f4[::1], f4[::1],"
         " f4[:, :, :, ::1])", **JIT)
def _bn_grad_input(grad_out, xhat, a, b, k, grad_in):  # pragma: no cover - compiled
    # grad_in = a*g - b - k*xhat per channel (train-mode batch-norm adjoint)
    n_img, n_ch, h, w = grad_out.shape
    for nc in prange(n_img * n_ch):
        n = nc // n_ch
        c = nc % n_ch
        ac = a[c]
        bc = b[c]
        kc = k[c]
        for i in range(h):
            for j in range(w):
                grad_in[n, c, i, j] = (ac * grad_out[n, c, i, j] - bc
                                       - kc * xhat[n, c, i, j])


def channel_mean_var(x: np.ndarray):
    """Per-channel mean and biased variance of x (N, C, H, W) f4, as f8 arrays (C,)."""
    c = x.shape[1]
    mean = np.empty(c, dtype=np.float64)
    var = np.empty(c, dtype=np.float64)
    _channel_mean_var(x, mean, var)
    return mean, var


def scale_shift(x: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """y[n, c] = x[n, c] * scale[c] + shift[c] for x (N, C, H, W) f4."""
    y = np.empty_like(x)
    _scale_shift(x, scale, shift, y)
    return y


def grad_sums(grad_out: np.ndarray, xhat: np.ndarray):
    """Per-channel sum(g) and sum(g * xhat) as f8 arrays (C,)."""
    c = grad_out.shape[1]
    sum_g = np.empty(c, dtype=np.float64)
    sum_gx = np.empty(c, dtype=np.float64)
    _grad_sums(grad_out, xhat, sum_g, sum_gx)
    return sum_g, sum_gx


def bn_grad_input(grad_out, xhat, a, b, k) -> np.ndarray:
    """grad_in = a[c]*grad_out - b[c] - k[c]*xhat, all (N, C, H, W) f4."""
    grad_in = np.empty_like(grad_out)
    _bn_grad_input(grad_out, xhat, a, b, k, grad_in)
    return grad_in
