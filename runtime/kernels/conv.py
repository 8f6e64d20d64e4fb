"""Convolution kernels: im2col / col2im in Numba, the matmuls in BLAS through NumPy.

Layout contract: ``x`` is C-contiguous float32 (N, C, H, W); columns are
(N, C*kh*kw, OH*OW) with row index ``(c*kh + i)*kw + j``, the order of a PyTorch
weight (O, C, kh, kw) reshaped to (O, C*kh*kw). Keeping the batch axis first
makes ``W @ cols`` land directly in NCHW, so no transposes are needed.

The kernels are serial on purpose: NumPy's OpenBLAS already runs two threads,
and a second (Numba) thread pool on two cores makes both wait (measured: every
call then takes a scheduler quantum, about 8 ms).
"""

import numba as nb
import numpy as np

from .config import JIT


def out_size(size: int, k: int, stride: int, pad: int) -> int:
    """Output length of a convolution or pooling window along one axis."""
    return (size + 2 * pad - k) // stride + 1


@nb.njit("void(f4[:, :, :, ::1], f4[:, :, ::1], i8, i8, i8, i8)", **JIT)
def _im2col(x, cols, kh, kw, stride, pad):  # pragma: no cover - compiled
    n_img, n_ch, h, w = x.shape
    oh = (h + 2 * pad - kh) // stride + 1
    ow = (w + 2 * pad - kw) // stride + 1
    for n in range(n_img):
        for c in range(n_ch):
            for i in range(kh):
                for j in range(kw):
                    r = (c * kh + i) * kw + j
                    off = j - pad
                    # output columns b whose input column b*stride + off is inside
                    b0 = min(ow, max(0, (pad - j + stride - 1) // stride))
                    b1 = max(b0, min(ow, (w - 1 - off) // stride + 1))
                    for a in range(oh):
                        ih = a * stride - pad + i
                        base = a * ow
                        if ih < 0 or ih >= h:
                            for b in range(ow):
                                cols[n, r, base + b] = 0.0
                            continue
                        for b in range(b0):
                            cols[n, r, base + b] = 0.0
                        if stride == 1:
                            for b in range(b0, b1):
                                cols[n, r, base + b] = x[n, c, ih, b + off]
                        else:
                            for b in range(b0, b1):
                                cols[n, r, base + b] = x[n, c, ih, b * stride + off]
                        for b in range(b1, ow):
                            cols[n, r, base + b] = 0.0


@nb.njit("void(f4[:, :, ::1], f4[:, :, :, ::1], i8, i8, i8, i8)", **JIT)
def _col2im(cols, x, kh, kw, stride, pad):  # pragma: no cover - compiled
    n_img, n_ch, h, w = x.shape
    oh = (h + 2 * pad - kh) // stride + 1
    ow = (w + 2 * pad - kw) // stride + 1
    x[:] = 0.0
    for n in range(n_img):
        for c in range(n_ch):
            for i in range(kh):
                for j in range(kw):
                    r = (c * kh + i) * kw + j
                    off = j - pad
                    b0 = min(ow, max(0, (pad - j + stride - 1) // stride))
                    b1 = max(b0, min(ow, (w - 1 - off) // stride + 1))
                    for a in range(oh):
                        ih = a * stride - pad + i
                        if ih < 0 or ih >= h:
                            continue
                        base = a * ow
                        for b in range(b0, b1):
                            x[n, c, ih, b * stride + off] += cols[n, r, base + b]


def im2col(x: np.ndarray, kh: int, kw: int, stride: int, pad: int) -> np.ndarray:
    """Unfold x (N, C, H, W) f4 into columns (N, C*kh*kw, OH*OW) f4.

    A 1x1 kernel without padding needs no unfolding: that case returns a view or
    a strided copy instead of calling the kernel.
    """
    n, c, h, w = x.shape
    oh, ow = out_size(h, kh, stride, pad), out_size(w, kw, stride, pad)
    if kh == 1 and kw == 1 and pad == 0:
        sub = x if stride == 1 else x[:, :, ::stride, ::stride]
        return np.ascontiguousarray(sub).reshape(n, c, oh * ow)
    cols = np.empty((n, c * kh * kw, oh * ow), dtype=np.float32)
    _im2col(x, cols, kh, kw, stride, pad)
    return cols


def col2im(cols: np.ndarray, shape: tuple, kh: int, kw: int, stride: int,
           pad: int) -> np.ndarray:
    """Fold columns (N, C*kh*kw, OH*OW) f4 back into ``shape`` (N, C, H, W), summing
    where windows overlap (the adjoint of :func:`im2col`)."""
    x = np.empty(shape, dtype=np.float32)
    _col2im(np.ascontiguousarray(cols), x, kh, kw, stride, pad)
    return x


def conv2d_forward(x: np.ndarray, w: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """y = conv(x, w): x (N, C, H, W) f4, w (O, C, kh, kw) f4 -> y (N, O, OH, OW) f4."""
    n, _, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh, ow = out_size(h, kh, stride, pad), out_size(wd, kw, stride, pad)
    cols = im2col(x, kh, kw, stride, pad)
    y = np.matmul(w.reshape(o, -1), cols)
    return y.reshape(n, o, oh, ow)


def conv2d_grad_weight(x: np.ndarray, grad_out: np.ndarray, kshape: tuple,
                       stride: int, pad: int) -> np.ndarray:
    """dL/dw (O, C, kh, kw) f4 from the layer input x and grad_out (N, O, OH, OW)."""
    n, o = grad_out.shape[:2]
    kh, kw = kshape[2], kshape[3]
    cols = im2col(x, kh, kw, stride, pad)
    g = grad_out.reshape(n, o, -1)
    # one (O x OHW) @ (OHW x CKK) product per image, then the sum over images
    per_image = np.matmul(g, cols.transpose(0, 2, 1))
    return per_image.sum(axis=0).reshape(kshape)


def conv2d_grad_input(grad_out: np.ndarray, w: np.ndarray, in_shape: tuple,
                      stride: int, pad: int) -> np.ndarray:
    """dL/dx (N, C, H, W) f4 from grad_out (N, O, OH, OW) and the weights w.

    For stride 1 with "same" geometry the transposed convolution is itself a
    convolution with the flipped kernel, which avoids the slower scatter of col2im.
    """
    n, c, h, wd = in_shape
    o, _, kh, kw = w.shape
    g = np.ascontiguousarray(grad_out)
    if stride == 1 and kh == kw and g.shape[2] == h and g.shape[3] == wd:
        w_flip = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
        return conv2d_forward(g, w_flip, 1, kh - 1 - pad)
    gcols = np.matmul(w.reshape(o, -1).T, g.reshape(n, o, -1))
    if kh == 1 and kw == 1 and pad == 0:
        grad_x = np.zeros(in_shape, dtype=np.float32)
        oh, ow = g.shape[2], g.shape[3]
        grad_x[:, :, : oh * stride : stride, : ow * stride : stride] = gcols.reshape(
            n, c, oh, ow)
        return grad_x
    return col2im(gcols, in_shape, kh, kw, stride, pad)
