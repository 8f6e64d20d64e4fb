"""Datasets as ``.npz`` files (``x_train, y_train, x_test, y_test``); an
uncompressed file's split is memory-mapped, so a device's shard stays on disk."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from sparsefedpp.runtime.errors import DataError

from .dataset import (
    Dataset,
    _check_split,
    _err,
    _int_labels,
    _label_problem,
    channel_stats,
)

NPZ_FIX = "save it with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"


def _npz_images(x: np.ndarray, what: str) -> np.ndarray:
    if x.dtype != np.uint8 or x.ndim not in (3, 4):
        raise _err(what, "uint8 images NCHW, NHWC or NHW", f"{x.dtype} {x.shape}",
                   NPZ_FIX)
    if x.ndim == 3:
        return x[:, None]
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x


def _mapped_member(path: Path, key: str) -> np.ndarray | None:
    """A read-only memory map of ``key``.npy inside an uncompressed .npz (what
    np.savez writes), or None when the member is compressed or unusual: a
    device's shard then stays on disk and only the batches it reads come in."""
    import zipfile

    from numpy.lib import format as npformat

    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(f"{key}.npy")
            if info.compress_type != zipfile.ZIP_STORED:
                return None
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                return None
            name_len = int.from_bytes(local[26:28], "little")
            extra_len = int.from_bytes(local[28:30], "little")
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = npformat.read_magic(f)
            read_header = (npformat.read_array_header_1_0 if version == (1, 0)
                           else npformat.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
        if fortran or dtype != np.uint8 or dtype.hasobject:
            return None
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    except (OSError, KeyError, ValueError, AttributeError, zipfile.BadZipFile):
        return None


def load_npz(path: str | os.PathLike, split: str = "train") -> Dataset:
    """Load a split from an ``.npz`` with ``x_train, y_train, x_test, y_test``.

    Images uint8 NCHW, NHWC (last dim 1 or 3 and dim 1 not) or NHW (gray); in
    an uncompressed .npz (np.savez, ``sparsefedpp partition``) the split's
    images are memory-mapped, not read into memory.
    labels integer (N,) or (N, 1). An optional ``classes`` string array names
    the classes, else ``"0".."K-1"`` with K = max label + 1 over both splits.
    Returns images uint8 (N, C, H, W) and labels int64 (N,).
    """
    _check_split(split)
    path = Path(path)
    if not path.is_file():
        raise _err(f"npz file {path}", "an existing file", "none", NPZ_FIX)
    keys = ["x_train", "y_train", "x_test", "y_test"]
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
            if set(keys) - set(f.files):
                raise _err(f"npz file {path}", ", ".join(keys), sorted(f.files), NPZ_FIX)
            key = f"x_{split}"
            mapped = _mapped_member(path, key)
            x = _npz_images(f[key] if mapped is None else mapped,
                            f"npz file {path} key {key}")
            x_train = x if split == "train" else _npz_images(
                f["x_train"], f"npz file {path} key x_train")
            ys = [_int_labels(f["y_train"]), _int_labels(f["y_test"])]
            classes = tuple(map(str, f["classes"])) if "classes" in f.files else None
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure on an untrusted file
        raise _err(f"npz file {path}", "a readable .npz without pickled objects",
                   f"{type(e).__name__}: {e}", NPZ_FIX) from None
    if classes is None:
        top = [int(y.max()) for y in ys if y is not None and y.size]
        classes = tuple(str(i) for i in range(max(top, default=-1) + 1))
    y = ys[split == "test"]
    problem = _label_problem(y, len(x), len(classes))
    if problem:
        raise _err(f"npz file {path} key y_{split}", f"{len(x)} labels in "
                   f"0..{len(classes) - 1}", problem, NPZ_FIX)
    return Dataset(x, y, classes, *channel_stats(x_train), path.stem)
