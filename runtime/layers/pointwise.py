"""Layers without parameters that act element by element or on the shape: ReLU, Flatten."""

from __future__ import annotations

import numpy as np

from ..arrays import as_f32
from ..errors import ShapeError, StateError
from .base import Layer, keeps_cache


class ReLU(Layer):
    """max(x, 0); the cache is the boolean mask of positive inputs (1 byte each)."""

    #: set by runtime.inference.freeze when the conv before it applies it: the eval
    #: forward is then the identity
    fused = False

    def forward(self, x, train, grad=None, *, inplace: bool = False):
        """``inplace``: the caller owns x and lets it be overwritten (one array
        fewer per call)."""
        if self.fused:
            if keeps_cache(train, grad):
                raise StateError("ReLU: fused into the conv before it for inference; "
                                 "call runtime.inference.unfreeze(model) before "
                                 "training")
            return x
        x = as_f32(x, "ReLU.forward")
        if keeps_cache(train, grad):
            self._set_cache(x > 0)
        else:
            self._set_cache(None)
        # keeps NaN visible, as torch does
        return np.maximum(x, np.float32(0.0), out=x if inplace else None)

    def backward(self, grad_out):
        mask = self._take_cache()
        g = as_f32(grad_out, "ReLU.backward")
        if g.shape != mask.shape:
            raise ShapeError(f"ReLU.backward: expected grad_out of shape "
                             f"{mask.shape}, got {tuple(g.shape)}")
        return np.multiply(g, mask, dtype=np.float32)


class Flatten(Layer):
    """(N, ...) -> (N, prod(...)), as torch.flatten(x, 1)."""

    def forward(self, x, train, grad=None):
        x = as_f32(x, "Flatten.forward")
        self._set_cache(x.shape if keeps_cache(train, grad) else None)
        return x.reshape(x.shape[0], -1)

    def backward(self, grad_out):
        shape = self._take_cache()
        g = as_f32(grad_out, "Flatten.backward")
        want = (shape[0], int(np.prod(shape[1:])))
        if g.shape != want:
            raise ShapeError(f"Flatten.backward: expected grad_out of shape {want}, "
                             f"got {tuple(g.shape)}")
        return g.reshape(shape)
