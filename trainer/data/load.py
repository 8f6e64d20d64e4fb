"""Which loader a dataset spec string names (a folder, a file or a short name)."""

from __future__ import annotations

import os
from pathlib import Path

from .cifar import CIFAR10_FIX, load_cifar10
from .dataset import Dataset, _check_split, _err
from .idx import _IDX_FILES, FASHION_MNIST_FIX, load_fashion_mnist, load_mnist
from .npz import load_npz


def load_dataset(spec: str, split: str = "train") -> Dataset:
    """Load a split from a spec string.

    Accepted: a CIFAR-10 python folder (has ``data_batch_1``); a folder of
    MNIST-style IDX files (named ``"fashion-mnist"`` if the path contains
    "fashion", else ``"mnist"``); a ``.npz`` file; ``"cifar10"`` (folder from
    ``$SPARSEFEDPP_DATA``: the batches folder or its parent); ``"fashion-mnist"``
    (the Debian default folder).
    """
    _check_split(split)
    if spec == "cifar10":
        root = os.environ.get("SPARSEFEDPP_DATA")
        if not root:
            raise _err("dataset 'cifar10'", "SPARSEFEDPP_DATA to name the CIFAR-10 "
                       "folder", "it unset", f"pass the folder instead; {CIFAR10_FIX}")
        nested = Path(root) / "cifar-10-batches-py"
        return load_cifar10(nested if nested.is_dir() else root, split)
    if spec == "fashion-mnist":
        return load_fashion_mnist(None, split)
    path = Path(spec)
    if (path / "data_batch_1").is_file():
        return load_cifar10(path, split)
    idx_names = [s + ext for pair in _IDX_FILES.values() for s in pair for ext in ("", ".gz")]
    if any((path / name).is_file() for name in idx_names):
        if "fashion" in str(path).lower():
            return load_fashion_mnist(path, split)
        return load_mnist(path, split)
    if path.suffix == ".npz" and path.is_file():
        return load_npz(path, split)
    got = ("a folder without dataset files" if path.is_dir() else
           "a file that is not .npz" if path.exists() else "no such file or folder")
    raise _err(f"dataset spec {spec!r}", "a CIFAR-10 python folder, a folder of MNIST "
               "IDX files, a .npz file, 'cifar10' or 'fashion-mnist'", got,
               f"{CIFAR10_FIX}; or {FASHION_MNIST_FIX}")
