"""BatchNorm2d with PyTorch's numerics (eps 1e-5, momentum 0.1, unbiased running var)."""

from __future__ import annotations

import numpy as np

from .arrays import Where, as_f32, check_ndim
from .errors import ConfigError, ShapeError, StateError
from .kernels import norm
from .layers import Layer, keeps_cache


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
        x = as_f32(x, Where(self, "forward"))
        what = Where(self, "forward")
        check_ndim(x, 4, what, f"(N, {self.num_features}, H, W)")
        if x.shape[1] != self.num_features:
            raise ShapeError(f"{what}: expected x of shape (N, {self.num_features}, H, W)"
                             f", got {tuple(x.shape)}")
        if train:
            count = x.shape[0] * x.shape[2] * x.shape[3]
            if count < 2:
                raise ShapeError(f"{what}: expected more than 1 value per channel in "
                                 f"training, got input {tuple(x.shape)}")
            mean, var = norm.channel_mean_var(x)
            self._update_running(mean, var * count / (count - 1))
        else:
            mean = self.running_mean.astype(np.float64)
            var = self.running_var.astype(np.float64)
        invstd = 1.0 / np.sqrt(var + self.eps)
        # one pass: y = x * scale + shift (= xhat * weight + bias)
        scale = invstd * self.weight
        y = norm.scale_shift(x, scale.astype(np.float32),
                             (self.bias - mean * scale).astype(np.float32))
        # backward recomputes xhat = (x - mean) * invstd = x * s + t from x: a pass
        # that writes xhat (and one that reads it for y) fewer than keeping it
        self._set_cache((x, invstd.astype(np.float32),
                         (-mean * invstd).astype(np.float32), train)
                        if keeps_cache(train, grad) else None)
        return y

    def _update_running(self, mean, unbiased_var):
        m = self.momentum
        self.running_mean[:] = (1 - m) * self.running_mean + m * mean
        self.running_var[:] = (1 - m) * self.running_var + m * unbiased_var
        self.num_batches_tracked += 1

    def backward(self, grad_out):
        x, invstd, shift, used_batch_stats = self._take_cache()
        g = np.ascontiguousarray(as_f32(grad_out, Where(self, "backward")))
        if g.shape != x.shape:
            raise ShapeError(f"{self!r}.backward: expected grad_out of shape "
                             f"{x.shape}, got {tuple(g.shape)}")
        sum_g, sum_gx = norm.grad_sums(g, x, invstd, shift)  # xhat = x*invstd + shift
        self.grad_weight += sum_gx.astype(np.float32)
        self.grad_bias += sum_g.astype(np.float32)
        a = (self.weight * invstd).astype(np.float32)
        if not used_batch_stats:  # running stats are constants: a plain scale
            zeros = np.zeros_like(a)
            return norm.bn_grad_input(g, x, invstd, shift, a, zeros, zeros)
        count = g.shape[0] * g.shape[2] * g.shape[3]
        b = (a * sum_g / count).astype(np.float32)
        k = (a * sum_gx / count).astype(np.float32)
        return norm.bn_grad_input(g, x, invstd, shift, a, b, k)

    def __repr__(self):
        return f"BatchNorm2d({self.num_features})"
