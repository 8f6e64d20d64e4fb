"""BatchNorm2d with PyTorch's numerics (eps 1e-5, momentum 0.1, unbiased running var)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..arrays import Where, as_f32, check_ndim
from ..errors import ConfigError, ShapeError, StateError
from ..kernels import norm
from .base import Layer, keeps_cache


class _FusedCache(NamedTuple):
    """What BatchNorm2d.forward_relu keeps for backward_relu."""

    x: np.ndarray
    mask: np.ndarray | None  # the ReLU's positives, 1 byte each (with a residual)
    invstd: np.ndarray
    shift: np.ndarray  # xhat = x * invstd + shift
    scale_f: np.ndarray  # the forward's y = relu(x * scale_f + shift_f)
    shift_f: np.ndarray
    used_batch_stats: bool


class BatchNorm2d(Layer):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, per channel of (N, C, H, W).

    Training uses the batch statistics (biased variance) and updates the running
    ones: running = (1 - momentum) * running + momentum * batch, with the unbiased
    variance for ``running_var``. Evaluation uses the running statistics.
    A training forward keeps a reference to x for backward (as Conv2d does), so x
    must not be changed in place before the backward.
    See https://pytorch.org/docs/stable/generated/torch.nn.BatchNorm2d.html
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5,
                 momentum: float = 0.1):
        if int(num_features) != num_features or num_features < 1:
            raise ConfigError(f"BatchNorm2d num_features: expected an integer >= 1, "
                              f"got {num_features!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ConfigError(f"BatchNorm2d momentum: expected 0..1, got {momentum}")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = np.ones(num_features, dtype=np.float32)
        self.bias = np.zeros(num_features, dtype=np.float32)
        self.grad_weight = np.zeros_like(self.weight)
        self.grad_bias = np.zeros_like(self.bias)
        self.running_mean = np.zeros(num_features, dtype=np.float32)
        self.running_var = np.ones(num_features, dtype=np.float32)
        self.num_batches_tracked = np.zeros((), dtype=np.int64)

    def params(self):
        return {"weight": self.weight, "bias": self.bias}

    def grads(self):
        return {"weight": self.grad_weight, "bias": self.grad_bias}

    def buffers(self):
        return {"running_mean": self.running_mean, "running_var": self.running_var,
                "num_batches_tracked": self.num_batches_tracked}

    #: set by runtime.inference.freeze when this layer is folded into the conv
    #: before it: the eval forward is then the identity
    folded = False

    def forward(self, x, train, grad=None):
        if self.folded and not keeps_cache(train, grad):
            return x
        if self.folded:
            raise StateError(f"{self!r}: folded into the conv before it for inference;"
                             f" call runtime.inference.unfreeze(model) before training")
        x = self._check_input(x, "forward")
        scale, shift, invstd, mean = self._scale_shift(x, train)
        y = norm.scale_shift(x, scale, shift)
        # backward recomputes xhat = (x - mean) * invstd = x * s + t from x: a pass
        # that writes xhat (and one that reads it for y) fewer than keeping it
        self._set_cache((x, invstd.astype(np.float32),
                         (-mean * invstd).astype(np.float32), train)
                        if keeps_cache(train, grad) else None)
        return y

    def _check_input(self, x, phase: str) -> np.ndarray:
        what = Where(self, phase)
        x = as_f32(x, what)
        check_ndim(x, 4, what, f"(N, {self.num_features}, H, W)")
        if x.shape[1] != self.num_features:
            raise ShapeError(f"{what}: expected x of shape (N, {self.num_features}, H, W)"
                             f", got {tuple(x.shape)}")
        return x

    def _scale_shift(self, x, train):
        """(scale, shift) f4, invstd and mean f8 per channel: y = x*scale + shift.
        Training takes the batch statistics and updates the running ones."""
        if train:
            count = x.shape[0] * x.shape[2] * x.shape[3]
            if count < 2:
                raise ShapeError(f"{Where(self, 'forward')}: expected more than 1 "
                                 f"value per channel in training, got input "
                                 f"{tuple(x.shape)}")
            mean, var = norm.channel_mean_var(x)
            self._update_running(mean, var * count / (count - 1))
        else:
            mean = self.running_mean.astype(np.float64)
            var = self.running_var.astype(np.float64)
        invstd = 1.0 / np.sqrt(var + self.eps)
        scale = invstd * self.weight
        return (scale.astype(np.float32), (self.bias - mean * scale).astype(np.float32),
                invstd, mean)

    def _update_running(self, mean, unbiased_var):
        m = self.momentum
        self.running_mean[:] = (1 - m) * self.running_mean + m * mean
        self.running_var[:] = (1 - m) * self.running_var + m * unbiased_var
        self.num_batches_tracked += 1

    def backward(self, grad_out):
        cache = self._take_cache()
        if isinstance(cache, _FusedCache):
            raise StateError(f"{self!r}.backward: the forward ran fused with the ReLU "
                             f"after it (forward_relu); call backward_relu")
        x, invstd, shift, used_batch_stats = cache
        g = np.ascontiguousarray(as_f32(grad_out, Where(self, "backward")))
        if g.shape != x.shape:
            raise ShapeError(f"{self!r}.backward: expected grad_out of shape "
                             f"{x.shape}, got {tuple(g.shape)}")
        sum_g, sum_gx = norm.grad_sums(g, x, invstd, shift)  # xhat = x*invstd + shift
        a, b, k = self._adjoint(sum_g, sum_gx, invstd, used_batch_stats, g.shape)
        return norm.bn_grad_input(g, x, invstd, shift, a, b, k)

    def _adjoint(self, sum_g, sum_gx, invstd, used_batch_stats, shape):
        """Accumulate the parameter gradients; return (a, b, k) of
        grad_in = a*g - b - k*xhat."""
        self.grad_weight += sum_gx.astype(np.float32)
        self.grad_bias += sum_g.astype(np.float32)
        a = (self.weight * invstd).astype(np.float32)
        if not used_batch_stats:  # running stats are constants: a plain scale
            zeros = np.zeros_like(a)
            return a, zeros, zeros
        count = shape[0] * shape[2] * shape[3]
        b = (a * sum_g / count).astype(np.float32)
        k = (a * sum_gx / count).astype(np.float32)
        return a, b, k

    # ------------------------------------------------------------ fused with ReLU

    def fusable(self, relu: Layer, train: bool, grad: bool | None) -> bool:
        """Whether forward_relu may stand for ``relu(self(x))`` in this call: a
        forward that keeps a cache, with neither layer frozen for inference (eval
        forwards and frozen layers keep their own paths)."""
        return (keeps_cache(train, grad) and not self.folded
                and not getattr(relu, "fused", False))

    def forward_relu(self, x, train: bool, grad: bool | None, relu: Layer,
                     residual: np.ndarray | None = None) -> np.ndarray:
        """relu(self(x) + residual) in one pass over x, for backward_relu; only
        where ``fusable`` (a forward that keeps a cache).

        Kept: x (as forward keeps it) and, with a residual, the mask of the
        output's positives (a byte each, as ReLU's, recorded on ``relu``);
        without one, nothing more: backward recomputes the ReLU's positives from
        x (the same float32 x*scale + shift). The output is a new array."""
        x = self._check_input(x, "forward")
        if residual is not None:
            residual = as_f32(residual, Where(self, "forward"))
            if residual.shape != x.shape:
                raise ShapeError(f"{Where(self, 'forward')}: expected a residual of "
                                 f"shape {x.shape}, got {tuple(residual.shape)}")
        scale, shift, invstd, mean = self._scale_shift(x, train)
        y, mask = norm.bn_relu_forward(x, scale, shift, residual)
        self._set_cache(_FusedCache(x, mask, invstd.astype(np.float32),
                                    (-mean * invstd).astype(np.float32), scale, shift,
                                    train),
                        held=x.nbytes, dense=x.nbytes)
        # the ReLU's share (alone it keeps a 1-byte mask); a dense-activation
        # backward keeps the same, so no separate dense figure
        relu._set_cache(None, held=0 if mask is None else mask.nbytes)
        return y

    def backward_relu(self, grad_out: np.ndarray):
        """Backward of forward_relu: (dL/dx, g'), g' = dL/d(bn output + residual) =
        grad_out * (output > 0) when forward_relu had a residual (its gradient),
        else None."""
        cache = self._take_cache()
        if not isinstance(cache, _FusedCache):
            raise StateError(f"{self!r}.backward_relu: expected a cache from "
                             f"forward_relu, got one from forward")
        x, mask, invstd, shift, scale_f, shift_f, used_batch_stats = cache
        g = as_f32(grad_out, Where(self, "backward"))
        if g.shape != x.shape:
            raise ShapeError(f"{self!r}.backward: expected grad_out of shape "
                             f"{x.shape}, got {tuple(g.shape)}")
        if mask is not None:  # g' is the residual branch's gradient: written too
            sum_g, sum_gx = norm.bn_mask_grad_sums(g, x, mask, invstd, shift)
            a, b, k = self._adjoint(sum_g, sum_gx, invstd, used_batch_stats, g.shape)
            return norm.bn_mask_grad_input(g, x, mask, invstd, shift, a, b, k)
        sum_g, sum_gx = norm.bn_relu_grad_sums(g, x, invstd, shift, scale_f, shift_f)
        a, b, k = self._adjoint(sum_g, sum_gx, invstd, used_batch_stats, g.shape)
        return norm.bn_relu_grad_input(g, x, invstd, shift, scale_f, shift_f, a, b,
                                       k), None

    def __repr__(self):
        return f"BatchNorm2d({self.num_features})"
