"""Preprocessing and iteration: normalise a uint8 batch to float32 (only the
current batch is ever float32), augment, and seeded mini-batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from sparsefedpp.runtime.errors import ConfigError, DTypeError, ShapeError

from .dataset import Dataset


def normalize(images_u8: np.ndarray, mean: Sequence[float], std: Sequence[float],
              out: np.ndarray | None = None) -> np.ndarray:
    """float32 ``(x / 255 - mean_c) / std_c`` of a uint8 batch.

    Parameters
    ----------
    images_u8 : np.ndarray
        uint8, shape (N, C, H, W).
    mean, std : sequence of float
        Length C, 0..1 units.
    out : np.ndarray, optional
        float32 (N, C, H, W) buffer to write into (reuse it across steps).

    Returns
    -------
    np.ndarray
        float32 (N, C, H, W); ``out`` when given.
    """
    if images_u8.dtype != np.uint8:
        raise DTypeError(f"normalize images: expected uint8, got {images_u8.dtype}")
    c = len(mean)
    if images_u8.ndim != 4 or images_u8.shape[1] != c or len(std) != c:
        raise ShapeError(f"normalize images: expected (N, {c}, H, W) and {c} stds, "
                         f"got {images_u8.shape} and {len(std)} stds")
    if out is None:
        out = np.empty(images_u8.shape, np.float32)
    elif out.dtype != np.float32 or out.shape != images_u8.shape:
        raise ShapeError(f"normalize out: expected float32 {images_u8.shape}, "
                         f"got {out.dtype} {out.shape}")
    s = np.asarray(std, np.float64)
    scale = (1.0 / (255.0 * s)).astype(np.float32)[:, None, None]
    shift = (-np.asarray(mean, np.float64) / s).astype(np.float32)[:, None, None]
    np.multiply(images_u8, scale, out=out)
    out += shift
    return out


def augment_crop_flip(images_u8: np.ndarray, rng: np.random.Generator,
                      pad: int = 4) -> np.ndarray:
    """Random crop of the zero-padded images plus random horizontal flip (p=0.5).

    Parameters
    ----------
    images_u8 : np.ndarray
        uint8, shape (N, C, H, W).
    rng : np.random.Generator
        Draws per-image row/column offsets in ``0..2*pad`` and flips.
    pad : int
        Zero padding per side; 0 means flip only.

    Returns
    -------
    np.ndarray
        New uint8 array, shape (N, C, H, W).
    """
    n, c, h, w = images_u8.shape
    padded = np.pad(images_u8, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    rows = rng.integers(0, 2 * pad + 1, size=(n, 1)) + np.arange(h)
    cols = rng.integers(0, 2 * pad + 1, size=(n, 1)) + np.arange(w)
    flip = rng.random(n) < 0.5
    cols[flip] = cols[flip, ::-1]
    return padded[np.arange(n)[:, None, None, None], np.arange(c)[:, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def batches(dataset: Dataset, batch_size: int, *, seed: int, shuffle: bool = True,
            augment: bool = False,
            drop_last: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of normalised mini-batches, deterministic for ``seed``.

    Pass a new seed per epoch (e.g. ``seed + epoch``) for a new order.

    Yields
    ------
    x : np.ndarray
        float32 (B, C, H, W), normalised with the dataset's mean/std; a fresh
        array per batch.
    y : np.ndarray
        int64 (B,). The last batch is shorter unless ``drop_last``.
    """
    if (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
            or batch_size < 1):
        raise ConfigError(f"batch_size: expected an integer >= 1, got {batch_size!r}; "
                          "pass e.g. batch_size=32")
    rng = np.random.default_rng(seed)
    n = len(dataset)
    order = rng.permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n

    def gen() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            x = np.asarray(dataset.images[idx])
            if augment:
                x = augment_crop_flip(x, rng)
            yield normalize(x, dataset.mean, dataset.std), dataset.labels[idx]

    return gen()
