"""Top-k activations kept between forward and backward (SWAT), stored compressed.

A layer that uses sparse activations saves ``ActivationSparsifier(keep)(x)``
instead of x; its backward computes grad_weight from the kept elements with
``kernels/sparse_grad.py`` (the compression kernels: ``kernels/topk.py``). See
DESIGN.md, "Sparse-activation backward (SWAT)".

Which elements are kept
-----------------------
``compress(x, t)`` keeps every element with |x| >= t, except exact zeros (a ReLU
output is mostly zeros; storing them would waste memory), and keeps NaN (so a
diverging run stays visible in the gradients). ``topk_threshold(x, f)`` is the
exact k-th largest |x|, k = ceil(f * x.size).

Ties: with the threshold from ``topk_threshold`` and ``limit=k``, exactly
min(k, nonzeros) elements are kept: every |x| > t, then the elements with
|x| == t in C order (lowest flat index first) until k are kept. Without a limit
(``compress`` on a reused threshold) every tie is kept. ``ActivationSparsifier``
uses the limit on its refresh calls only, so those keep exactly k; the calls that
reuse the threshold keep whatever count the threshold gives on that batch.

Measured (2-core EPYC shared with a training run, so NUMBA_NUM_THREADS=1; x
(32, 16, 32, 32) after ReLU, 2 MiB; tools/bench/sparse_grad.py): compress is a
count pass (0.25 ms) plus a write pass into exactly-sized arrays: 0.6 ms in all
at keep 0.001, 0.9 ms at 0.01, 1.35-1.6 ms at 0.05-1.0 (the forward of that
layer: 2.5 ms). ``topk_threshold`` (a radix select, three histogram passes):
1.2 ms; ``np.partition`` of ``np.abs(x)`` took 0.7 ms at k = 5000 but 3.7-16 ms
at k = size/4 or size/2. With 2 threads on the loaded machine every parallel
call waited a scheduler quantum (about 12 ms), so no 2-thread figure is given.
``ActivationSparsifier`` calls that reuse the threshold at a low keep (under 1/48
kept last time) take ``kernels.topk.compress_one_pass`` instead: one read
of x, the same result (ResNet-18's four block shapes, one thread: 0.75x the
count + write passes at keep 0.001, 0.72x at 0.01).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from ..errors import ConfigError, DTypeError, ShapeError
from ..kernels import topk as kern

_ENCODINGS = ("auto", "indices", "bitmap")


class SparseActivations:
    """A float32 tensor with only its kept elements stored.

    Two encodings of the positions; ``compress`` picks the smaller one:

    * ``"indices"``: flat C-order int32 indices (K,) + values (K,) f4, 8 bytes per
      kept element;
    * ``"bitmap"``: ``np.packbits`` of the keep mask (ceil(size/8),) u1 + values
      (K,) f4: size/8 + 4*K bytes, smaller once more than 1/32 of x is kept.

    Values are in increasing flat-index order in both. Build one with
    :func:`compress`; the constructor takes the raw arrays (no copy) and checks
    them.
    """

    def __init__(self, shape: tuple, values: np.ndarray, *,
                 indices: np.ndarray | None = None, bitmap: np.ndarray | None = None):
        self._shape = tuple(int(d) for d in shape)
        size = math.prod(self._shape)
        what = "SparseActivations"
        if (indices is None) == (bitmap is None):
            raise ConfigError(f"{what}: expected exactly one of indices or bitmap, "
                              f"got {'both' if indices is not None else 'neither'}")
        if values.dtype != np.float32 or values.ndim != 1:
            raise DTypeError(f"{what}: expected values of dtype float32 and shape "
                             f"(K,), got {values.dtype} {values.shape}")
        if indices is not None:
            if indices.dtype != np.int32 or indices.shape != values.shape:
                raise ShapeError(f"{what}: expected int32 indices of shape "
                                 f"{values.shape}, got {indices.dtype} {indices.shape}")
        elif bitmap.dtype != np.uint8 or bitmap.shape != (-(-size // 8),):
            raise ShapeError(f"{what}: expected a uint8 bitmap of shape "
                             f"({-(-size // 8)},), got {bitmap.dtype} {bitmap.shape}")
        self._values = values
        self._indices = indices
        self._bitmap = bitmap

    @property
    def shape(self) -> tuple:
        """Shape of the dense tensor, e.g. (N, C, H, W) or (N, F)."""
        return self._shape

    @property
    def size(self) -> int:
        """Elements of the dense tensor."""
        return math.prod(self._shape)

    @property
    def kept(self) -> int:
        """Number of stored (kept) elements K."""
        return int(self._values.size)

    @property
    def encoding(self) -> str:
        """``"indices"`` or ``"bitmap"``."""
        return "indices" if self._indices is not None else "bitmap"

    @property
    def values(self) -> np.ndarray:
        """Kept values (K,) f4, in increasing flat-index order."""
        return self._values

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (values + indices or bitmap)."""
        pos = self._indices if self._indices is not None else self._bitmap
        return int(self._values.nbytes + pos.nbytes)

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the dense float32 tensor: 4 * size."""
        return 4 * self.size

    def indices(self) -> np.ndarray:
        """Flat C-order int32 indices (K,) of the kept elements, increasing.

        The stored array for ``"indices"`` (do not modify it); decoded from the
        bitmap (a new array, 4*K bytes) for ``"bitmap"``.
        """
        if self._indices is not None:
            return self._indices
        return kern.bitmap_to_indices(self._bitmap, self.kept)

    def to_dense(self) -> np.ndarray:
        """The dense float32 tensor of ``shape``: kept values, zeros elsewhere."""
        out = np.zeros(self.size, dtype=np.float32)
        out[self.indices()] = self._values
        return out.reshape(self._shape)

    def __repr__(self) -> str:
        return (f"SparseActivations(shape={self._shape}, kept={self.kept}, "
                f"encoding={self.encoding!r}, nbytes={self.nbytes})")


def _flat_f32(x, what: str) -> np.ndarray:
    """x as a C-contiguous float32 array; floats only, size below 2^31."""
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise DTypeError(f"{what}: expected a float array, got dtype {arr.dtype}; "
                         f"use .astype(np.float32)")
    if arr.ndim == 0 or arr.size >= 2**31:
        raise ShapeError(f"{what}: expected an array of 1 to 2^31-1 elements with "
                         f"ndim >= 1, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def compress(x: np.ndarray, threshold: float, *, limit: int | None = None,
             encoding: str = "auto") -> SparseActivations:
    """Keep the elements of x with |x| >= threshold and x != 0 (and NaN).

    Parameters
    ----------
    x : float array of any shape (N, C, H, W) or (N, F); converted to float32.
    threshold : float >= 0 (0 keeps every nonzero).
    limit : keep at most this many by dropping ties |x| == threshold > 0 after the
        first ones in C order; elements with |x| > threshold are always kept.
        ``None``: keep every tie.
    encoding : ``"auto"`` (the smaller; indices on a draw), ``"indices"`` or
        ``"bitmap"`` (forced).

    Returns
    -------
    SparseActivations of x.shape.
    """
    what = "compress"
    arr = _flat_f32(x, what)
    if not threshold >= 0:  # also catches NaN
        raise ConfigError(f"{what}: expected a threshold >= 0, got {threshold}")
    if encoding not in _ENCODINGS:
        raise ConfigError(f"{what}: expected encoding in {_ENCODINGS}, got "
                          f"{encoding!r}")
    flat = arr.reshape(-1)
    start, quota, kept = kern.compress_counts(flat, threshold,
                                              -1 if limit is None else int(limit))
    if encoding == "auto":
        encoding = "bitmap" if -(-flat.size // 8) < 4 * kept else "indices"
    if encoding == "indices":
        idx, vals = kern.compress_to_indices(flat, threshold, start, quota, kept)
        return SparseActivations(arr.shape, vals, indices=idx)
    bitmap, vals = kern.compress_to_bitmap(flat, threshold, start, quota, kept)
    return SparseActivations(arr.shape, vals, bitmap=bitmap)


def _check_keep_fraction(keep_fraction) -> float:
    kf = float(keep_fraction)
    if not 0.0 < kf <= 1.0:  # also catches NaN
        raise ConfigError(f"keep_fraction: expected a number in (0, 1], got "
                          f"{keep_fraction!r}")
    return kf


def num_kept(size: int, keep_fraction: float) -> int:
    """k = ceil(keep_fraction * size), at least 1 (for size >= 1)."""
    return min(size, max(1, math.ceil(keep_fraction * size)))


def topk_threshold(x: np.ndarray, keep_fraction: float) -> float:
    """Exact threshold t: the k-th largest |x|, k = ceil(keep_fraction * x.size).

    ``compress(x, t, limit=k)`` then keeps exactly min(k, nonzeros of x). With
    keep_fraction == 1, or when k exceeds the nonzeros, t = 0 (every nonzero is
    kept; zeros never are). NaN counts as larger than any number; if the k-th
    largest is NaN, t = inf. keep_fraction must be in (0, 1] (ConfigError).
    Wraps the radix select ``kernels.topk.topk_abs_threshold``.
    """
    kf = _check_keep_fraction(keep_fraction)
    flat = _flat_f32(x, "topk_threshold").reshape(-1)
    if kf >= 1.0:
        return 0.0
    t = kern.topk_abs_threshold(flat, num_kept(flat.size, kf),
                                nb.get_num_threads())
    return math.inf if math.isnan(t) else t


class ActivationSparsifier:
    """Compress activations to their top ``keep_fraction`` by magnitude, reusing
    the threshold between refreshes (SWAT).

    A refresh (an exact top-k threshold on this x, keeping exactly min(k,
    nonzeros), ties by C order) happens on the first call, on the first call
    after :meth:`reset` or a change of ``keep_fraction``, and, if
    ``refresh_every > 0``, every ``refresh_every`` calls after the last refresh
    (SWAT: 10). ``refresh_every = 0``: only then (SparseFedPP: ``reset()`` once per
    round). Other calls reuse ``threshold`` and keep every |x| >= threshold, x != 0,
    whatever their count.

    Parameters
    ----------
    keep_fraction : float in (0, 1]; 1 keeps every nonzero.
    refresh_every : int >= 0.
    """

    def __init__(self, keep_fraction: float, refresh_every: int = 0):
        if int(refresh_every) != refresh_every or refresh_every < 0:
            raise ConfigError(f"ActivationSparsifier refresh_every: expected an "
                              f"integer >= 0, got {refresh_every!r}")
        self.refresh_every = int(refresh_every)
        self._keep_fraction = _check_keep_fraction(keep_fraction)
        self.threshold: float | None = None  # None until the first call
        self.calls = 0  # calls to compress/__call__ so far
        self._since_refresh = 0  # calls since the last refresh
        self._stale = True
        self._last_kept: tuple | None = None  # (kept, size) of the last call

    @property
    def keep_fraction(self) -> float:
        """Fraction of elements kept at a refresh; setting it forces a refresh."""
        return self._keep_fraction

    @keep_fraction.setter
    def keep_fraction(self, value: float) -> None:
        self._keep_fraction = _check_keep_fraction(value)
        self._stale = True

    def reset(self) -> None:
        """Recompute the threshold on the next call (e.g. at a new round)."""
        self._stale = True

    def compress(self, x: np.ndarray) -> SparseActivations:
        """SparseActivations of x (float array, any shape), see the class doc."""
        arr = _flat_f32(x, f"{self!r}.compress")
        due = self.refresh_every > 0 and self._since_refresh >= self.refresh_every
        limit = None
        if self._stale or due:
            self.threshold = topk_threshold(arr, self._keep_fraction)
            limit = num_kept(arr.size, self._keep_fraction)
            self._since_refresh = 0
            self._stale = False
        self.calls += 1
        self._since_refresh += 1
        if limit is None and self._last_kept is not None:
            out = self._compress_one_pass(arr)
            if out is not None:
                return out
        out = compress(arr, self.threshold, limit=limit)
        self._last_kept = (out.kept, arr.size)
        return out

    def _compress_one_pass(self, arr: np.ndarray) -> SparseActivations | None:
        # A reused threshold keeps about as many as last time on a like-sized x:
        # when that is few enough for the indices encoding, collect them in one
        # pass (kernels.topk.compress_one_pass); None: use compress
        last, size = self._last_kept
        if size != arr.size or 48 * last >= size:
            return None
        found = kern.compress_one_pass(arr.reshape(-1), self.threshold, last)
        if found is None:
            return None
        idx, vals = found
        if -(-arr.size // 8) < 4 * vals.size:  # compress would pick the bitmap
            return None
        self._last_kept = (vals.size, arr.size)
        return SparseActivations(arr.shape, vals, indices=idx)

    __call__ = compress

    def __repr__(self) -> str:
        return (f"ActivationSparsifier(keep_fraction={self._keep_fraction}, "
                f"refresh_every={self.refresh_every})")
