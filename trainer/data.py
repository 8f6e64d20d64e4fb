"""Training data: load CIFAR-10, (Fashion-)MNIST and .npz datasets, normalise,
augment and iterate them in seeded mini-batches.

Images stay uint8 NCHW (a 512 MB device cannot hold a float32 CIFAR-10); only
the current batch becomes float32 in :func:`normalize`. Every problem with a
data file raises :class:`~sparsefedpp.runtime.errors.DataError` naming the file,
what was expected and where to get the data.
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from sparsefedpp.runtime.errors import ConfigError, DataError, DTypeError, ShapeError

try:  # numpy >= 2 (old pickles name numpy.core, which now warns on import)
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct
    from numpy.core.numeric import _frombuffer

CIFAR10_FIX = ("download the 'CIFAR-10 python version' from "
               "https://www.cs.toronto.edu/~kriz/cifar.html and pass the folder "
               "cifar-10-batches-py")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FIX = ("on Debian/Raspberry Pi OS: sudo apt-get install "
                     f"dataset-fashion-mnist (files under {FASHION_MNIST_DIR})")
MNIST_FIX = ("pass a folder with the MNIST IDX files train-images-idx3-ubyte.gz, "
             "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
             "t10k-labels-idx1-ubyte.gz (also accepted without .gz)")
NPZ_FIX = "save it with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(i) for i in range(10))
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
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


# --------------------------------------------------------------------- CIFAR-10
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


# ------------------------------------------------------------------ IDX (MNIST)
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


# ------------------------------------------------------------------------- npz
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


# ------------------------------------------------------------------ dispatcher
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


# ------------------------------------------------------- preprocessing, batches
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
