"""Max-pooling kernels: forward keeps the argmax of each window for the backward."""

import numpy as np

from .config import JIT, kernel
from .geometry import out_size


@kernel("void(f4[:, :, :, ::1], f4[:, :, :, ::1], i4[:, :, :, ::1], i8, i8, i8)",
         **JIT)
def _maxpool_forward(x, y, argmax, k, stride, pad):  # pragma: no cover - compiled
    n_img, n_ch, h, w = x.shape
    oh, ow = y.shape[2], y.shape[3]
    for n in range(n_img):
        for c in range(n_ch):
            for a in range(oh):
                for b in range(ow):
                    best = -np.inf
                    where = -1
                    for i in range(k):
                        ih = a * stride - pad + i
                        if ih < 0 or ih >= h:
                            continue
                        for j in range(k):
                            iw = b * stride - pad + j
                            if iw < 0 or iw >= w:
                                continue
                            v = x[n, c, ih, iw]
                            # NaN wins, so a diverged network stays visibly NaN
                            if v > best or where < 0 or np.isnan(v):
                                best = v
                                where = ih * w + iw
                                if np.isnan(v):
                                    break
                    y[n, c, a, b] = best
                    argmax[n, c, a, b] = where


@kernel("void(f4[:, :, :, ::1], i4[:, :, :, ::1], f4[:, :, :, ::1])", **JIT)
def _maxpool_backward(grad_out, argmax, grad_in):  # pragma: no cover - compiled
    n_img, n_ch, oh, ow = grad_out.shape
    w = grad_in.shape[3]
    grad_in[:] = 0.0
    for n in range(n_img):
        for c in range(n_ch):
            for a in range(oh):
                for b in range(ow):
                    where = argmax[n, c, a, b]
                    grad_in[n, c, where // w, where % w] += grad_out[n, c, a, b]


def maxpool2d_forward(x: np.ndarray, k: int, stride: int, pad: int):
    """Max over k x k windows of x (N, C, H, W) f4.

    Returns y (N, C, OH, OW) f4 and argmax (N, C, OH, OW) i4, the flat index
    ``ih*W + iw`` of each window's maximum inside its (H, W) plane.
    """
    n, c, h, w = x.shape
    oh, ow = out_size(h, k, stride, pad), out_size(w, k, stride, pad)
    y = np.empty((n, c, oh, ow), dtype=np.float32)
    argmax = np.empty((n, c, oh, ow), dtype=np.int32)
    _maxpool_forward(x, y, argmax, k, stride, pad)
    return y, argmax


def maxpool2d_backward(grad_out: np.ndarray, argmax: np.ndarray,
                       in_shape: tuple) -> np.ndarray:
    """Route grad_out (N, C, OH, OW) f4 to each window's argmax: grad_in (N, C, H, W)."""
    grad_in = np.empty(in_shape, dtype=np.float32)
    _maxpool_backward(np.ascontiguousarray(grad_out), argmax, grad_in)
    return grad_in
