"""Batch-normalisation kernels over NCHW: per-channel statistics in one pass each.

NumPy's reductions over axes (0, 2, 3) walk memory with strides; these loops read
each (n, c) plane contiguously, as a row of the (N*C, H*W) view, in parallel over
channels (reductions) or over (n, c) planes (elementwise). Rows of a 2-D view
measured 3-4x faster than 4-D indexing for the statistics on ResNet-18's block
shapes (e.g. 1.26 -> 0.30 ms at (32, 64, 32, 32), 0.40 -> 0.15 at
(32, 512, 4, 4), one thread). Sums are accumulated in float64 so that the
statistics of large batches stay exact to float32 precision.
"""

import numpy as np
from numba import prange

from .config import JIT_PARALLEL_FASTMATH as JIT, kernel


@kernel("void(f4[:, ::1], i8, f8[::1], f8[::1])", **JIT)
def _channel_mean_var(x, n_ch, mean, var):  # pragma: no cover - compiled
    # one pass, shifted by the channel's first value k: mean = k + S1/n, var =
    # S2/n - (S1/n)^2 with S1 = sum(x - k), S2 = sum((x - k)^2) in float64. k is a
    # value of the channel, so (k - mean)^2 <= n var: the cancellation costs at
    # most a factor n of float64 precision (1e-11 relative at n = 32768).
    # Partial sums per (n, c), in parallel over images, so memory is read in
    # order (a channel's planes are N*C*H*W/N apart)
    n_planes, hw = x.shape
    n_img = n_planes // n_ch
    count = n_img * hw
    part1 = np.empty((n_img, n_ch))
    part2 = np.empty((n_img, n_ch))
    for n in prange(n_img):
        for c in range(n_ch):
            p = n * n_ch + c
            k = np.float64(x[c, 0])
            s1 = 0.0
            s2 = 0.0
            for j in range(hw):
                d = x[p, j] - k
                s1 += d
                s2 += d * d
            part1[n, c] = s1
            part2[n, c] = s2
    for c in range(n_ch):
        s1 = 0.0
        s2 = 0.0
        for n in range(n_img):
            s1 += part1[n, c]
            s2 += part2[n, c]
        m = s1 / count
        mean[c] = np.float64(x[c, 0]) + m
        var[c] = max(s2 / count - m * m, 0.0)


@kernel("void(f4[:, ::1], f4[::1], f4[::1], i8, f4[:, ::1])", **JIT)
def _scale_shift(x, scale, shift, n_ch, y):  # pragma: no cover - compiled
    n_planes, hw = x.shape
    for p in prange(n_planes):
        a = scale[p % n_ch]
        b = shift[p % n_ch]
        for j in range(hw):
            y[p, j] = x[p, j] * a + b


@kernel("void(f4[:, ::1], f4[:, ::1], f4[::1], f4[::1], i8, f8[::1], f8[::1])", **JIT)
def _grad_sums(grad_out, x, s, t, n_ch, sum_g, sum_gx):  # pragma: no cover - compiled
    # xhat = x * s[c] + t[c] in float32, recomputed (not kept from the forward);
    # partial sums per (n, c) as in _channel_mean_var
    n_planes, hw = x.shape
    n_img = n_planes // n_ch
    part_g = np.empty((n_img, n_ch))
    part_gx = np.empty((n_img, n_ch))
    for n in prange(n_img):
        for c in range(n_ch):
            p = n * n_ch + c
            sc = s[c]
            tc = t[c]
            acc = 0.0
            accx = 0.0
            for j in range(hw):
                g = grad_out[p, j]
                acc += g
                accx += g * (x[p, j] * sc + tc)
            part_g[n, c] = acc
            part_gx[n, c] = accx
    for c in range(n_ch):
        acc = 0.0
        accx = 0.0
        for n in range(n_img):
            acc += part_g[n, c]
            accx += part_gx[n, c]
        sum_g[c] = acc
        sum_gx[c] = accx


@kernel("void(f4[:, ::1], f4[:, ::1], f4[::1], f4[::1], f4[::1], f4[::1], f4[::1], i8,"
         " f4[:, ::1])", **JIT)
def _bn_grad_input(grad_out, x, s, t, a, b, k, n_ch,
                   grad_in):  # pragma: no cover - compiled
    # grad_in = a*g - b - k*xhat per channel (train-mode batch-norm adjoint), with
    # xhat = x * s[c] + t[c]
    n_planes, hw = x.shape
    for p in prange(n_planes):
        c = p % n_ch
        ac = a[c]
        bc = b[c]
        kc = k[c]
        sc = s[c]
        tc = t[c]
        for j in range(hw):
            grad_in[p, j] = ac * grad_out[p, j] - bc - kc * (x[p, j] * sc + tc)


def _rows(a: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> its (N*C, H*W) view: one row per (n, c) plane."""
    n, c, h, w = a.shape
    return a.reshape(n * c, h * w)


def channel_mean_var(x: np.ndarray):
    """Per-channel mean and biased variance of x (N, C, H, W) f4, as f8 arrays (C,)."""
    c = x.shape[1]
    mean = np.empty(c, dtype=np.float64)
    var = np.empty(c, dtype=np.float64)
    _channel_mean_var(_rows(x), c, mean, var)
    return mean, var


def scale_shift(x: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """y[n, c] = x[n, c] * scale[c] + shift[c] for x (N, C, H, W) f4."""
    y = np.empty_like(x)
    _scale_shift(_rows(x), scale, shift, x.shape[1], _rows(y))
    return y


def grad_sums(grad_out: np.ndarray, x: np.ndarray, s: np.ndarray, t: np.ndarray):
    """Per-channel sum(g) and sum(g * xhat) as f8 arrays (C,), xhat = x*s[c] + t[c]
    (x, g (N, C, H, W) f4; s, t (C,) f4)."""
    c = grad_out.shape[1]
    sum_g = np.empty(c, dtype=np.float64)
    sum_gx = np.empty(c, dtype=np.float64)
    _grad_sums(_rows(grad_out), _rows(x), s, t, c, sum_g, sum_gx)
    return sum_g, sum_gx


def bn_grad_input(grad_out, x, s, t, a, b, k) -> np.ndarray:
    """grad_in = a[c]*grad_out - b[c] - k[c]*xhat, xhat = x*s[c] + t[c], all
    (N, C, H, W) f4."""
    grad_in = np.empty_like(grad_out)
    _bn_grad_input(_rows(grad_out), _rows(x), s, t, a, b, k, x.shape[1],
                   _rows(grad_in))
    return grad_in


# ---------------------------------------------------------------- BatchNorm + ReLU
# The fused kernels see x, y, g as (N*C, H*W) views of (N, C, H, W): one row per
# (n, c) plane (per-plane slices or flat indices were 2-10x slower in Numba).
# The ReLU's positives come back in backward one of two ways:
# * recomputed from x: relu(x*scale + shift) has a positive exactly where
#   x*scale + shift > 0, the same float32 expression evaluated again (nothing
#   kept but x, which BatchNorm's backward needs anyway);
# * from a mask (1 byte per element, as ReLU's) when a residual was added
#   before the ReLU (the residual is not kept). A bit mask (1/8 of the bytes)
#   was measured slower: over ResNet-18's four block shapes at batch 32, one
#   thread, forward 2.4 ms with bits vs 1.3 with bytes (4.6 unfused), backward
#   sums 4.8 vs 3.1 (4.1 unfused), for 6.5 MB less held per step.
# The gradient is g * mask (as ReLU.backward's np.multiply), not a select.


@kernel("void(f4[:, ::1], f4[::1], f4[::1], f4[:, ::1], b1, i8, f4[:, ::1],"
         " u1[:, ::1])", **JIT)
def _bn_relu_forward(x, scale, shift, res, has_res, n_ch, y,
                     mask):  # pragma: no cover - compiled
    # y = relu(x*scale[c] + shift[c] (+ res)), NaN kept (as torch.relu); with a
    # residual mask = v > 0 (NaN: 0), as ReLU's x > 0
    n_planes, hw = x.shape
    for p in prange(n_planes):
        c = p % n_ch
        a = scale[c]
        b = shift[c]
        if has_res:
            for j in range(hw):
                v = x[p, j] * a + b + res[p, j]
                y[p, j] = v if not (v <= 0) else np.float32(0.0)
                mask[p, j] = v > 0
        else:
            for j in range(hw):
                v = x[p, j] * a + b
                y[p, j] = v if not (v <= 0) else np.float32(0.0)


@kernel("void(f4[:, ::1], f4[:, ::1], f4[::1], f4[::1], f4[::1], f4[::1], i8,"
         " f8[::1], f8[::1])", **JIT)
def _bn_relu_grad_sums(g, x, s, t, fs, ft, n_ch, sum_g,
                       sum_gx):  # pragma: no cover - compiled
    # g' = g * (x*fs[c] + ft[c] > 0) (the forward's ReLU input, recomputed);
    # per channel sum(g') and sum(g' * xhat), xhat = x*s[c] + t[c]. Partial
    # sums per (n, c), in parallel over images: memory is read in order
    n_planes, hw = x.shape
    n_img = n_planes // n_ch
    part_g = np.empty((n_img, n_ch))
    part_gx = np.empty((n_img, n_ch))
    for n in prange(n_img):
        for c in range(n_ch):
            p = n * n_ch + c
            sc = s[c]
            tc = t[c]
            a = fs[c]
            b = ft[c]
            acc = 0.0
            accx = 0.0
            for j in range(hw):
                v = x[p, j] * a + b
                gv = g[p, j] * np.float32(v > 0)
                acc += gv
                accx += gv * (x[p, j] * sc + tc)
            part_g[n, c] = acc
            part_gx[n, c] = accx
    for c in range(n_ch):
        acc = 0.0
        accx = 0.0
        for n in range(n_img):
            acc += part_g[n, c]
            accx += part_gx[n, c]
        sum_g[c] = acc
        sum_gx[c] = accx


@kernel("void(f4[:, ::1], f4[:, ::1], u1[:, ::1], f4[::1], f4[::1], i8, f8[::1],"
         " f8[::1])", **JIT)
def _bn_mask_grad_sums(g, x, mask, s, t, n_ch, sum_g,
                       sum_gx):  # pragma: no cover - compiled
    # per channel sum(g') and sum(g' * xhat), g' = g * mask, xhat = x*s[c] + t[c];
    # partial sums per (n, c) as in _bn_relu_grad_sums
    n_planes, hw = x.shape
    n_img = n_planes // n_ch
    part_g = np.empty((n_img, n_ch))
    part_gx = np.empty((n_img, n_ch))
    for n in prange(n_img):
        for c in range(n_ch):
            p = n * n_ch + c
            sc = s[c]
            tc = t[c]
            acc = 0.0
            accx = 0.0
            for j in range(hw):
                gv = g[p, j] * np.float32(mask[p, j])
                acc += gv
                accx += gv * (x[p, j] * sc + tc)
            part_g[n, c] = acc
            part_gx[n, c] = accx
    for c in range(n_ch):
        acc = 0.0
        accx = 0.0
        for n in range(n_img):
            acc += part_g[n, c]
            accx += part_gx[n, c]
        sum_g[c] = acc
        sum_gx[c] = accx


@kernel("void(f4[:, ::1], f4[:, ::1], u1[:, ::1], f4[::1], f4[::1], f4[::1], f4[::1],"
         " f4[::1], i8, f4[:, ::1], f4[:, ::1])", **JIT)
def _bn_mask_grad_input(g, x, mask, s, t, a, b, k, n_ch, grad_in,
                        g_masked):  # pragma: no cover - compiled
    # g_masked = g' = g * mask (the residual branch's gradient) and grad_in =
    # a*g' - b - k*xhat, both written here in plane order (writing g' from the
    # channel-parallel sums kernel, plane by plane strided through a fresh
    # array, took 6.1 ms instead of 1.7 at (32, 64, 32, 32) inside a step)
    n_planes, hw = x.shape
    for p in prange(n_planes):
        c = p % n_ch
        ac = a[c]
        bc = b[c]
        kc = k[c]
        sc = s[c]
        tc = t[c]
        for j in range(hw):
            gv = g[p, j] * np.float32(mask[p, j])
            g_masked[p, j] = gv
            grad_in[p, j] = ac * gv - bc - kc * (x[p, j] * sc + tc)


@kernel("void(f4[:, ::1], f4[:, ::1], f4[::1], f4[::1], f4[::1], f4[::1], f4[::1],"
         " f4[::1], f4[::1], i8, f4[:, ::1])", **JIT)
def _bn_relu_grad_input(g, x, s, t, fs, ft, a, b, k, n_ch,
                        grad_in):  # pragma: no cover - compiled
    # grad_in = a*g' - b - k*xhat, g' = g * (x*fs[c] + ft[c] > 0)
    n_planes, hw = x.shape
    for p in prange(n_planes):
        c = p % n_ch
        ac = a[c]
        bc = b[c]
        kc = k[c]
        sc = s[c]
        tc = t[c]
        fa = fs[c]
        fb = ft[c]
        for j in range(hw):
            v = x[p, j] * fa + fb
            gv = g[p, j] * np.float32(v > 0)
            grad_in[p, j] = ac * gv - bc - kc * (x[p, j] * sc + tc)


def bn_relu_forward(x: np.ndarray, scale: np.ndarray, shift: np.ndarray,
                    residual: np.ndarray | None = None):
    """(y, mask): y = relu(x*scale[c] + shift[c] (+ residual)) for x (N, C, H, W) f4
    (C-contiguous, as residual). With a residual, mask is y > 0 as (N*C, H*W) u1;
    without, None (backward recomputes it from x)."""
    n, c, h, w = x.shape
    y = np.empty_like(x)
    if residual is None:
        mask = np.empty((0, 1), dtype=np.uint8)
        res = _rows(x)
    else:
        mask = np.empty((n * c, h * w), dtype=np.uint8)
        res = _rows(residual)
    _bn_relu_forward(_rows(x), scale, shift, res, residual is not None, c, _rows(y),
                     mask)
    return y, (None if residual is None else mask)


def bn_relu_grad_sums(grad_out, x, s, t, fs, ft):
    """Per-channel f8 sum(g') and sum(g' * xhat), g' = grad_out * (x*fs + ft > 0),
    xhat = x*s + t (all per channel c; x, grad_out (N, C, H, W) f4)."""
    c = x.shape[1]
    sum_g = np.empty(c, dtype=np.float64)
    sum_gx = np.empty(c, dtype=np.float64)
    _bn_relu_grad_sums(_rows(grad_out), _rows(x), s, t, fs, ft, c, sum_g, sum_gx)
    return sum_g, sum_gx


def bn_mask_grad_sums(grad_out, x, mask, s, t):
    """Per-channel f8 sum(g') and sum(g' * xhat), g' = grad_out * mask
    (bn_relu_forward's), xhat = x*s + t."""
    c = x.shape[1]
    sum_g = np.empty(c, dtype=np.float64)
    sum_gx = np.empty(c, dtype=np.float64)
    _bn_mask_grad_sums(_rows(grad_out), _rows(x), mask, s, t, c, sum_g, sum_gx)
    return sum_g, sum_gx


def bn_mask_grad_input(grad_out, x, mask, s, t, a, b, k):
    """(grad_in, g'): g' = grad_out * mask and grad_in = a*g' - b - k*xhat."""
    grad_in = np.empty_like(grad_out)
    g_masked = np.empty_like(grad_out)
    _bn_mask_grad_input(_rows(grad_out), _rows(x), mask, s, t, a, b, k, x.shape[1],
                        _rows(grad_in), _rows(g_masked))
    return grad_in, g_masked


def bn_relu_grad_input(grad_out, x, s, t, fs, ft, a, b, k) -> np.ndarray:
    """grad_in = a*g' - b - k*xhat, g' = grad_out * (x*fs + ft > 0), xhat = x*s + t."""
    grad_in = np.empty_like(grad_out)
    _bn_relu_grad_input(_rows(grad_out), _rows(x), s, t, fs, ft, a, b, k, x.shape[1],
                        _rows(grad_in))
    return grad_in
