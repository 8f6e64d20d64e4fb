"""MNIST and Fashion-MNIST as IDX files, gzip or raw (raw files are
memory-mapped). Fashion-MNIST's default folder is where Debian's package
``dataset-fashion-mnist`` puts it."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from .dataset import Dataset, _check_split, _err, _label_problem, channel_stats

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FIX = ("on Debian/Raspberry Pi OS: sudo apt-get install "
                     f"dataset-fashion-mnist (files under {FASHION_MNIST_DIR})")
MNIST_FIX = ("pass a folder with the MNIST IDX files train-images-idx3-ubyte.gz, "
             "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
             "t10k-labels-idx1-ubyte.gz (also accepted without .gz)")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(i) for i in range(10))
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_idx(path: Path, ndim: int, fix: str) -> np.ndarray:
    """An IDX uint8 array (gzip read into memory, raw memory-mapped)."""
    what = f"IDX {'images' if ndim == 3 else 'labels'} file {path}"
    magic, head_len = 0x800 + ndim, 4 + 4 * ndim
    if not path.is_file():
        raise _err(what, "an existing file", "none", fix)
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        if gz:
            with gzip.open(path, "rb") as f:
                raw = f.read()
            size, head = len(raw), raw[:head_len]
        else:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(head_len)
    except Exception as e:  # noqa: BLE001 - gzip raises OSError, EOFError, zlib.error
        raise _err(what, "a readable (gzip) IDX file", f"{type(e).__name__}: {e} "
                   "(truncated or corrupt)", fix) from None
    got_magic = int.from_bytes(head[:4], "big") if len(head) >= 4 else None
    if got_magic != magic:
        got = "a file shorter than 4 bytes" if got_magic is None else f"0x{got_magic:08x}"
        raise _err(what, f"magic 0x{magic:08x}", got, fix)
    if len(head) < head_len:
        raise _err(what, f"{head_len} header bytes", f"{len(head)}", fix)
    dims = tuple(int.from_bytes(head[4 * i:4 * i + 4], "big") for i in range(1, ndim + 1))
    want = head_len + int(np.prod(dims, dtype=np.int64))
    if size != want:
        raise _err(what, f"{want} bytes for dims {dims}", f"{size} bytes "
                   "(truncated or corrupt)", fix)
    if gz:
        return np.frombuffer(raw, np.uint8, offset=head_len).reshape(dims)
    return np.memmap(path, np.uint8, mode="r", offset=head_len, shape=dims)


def _load_idx(images_path: Path, labels_path: Path,
              fix: str) -> tuple[np.ndarray, np.ndarray]:
    images = _read_idx(images_path, 3, fix)
    labels = _read_idx(labels_path, 1, fix).astype(np.int64)
    if labels.shape[0] != images.shape[0]:
        raise _err(f"IDX labels file {labels_path}", f"{images.shape[0]} labels (one "
                   f"per image in {images_path})", labels.shape[0], fix)
    return images[:, None], labels


def load_idx(images_path: str | os.PathLike,
             labels_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read an IDX image file and its label file, gzip or raw.

    The files have magic 0x00000803 (uint8 images, dims N, H, W) and 0x00000801
    (uint8 labels, dim N), with big-endian uint32 dimension sizes. Returns
    images uint8 (N, 1, H, W) (memory-mapped for raw files) and labels int64 (N,).
    """
    fix = f"check the files are complete IDX files; for Fashion-MNIST {FASHION_MNIST_FIX}"
    return _load_idx(Path(images_path), Path(labels_path), fix)


def _load_idx_dataset(folder: Path, split: str, name: str,
                      classes: tuple[str, ...], fix: str) -> Dataset:
    _check_split(split)
    if not folder.is_dir():
        raise _err(f"{name} folder {folder}", "a directory with the IDX files",
                   "no such directory", fix)

    def find(stem: str) -> Path:
        for path in (folder / f"{stem}.gz", folder / stem):
            if path.is_file():
                return path
        raise _err(f"IDX file {folder / stem}.gz", f"{stem}.gz or {stem} in {folder}",
                   "neither", fix)

    def pair(which: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = _load_idx(*map(find, _IDX_FILES[which]), fix)
        problem = _label_problem(labels, len(labels), len(classes))
        if problem:
            raise _err(f"IDX labels file {find(_IDX_FILES[which][1])}",
                       f"labels in 0..{len(classes) - 1}", problem, fix)
        return images, labels

    images, labels = pair(split)
    stats = channel_stats(images if split == "train" else pair("train")[0])
    return Dataset(images, labels, classes, *stats, name)


def load_fashion_mnist(folder: str | os.PathLike | None = None,
                       split: str = "train") -> Dataset:
    """Fashion-MNIST: images uint8 (60000 | 10000, 1, 28, 28), labels int64.

    ``folder`` defaults to ``/usr/share/datasets/fashion-mnist`` (Debian package
    ``dataset-fashion-mnist``); files are gzip (``*.gz``) or raw IDX.
    """
    return _load_idx_dataset(Path(folder or FASHION_MNIST_DIR), split,
                             "fashion-mnist", FASHION_MNIST_CLASSES, FASHION_MNIST_FIX)


def load_mnist(folder: str | os.PathLike, split: str = "train") -> Dataset:
    """MNIST from a folder of IDX files (same file names as Fashion-MNIST)."""
    return _load_idx_dataset(Path(folder), split, "mnist", MNIST_CLASSES, MNIST_FIX)
