"""One split of an image dataset (uint8 NCHW, int64 labels) and the checks and
statistics every loader shares.

Images stay uint8 (a 512 MB device cannot hold a float32 CIFAR-10); every
problem with a data file raises :class:`~sparsefedpp.runtime.errors.DataError`
naming the file, what was expected and where to get the data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from sparsefedpp.runtime.errors import ConfigError, DataError, DTypeError, ShapeError

Stats = tuple[tuple[float, ...], tuple[float, ...]]


def _err(what: object, expected: str, got: object, fix: str) -> DataError:
    return DataError(f"{what}: expected {expected}, got {got}; {fix}")


@dataclass(frozen=True)
class Dataset:
    """One split of an image-classification dataset.

    Attributes
    ----------
    images : np.ndarray
        uint8, shape (N, C, H, W); may be read-only or a memory map.
    labels : np.ndarray
        int64, shape (N,), values in ``0..len(classes)-1``.
    classes : tuple of str
        Class names, indexed by label.
    mean, std : tuple of float
        Per-channel, 0..1 units, from the TRAIN split (stored on both splits).
    name : str
        Short name, e.g. ``"cifar10"``.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.labels.dtype != np.int64:
            raise DTypeError(f"Dataset: expected uint8 images and int64 labels, got "
                             f"{self.images.dtype} and {self.labels.dtype}")
        if self.images.ndim != 4 or self.labels.shape != self.images.shape[:1]:
            raise ShapeError(f"Dataset: expected images (N, C, H, W) and labels (N,), "
                             f"got {self.images.shape} and {self.labels.shape}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: Sequence[int] | np.ndarray) -> Dataset:
        """Copy of the examples at ``indices`` (int array or boolean mask)."""
        idx = np.asarray(indices)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.intp).ravel()
        return replace(self, images=np.asarray(self.images[idx]),
                       labels=self.labels[idx])


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ConfigError(f"split: expected 'train' or 'test', got {split!r}; "
                          "pass split='train' or split='test'")


def _stats(chunks: Iterable[np.ndarray]) -> Stats:
    """Mean/std per channel from uint8 NCHW chunks, with exact integer sums."""
    n, s, s2 = 0, 0, 0
    for chunk in chunks:
        x = np.asarray(chunk).astype(np.uint16)  # 255**2 fits in uint16
        n += x.shape[0] * x.shape[2] * x.shape[3]
        s = s + x.sum(axis=(0, 2, 3), dtype=np.uint64)
        s2 = s2 + (x * x).sum(axis=(0, 2, 3), dtype=np.uint64)
    if n == 0:
        raise ShapeError("channel_stats: expected at least one pixel, got 0")
    mean = s.astype(np.float64) / (n * 255.0)
    std = np.sqrt(np.maximum(s2.astype(np.float64) / (n * 255.0**2) - mean**2, 0.0))
    std[std == 0] = 1.0  # constant channel: normalize only centres it
    return tuple(map(float, mean)), tuple(map(float, std))


def channel_stats(images_u8: np.ndarray) -> Stats:
    """Per-channel mean and std in 0..1 units, in chunks of 1024 images.

    Parameters
    ----------
    images_u8 : np.ndarray
        uint8, shape (N, C, H, W), N >= 1.

    Returns
    -------
    mean, std : tuple of float
        Length C each; a constant channel gets std 1.0.
    """
    return _stats(images_u8[i:i + 1024] for i in range(0, len(images_u8), 1024))


def _int_labels(labels: object) -> np.ndarray | None:
    """Integer labels as int64 (n,) (accepting (n, 1)), else None."""
    y = np.asarray(labels) if isinstance(labels, (list, np.ndarray)) else None
    if y is not None and y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y is None or y.ndim != 1 or (y.size and y.dtype.kind not in "iu"):
        return None
    return y.astype(np.int64)


def _label_problem(y: np.ndarray | None, n: int, k: int) -> str:
    """What is wrong with ``y`` given we want n labels in 0..k-1 ('' if nothing)."""
    if y is None:
        return "labels that are not a 1-D integer array"
    if y.shape[0] != n:
        return f"{y.shape[0]} labels"
    if n and (y.min() < 0 or y.max() >= k):
        return f"labels in {y.min()}..{y.max()}"
    return ""
