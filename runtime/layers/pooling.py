"""Pooling layers: MaxPool2d and GlobalAvgPool2d (torch's AdaptiveAvgPool2d(1))."""

from __future__ import annotations

import numpy as np

from ..arrays import Where, as_f32, check_ndim
from ..errors import ConfigError, ShapeError
from ..kernels import pool
from .base import Layer, keeps_cache


class MaxPool2d(Layer):
    """Max over k x k windows (stride defaults to k); the cache is the argmax, int32.

    x: (N, C, H, W) f4 -> y: (N, C, OH, OW) f4.
    See https://pytorch.org/docs/stable/generated/torch.nn.MaxPool2d.html
    """

    def __init__(self, kernel_size: int, stride: int | None = None, padding: int = 0):
        stride = kernel_size if stride is None else stride
        if kernel_size < 1 or stride < 1 or not 0 <= padding <= kernel_size // 2:
            raise ConfigError(f"MaxPool2d: expected kernel_size >= 1, stride >= 1 and "
                              f"0 <= padding <= kernel_size/2, got {kernel_size}, "
                              f"{stride}, {padding}")
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x, train, grad=None):
        x = as_f32(x, Where(self, "forward"))
        check_ndim(x, 4, Where(self, "forward"), "(N, C, H, W)")
        k, p = self.kernel_size, self.padding
        if min(x.shape[2], x.shape[3]) + 2 * p < k:
            raise ShapeError(f"{self!r}.forward: expected an image of at least "
                             f"{k - 2 * p}x{k - 2 * p}, got {x.shape[2]}x{x.shape[3]}")
        y, argmax = pool.maxpool2d_forward(x, k, self.stride, p)
        self._set_cache((argmax, x.shape) if keeps_cache(train, grad) else None)
        return y

    def backward(self, grad_out):
        argmax, in_shape = self._take_cache()
        g = as_f32(grad_out, Where(self, "backward"))
        if g.shape != argmax.shape:
            raise ShapeError(f"{self!r}.backward: expected grad_out of shape "
                             f"{argmax.shape}, got {tuple(g.shape)}")
        return pool.maxpool2d_backward(g, argmax, in_shape)

    def __repr__(self):
        return (f"MaxPool2d(kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding})")


class GlobalAvgPool2d(Layer):
    """Mean over H and W: (N, C, H, W) -> (N, C, 1, 1), like AdaptiveAvgPool2d(1)."""

    def forward(self, x, train, grad=None):
        x = as_f32(x, "GlobalAvgPool2d.forward")
        check_ndim(x, 4, "GlobalAvgPool2d.forward", "(N, C, H, W)")
        self._set_cache(x.shape if keeps_cache(train, grad) else None)
        return x.mean(axis=(2, 3), keepdims=True, dtype=np.float32)

    def backward(self, grad_out):
        shape = self._take_cache()
        g = as_f32(grad_out, "GlobalAvgPool2d.backward")
        if g.shape != (shape[0], shape[1], 1, 1):
            raise ShapeError(f"GlobalAvgPool2d.backward: expected grad_out of shape "
                             f"{(shape[0], shape[1], 1, 1)}, got {tuple(g.shape)}")
        scale = np.float32(1.0 / (shape[2] * shape[3]))
        return np.broadcast_to(g * scale, shape).copy()
