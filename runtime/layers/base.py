"""The layer interface every layer follows, and the cache bookkeeping they share.

Interface (every layer): ``forward(x, train, grad=None)``, ``backward(grad_out)``,
``params()``, ``grads()``, ``buffers()``, ``children()``, ``zero_grad()``.
``train`` selects training behaviour (batch statistics in BatchNorm); ``grad``
(default: ``train``) says whether to keep what backward needs. A forward with
``grad=False`` stores nothing, so inference holds no activations.
Parameter gradients accumulate (``+=``) until ``zero_grad()``.
"""

from __future__ import annotations

import numpy as np

from ..accounting import LayerCost, nbytes_of
from ..errors import StateError


class Layer:
    """Base class: a layer without parameters, children or cache."""

    _cache = None

    def forward(self, x: np.ndarray, train: bool, grad: bool | None = None):
        raise NotImplementedError

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def params(self) -> dict[str, np.ndarray]:
        return {}

    def grads(self) -> dict[str, np.ndarray]:
        return {}

    def buffers(self) -> dict[str, np.ndarray]:
        return {}

    def children(self) -> dict[str, Layer]:
        return {}

    def chains(self) -> list[list[Layer]]:
        """Runs of children whose forward is exactly one after the other, each
        taking the previous one's output alone (where freezing may fold a
        BatchNorm or fuse a ReLU into the conv before it); none by default."""
        return []

    def zero_grad(self) -> None:
        for g in self.grads().values():
            g.fill(0.0)
        for child in self.children().values():
            child.zero_grad()

    @property
    def cost(self) -> LayerCost:
        """Figures of the last forward/backward (see accounting.py)."""
        cost = self.__dict__.get("_cost")
        if cost is None:
            cost = self._cost = LayerCost()
        return cost

    def _set_cache(self, cache, held: int | None = None, dense: int | None = None):
        """Keep what backward needs (None: nothing) and record the bytes it holds."""
        self._cache = cache
        held = nbytes_of(cache) if held is None else held
        self.cost.held_bytes = held
        self.cost.dense_held_bytes = held if dense is None else dense

    def _take_cache(self):
        cache = self._cache
        if cache is None:
            raise StateError(f"{self!r}.backward: expected a cache from "
                             "forward(x, train=True) (or grad=True), got none")
        self._cache = None
        return cache

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def keeps_cache(train: bool, grad: bool | None) -> bool:
    """Whether a forward call must keep what backward needs."""
    return train if grad is None else grad
