"""CIFAR-10, "python version": the pickled batches, read with an unpickler that
resolves only the numpy globals a batch needs (the files are untrusted input)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
from sparsefedpp.runtime.errors import DataError

from .dataset import (
    Dataset,
    _check_split,
    _err,
    _int_labels,
    _label_problem,
    _stats,
    channel_stats,
)

try:  # numpy >= 2 (old pickles name numpy.core, which now warns on import)
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct
    from numpy.core.numeric import _frombuffer

CIFAR10_FIX = ("download the 'CIFAR-10 python version' from "
               "https://www.cs.toronto.edu/~kriz/cifar.html and pass the folder "
               "cifar-10-batches-py")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")


def _plain_dtype(*args: object) -> np.dtype:
    dt = np.dtype(*args)
    if dt.hasobject:
        raise pickle.UnpicklingError(f"object dtype {dt} refused")
    return dt


# The official files (Python 2 pickles) need exactly _reconstruct, ndarray and
# dtype; _frombuffer is how numpy pickles arrays with protocol 5.
_PICKLE_GLOBALS = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _plain_dtype}
for _core in ("numpy.core", "numpy._core"):
    _PICKLE_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _reconstruct
    _PICKLE_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _frombuffer


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only the numpy globals a CIFAR-10 batch needs; refuses the rest."""

    def __init__(self, file: object, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _PICKLE_GLOBALS:
            return _PICKLE_GLOBALS[(module, name)]
        raise _err(f"CIFAR-10 file {self.path}", "only dicts, lists, bytes and numpy "
                   "arrays", f"a reference to {module}.{name} (refused)", CIFAR10_FIX)


def _read_pickle(path: Path) -> object:
    if not path.is_file():
        raise _err(f"CIFAR-10 file {path}", "an existing file", "none", CIFAR10_FIX)
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure on an untrusted file
        raise _err(f"CIFAR-10 file {path}", "a complete pickle",
                   f"{type(e).__name__}: {e} (truncated or corrupt)", CIFAR10_FIX) from None


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch as (uint8 (n, 3072), int64 (n,))."""
    d = _read_pickle(path)
    what = f"CIFAR-10 batch {path}"
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        got = f"keys {sorted(map(repr, d))}" if isinstance(d, dict) else type(d).__name__
        raise _err(what, "a dict with keys b'data' and b'labels'", got, CIFAR10_FIX)
    data = d[b"data"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8
            and data.ndim == 2 and data.shape[1] == 3072):
        got = (f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray)
               else type(data).__name__)
        raise _err(what, "b'data' as uint8 (n, 3072)", got, CIFAR10_FIX)
    y = _int_labels(d[b"labels"])
    problem = _label_problem(y, data.shape[0], 10)
    if problem:
        raise _err(what, f"{data.shape[0]} labels in 0..9", problem, CIFAR10_FIX)
    return data, y


def load_cifar10(folder: str | os.PathLike, split: str = "train") -> Dataset:
    """Load one split of the "CIFAR-10 python version" folder (no md5 check).

    Parameters
    ----------
    folder : path
        ``cifar-10-batches-py`` with ``data_batch_1..5``, ``test_batch`` and
        optionally ``batches.meta`` (class names).
    split : {"train", "test"}
        ``"test"`` also streams the train batches once, for ``mean``/``std``.

    Returns
    -------
    Dataset
        images uint8 (50000 | 10000, 3, 32, 32), labels int64. Each train batch
        must have as many rows as ``data_batch_1``.
    """
    _check_split(split)
    root = Path(folder)
    if not root.is_dir():
        raise _err(f"CIFAR-10 folder {root}", "a directory with data_batch_1..5 and "
                   "test_batch", "no such directory", CIFAR10_FIX)
    train = [root / f"data_batch_{i}" for i in range(1, 6)]
    paths = train if split == "train" else [root / "test_batch"]
    images = labels = None
    for i, path in enumerate(paths):  # fill one preallocated array, batch by batch
        data, y = _read_cifar_batch(path)
        rows = data.shape[0]
        if images is None:
            images = np.empty((rows * len(paths), 3072), np.uint8)
            labels = np.empty(rows * len(paths), np.int64)
        elif rows != len(labels) // len(paths):
            raise _err(f"CIFAR-10 batch {path}", f"{len(labels) // len(paths)} rows like "
                       f"{paths[0].name}", rows, CIFAR10_FIX)
        images[i * rows:(i + 1) * rows], labels[i * rows:(i + 1) * rows] = data, y
        del data
    images = images.reshape(-1, 3, 32, 32)
    stats = channel_stats(images) if split == "train" else _stats(
        _read_cifar_batch(p)[0].reshape(-1, 3, 32, 32) for p in train)
    classes = CIFAR10_CLASSES
    meta = _read_pickle(root / "batches.meta") if (root / "batches.meta").is_file() else {}
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if isinstance(names, list) and len(names) == 10:
        classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return Dataset(images, labels, classes, *stats, "cifar10")
