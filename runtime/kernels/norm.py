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
    # one pass, shifted by the channel's first value k: mean = k + S1/n, var =
    # S2/n - (S1/n)^2 with S1 = sum(x - k), S2 = sum((x - k)^2) in float64. k is a
    # value of the channel, so (k - mean)^2 <= n var: the cancellation costs at
    # most a factor n of float64 precision (1e-11 relative at n = 32768)
    n_img, n_ch, h, w = x.shape
    count = n_img * h * w
    for c in prange(n_ch):
        k = np.float64(x[0, c, 0, 0])
        s1 = 0.0
        s2 = 0.0
        for n in range(n_img):
            plane = x[n, c]
            for i in range(h):
                for j in range(w):
                    d = plane[i, j] - k
                    s1 += d
                    s2 += d * d
        m = s1 / count
        mean[c] = k + m
        var[c] = max(s2 / count - m * m, 0.0)


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


@nb.njit("void(f4[:, :, :, ::1], f4[:, :, :, ::1], f4[::1], f4[::1], f8[::1], f8[::1])",
         **JIT)
def _grad_sums(grad_out, x, s, t, sum_g, sum_gx):  # pragma: no cover - compiled
    # xhat = x * s[c] + t[c] in float32, recomputed (not kept from the forward)
    n_img, n_ch, h, w = grad_out.shape
    for c in prange(n_ch):
        sc = s[c]
        tc = t[c]
        acc = 0.0
        accx = 0.0
        for n in range(n_img):
            for i in range(h):
                for j in range(w):
                    g = grad_out[n, c, i, j]
                    acc += g
                    accx += g * (x[n, c, i, j] * sc + tc)
        sum_g[c] = acc
        sum_gx[c] = accx


@nb.njit("void(f4[:, :, :, ::1], f4[:, :, :, ::1], f4[::1], f4[::1], f4[::1], f4[::1],"
         " f4[::1], f4[:, :, :, ::1])", **JIT)
def _bn_grad_input(grad_out, x, s, t, a, b, k, grad_in):  # pragma: no cover - compiled
    # grad_in = a*g - b - k*xhat per channel (train-mode batch-norm adjoint), with
    # xhat = x * s[c] + t[c]
    n_img, n_ch, h, w = grad_out.shape
    for nc in prange(n_img * n_ch):
        n = nc // n_ch
        c = nc % n_ch
        ac = a[c]
        bc = b[c]
        kc = k[c]
        sc = s[c]
        tc = t[c]
        for i in range(h):
            for j in range(w):
                grad_in[n, c, i, j] = (ac * grad_out[n, c, i, j] - bc
                                       - kc * (x[n, c, i, j] * sc + tc))


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


def grad_sums(grad_out: np.ndarray, x: np.ndarray, s: np.ndarray, t: np.ndarray):
    """Per-channel sum(g) and sum(g * xhat) as f8 arrays (C,), xhat = x*s[c] + t[c]
    (x, g (N, C, H, W) f4; s, t (C,) f4)."""
    c = grad_out.shape[1]
    sum_g = np.empty(c, dtype=np.float64)
    sum_gx = np.empty(c, dtype=np.float64)
    _grad_sums(grad_out, x, s, t, sum_g, sum_gx)
    return sum_g, sum_gx


def bn_grad_input(grad_out, x, s, t, a, b, k) -> np.ndarray:
    """grad_in = a[c]*grad_out - b[c] - k[c]*xhat, xhat = x*s[c] + t[c], all
    (N, C, H, W) f4."""
    grad_in = np.empty_like(grad_out)
    _bn_grad_input(grad_out, x, s, t, a, b, k, grad_in)
    return grad_in
