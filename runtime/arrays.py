"""Checks at the public boundary: convert once to C-contiguous float32, check shapes."""

from __future__ import annotations

import numpy as np

from .errors import DTypeError, ShapeError


class Where:
    """``"<layer repr>.<method>"`` for an error message, formatted only when one is
    raised: building it on every call cost two reprs per layer and forward (about
    60 us of a 3.5 ms ResNet-18 inference)."""

    __slots__ = ("method", "owner")

    def __init__(self, owner: object, method: str):
        self.owner, self.method = owner, method

    def __str__(self) -> str:
        return f"{self.owner!r}.{self.method}"


def as_f32(x, name: str | Where) -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 array (no copy when it already is).

    Integer and float64 inputs are converted; anything that is not numeric raises.
    """
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiub":
        raise DTypeError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def check_ndim(x: np.ndarray, ndim: int, what: str | Where, layout: str) -> None:
    """Raise ShapeError unless ``x`` has ``ndim`` dimensions (``layout`` names them)."""
    if x.ndim != ndim:
        raise ShapeError(f"{what}: expected x of shape {layout}, got {tuple(x.shape)}")
