"""Tests for sparsefedpp.trainer.data: loaders on real and fake files, errors,
normalisation, augmentation and batch iteration."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from sparsefedpp.runtime.errors import ConfigError, DataError
from sparsefedpp.trainer import data as D
from sparsefedpp.trainer.data.idx import _IDX_FILES as IDX_FILES


# ------------------------------------------------------------------- helpers
def write_cifar(folder: Path, rows: int = 4, seed: int = 0, protocol: int = 4,
                meta: bool = True) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A tiny CIFAR-10 python folder; returns what each batch holds."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    content = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (rows, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, rows)]
        (folder / name).write_bytes(pickle.dumps({b"data": x, b"labels": y},
                                                 protocol=protocol))
        content[name] = (x, y)
    if meta:
        names = [f"c{i}".encode() for i in range(10)]
        (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    return content


def idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    magic = 0x800 + arr.ndim if magic is None else magic
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + \
        arr.astype(np.uint8).tobytes()


def write_idx(folder: Path, n_train: int = 6, n_test: int = 3, gz: bool = True,
              seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        img_stem, lab_stem = IDX_FILES[split]
        arrays[img_stem] = rng.integers(0, 256, (n, 5, 4), dtype=np.uint8)
        arrays[lab_stem] = rng.integers(0, 10, n, dtype=np.uint8)
    for stem, arr in arrays.items():
        raw = idx_bytes(arr)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)
    return arrays


def raises_data_error(path: Path, *fragments: str):
    """Context manager: a DataError whose message names ``path`` and fragments."""
    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(DataError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            swallowed = self.ctx.__exit__(*exc)
            msg = str(self.info.value)
            assert str(path) in msg, msg
            assert "expected" in msg and "got" in msg, msg
            for fragment in fragments:
                assert fragment in msg, msg
            return swallowed
    return _Check()


# ------------------------------------------------------------- real CIFAR-10
@pytest.fixture(scope="module")
def cifar(cifar_dir) -> tuple[D.Dataset, D.Dataset]:
    return D.load_cifar10(cifar_dir, "train"), D.load_cifar10(cifar_dir, "test")


def test_real_cifar10(cifar):
    train, test = cifar
    assert train.images.shape == (50000, 3, 32, 32) and len(train) == 50000
    assert test.images.shape == (10000, 3, 32, 32) and len(test) == 10000
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int64
    assert np.bincount(train.labels, minlength=10).tolist() == [5000] * 10
    assert np.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    np.testing.assert_allclose(train.mean, (0.4914, 0.4822, 0.4465), atol=2e-3)
    np.testing.assert_allclose(train.std, (0.2470, 0.2435, 0.2616), atol=2e-3)
    assert test.mean == train.mean and test.std == train.std
    assert train.classes[0] == "airplane" and train.classes[9] == "truck"
    assert train.name == "cifar10"


def test_real_cifar10_batches(cifar):
    x, y = next(D.batches(cifar[1], 256, seed=0, augment=True))
    assert x.shape == (256, 3, 32, 32) and x.dtype == np.float32
    assert y.dtype == np.int64 and abs(float(x.mean())) < 0.5


def test_real_fashion_mnist(fashion_mnist_dir):
    train = D.load_fashion_mnist()
    test = D.load_dataset("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape[0] == 10000
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert train.classes[0] == "T-shirt/top" and test.name == "fashion-mnist"
    assert test.mean == train.mean and 0.2 < train.mean[0] < 0.4


# ------------------------------------------------------------- fake CIFAR-10
@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_fake_cifar_round_trip(tmp_path, protocol):
    content = write_cifar(tmp_path / "c", protocol=protocol)
    train = D.load_cifar10(tmp_path / "c")
    want = np.concatenate([content[f"data_batch_{i}"][0] for i in range(1, 6)])
    np.testing.assert_array_equal(train.images, want.reshape(-1, 3, 32, 32))
    assert train.labels.tolist() == [v for i in range(1, 6)
                                     for v in content[f"data_batch_{i}"][1]]
    assert train.classes == tuple(f"c{i}" for i in range(10))
    test = D.load_dataset(str(tmp_path / "c"), "test")
    np.testing.assert_array_equal(test.images.reshape(-1, 3072), content["test_batch"][0])
    assert test.mean == train.mean == D.channel_stats(train.images)[0]


def test_fake_cifar_without_meta_uses_standard_names(tmp_path):
    write_cifar(tmp_path, meta=False)
    assert D.load_cifar10(tmp_path, "test").classes == D.CIFAR10_CLASSES


def test_cifar_missing_folder_and_file(tmp_path):
    with raises_data_error(tmp_path / "nope", "cs.toronto.edu", "cifar-10-batches-py"):
        D.load_cifar10(tmp_path / "nope")
    write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with raises_data_error(tmp_path / "data_batch_3", "existing file"):
        D.load_cifar10(tmp_path)


def test_cifar_truncated_pickle(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "test_batch"
    path.write_bytes(path.read_bytes()[:5000])
    with raises_data_error(path, "truncated"):
        D.load_cifar10(tmp_path, "test")
    path.write_bytes(b"")
    with raises_data_error(path, "complete pickle"):
        D.load_cifar10(tmp_path, "test")


@pytest.mark.parametrize("batch, fragment", [
    ({b"images": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, "b'data'"),
    ([1, 2, 3], "b'labels'"),
    ({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, "(2, 3000)"),
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "float32"),
    ({b"data": b"x" * 6144, b"labels": [0, 1]}, "bytes"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "1 labels"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "0..10"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": ["a", "b"]}, "integer"),
])
def test_cifar_bad_content(tmp_path, batch, fragment):
    write_cifar(tmp_path)
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps(batch, protocol=4))
    with raises_data_error(path, fragment):
        D.load_cifar10(tmp_path, "test")


def test_cifar_batches_of_different_size(tmp_path):
    write_cifar(tmp_path)
    x = np.zeros((3, 3072), np.uint8)
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps({b"data": x, b"labels": [0] * 3}))
    with raises_data_error(tmp_path / "data_batch_2", "4 rows"):
        D.load_cifar10(tmp_path)


class _Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


def test_cifar_hostile_pickle_is_refused(tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    path = tmp_path / "test_batch"
    for payload in (_Evil(f"touch {marker}"), _EvalEvil()):
        path.write_bytes(pickle.dumps({b"data": payload, b"labels": [0]}))
        with raises_data_error(path, "refused"):
            D.load_cifar10(tmp_path, "test")
    assert not marker.exists()
    # Python 3 protocol 2 needs _codecs.encode for bytes: not a numpy name, refused
    path.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8),
                                   b"labels": [0]}, protocol=2))
    with raises_data_error(path, "_codecs.encode"):
        D.load_cifar10(tmp_path, "test")
    # an object-dtype array would smuggle arbitrary objects: refused too
    obj = np.array([1, "x"], dtype=object)
    path.write_bytes(pickle.dumps({b"data": obj, b"labels": [0]}))
    with raises_data_error(path, "object dtype"):
        D.load_cifar10(tmp_path, "test")


# ----------------------------------------------------------------------- IDX
@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    arrays = write_idx(tmp_path, gz=gz)
    suffix = ".gz" if gz else ""
    images, labels = D.load_idx(tmp_path / f"train-images-idx3-ubyte{suffix}",
                                tmp_path / f"train-labels-idx1-ubyte{suffix}")
    assert images.shape == (6, 1, 5, 4) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(images[:, 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(labels, arrays["train-labels-idx1-ubyte"])
    if not gz:
        assert isinstance(images.base, np.memmap) or isinstance(images, np.memmap)


def test_idx_folder_loaders_and_dispatch(tmp_path):
    arrays = write_idx(tmp_path / "fashion", gz=True)
    write_idx(tmp_path / "digits", gz=False)
    fm = D.load_dataset(str(tmp_path / "fashion"), "test")
    assert fm.name == "fashion-mnist" and fm.classes == D.FASHION_MNIST_CLASSES
    np.testing.assert_array_equal(fm.images[:, 0], arrays["t10k-images-idx3-ubyte"])
    train_stats = D.channel_stats(arrays["train-images-idx3-ubyte"][:, None])
    assert (fm.mean, fm.std) == train_stats
    mn = D.load_dataset(str(tmp_path / "digits"))
    assert mn.name == "mnist" and len(mn) == 6 and mn.classes[3] == "3"


def test_idx_bad_magic(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((2, 3, 3)), magic=0x00000801))
    lab = tmp_path / "labels"
    lab.write_bytes(idx_bytes(np.zeros(2)))
    with raises_data_error(path, "0x00000803", "0x00000801", "dataset-fashion-mnist"):
        D.load_idx(path, lab)
    path.write_bytes(b"\x00\x00")
    with raises_data_error(path, "shorter than 4 bytes"):
        D.load_idx(path, lab)


def test_idx_truncated(tmp_path):
    img = tmp_path / "img"
    lab = tmp_path / "lab"
    lab.write_bytes(idx_bytes(np.zeros(2)))
    raw = idx_bytes(np.zeros((2, 3, 3)))
    img.write_bytes(raw[:-1])
    with raises_data_error(img, "34 bytes", "33 bytes"):
        D.load_idx(img, lab)
    img.write_bytes(raw[:10])
    with raises_data_error(img, "header bytes"):
        D.load_idx(img, lab)
    img.write_bytes(gzip.compress(raw)[:-12])  # gzip stream cut off
    with raises_data_error(img, "truncated"):
        D.load_idx(img, lab)


def test_idx_label_count_and_range(tmp_path):
    img = tmp_path / "img"
    lab = tmp_path / "lab"
    img.write_bytes(idx_bytes(np.zeros((3, 2, 2))))
    lab.write_bytes(idx_bytes(np.zeros(2)))
    with raises_data_error(lab, "3 labels", str(img)):
        D.load_idx(img, lab)
    write_idx(tmp_path / "m")
    bad = np.array([0, 1, 12, 3, 4, 5], np.uint8)
    path = tmp_path / "m" / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(bad)))
    with raises_data_error(path, "0..9", "0..12"):
        D.load_mnist(tmp_path / "m")


def test_idx_missing_folder_and_file(tmp_path):
    with raises_data_error(tmp_path / "none", "apt-get install dataset-fashion-mnist"):
        D.load_fashion_mnist(tmp_path / "none")
    write_idx(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with raises_data_error(tmp_path / "t10k-labels-idx1-ubyte", "neither"):
        D.load_mnist(tmp_path, "test")


# ----------------------------------------------------------------------- npz
@pytest.mark.parametrize("layout", ["NHWC", "NCHW", "NHW", "NHWC1"])
def test_npz_layouts(tmp_path, layout):
    rng = np.random.default_rng(1)
    c = 1 if layout in ("NHW", "NHWC1") else 3
    nchw = {s: rng.integers(0, 256, (n, c, 6, 5), dtype=np.uint8)
            for s, n in (("train", 7), ("test", 4))}
    store = {
        "NCHW": lambda a: a, "NHW": lambda a: a[:, 0],
        "NHWC": lambda a: a.transpose(0, 2, 3, 1), "NHWC1": lambda a: a.transpose(0, 2, 3, 1),
    }[layout]
    path = tmp_path / "toy.npz"
    np.savez(path, x_train=store(nchw["train"]), x_test=store(nchw["test"]),
             y_train=np.arange(7) % 3, y_test=(np.arange(4) % 3)[:, None])
    train, test = D.load_npz(path), D.load_dataset(str(path), "test")
    np.testing.assert_array_equal(train.images, nchw["train"])
    np.testing.assert_array_equal(test.images, nchw["test"])
    assert test.labels.tolist() == [0, 1, 2, 0] and test.labels.dtype == np.int64
    assert train.classes == ("0", "1", "2") and train.name == "toy"
    assert test.mean == train.mean == D.channel_stats(nchw["train"])[0]


def test_npz_classes_and_errors(tmp_path):
    x = np.zeros((2, 3, 4, 4), np.uint8)
    path = tmp_path / "a.npz"
    np.savez(path, x_train=x, y_train=[0, 1], x_test=x, y_test=[1, 0],
             classes=np.array(["cat", "dog"]))
    assert D.load_npz(path).classes == ("cat", "dog")
    np.savez(path, x_train=x, y_train=[0, 1], x_test=x, y_test=[1, 2],
             classes=np.array(["cat", "dog"]))
    with raises_data_error(path, "y_test", "in 0..1", "in 1..2"):
        D.load_npz(path, "test")
    np.savez(path, x_train=x, y_train=[0, 1])
    with raises_data_error(path, "x_test"):
        D.load_npz(path)
    np.savez(path, x_train=x.astype(np.float32), y_train=[0], x_test=x, y_test=[0, 0])
    with raises_data_error(path, "float32"):
        D.load_npz(path)
    np.savez(path, x_train=x, y_train=np.array([0, None], dtype=object), x_test=x,
             y_test=[0, 0])
    with raises_data_error(path, "pickled"):
        D.load_npz(path)
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with raises_data_error(path, "readable"):
        D.load_npz(path)


# ---------------------------------------------------------------- dispatcher
def test_load_dataset_specs(tmp_path, monkeypatch):
    write_cifar(tmp_path / "cifar-10-batches-py")
    monkeypatch.setenv("SPARSEFEDPP_DATA", str(tmp_path))
    assert len(D.load_dataset("cifar10", "test")) == 4
    monkeypatch.setenv("SPARSEFEDPP_DATA", str(tmp_path / "cifar-10-batches-py"))
    assert len(D.load_dataset("cifar10")) == 20
    monkeypatch.delenv("SPARSEFEDPP_DATA")
    with pytest.raises(DataError, match="SPARSEFEDPP_DATA"):
        D.load_dataset("cifar10")
    for spec, got in ((tmp_path / "missing", "no such file"),
                      (tmp_path, "without dataset files")):
        with raises_data_error(spec, got, ".npz", "'fashion-mnist'", "cs.toronto.edu"):
            D.load_dataset(str(spec))
    with pytest.raises(ConfigError, match="split"):
        D.load_dataset(str(tmp_path / "cifar-10-batches-py"), "valid")


# ------------------------------------------------------ stats and preprocessing
def test_channel_stats_matches_float64():
    x = np.random.default_rng(2).integers(0, 256, (2500, 3, 5, 4), dtype=np.uint8)
    mean, std = D.channel_stats(x)
    f = x.astype(np.float64) / 255
    np.testing.assert_allclose(mean, f.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, f.std(axis=(0, 2, 3)), rtol=1e-9)
    assert D.channel_stats(np.full((2, 1, 2, 2), 7, np.uint8))[1] == (1.0,)


def test_normalize_matches_formula_and_reuses_out():
    x = np.random.default_rng(3).integers(0, 256, (5, 3, 4, 4), dtype=np.uint8)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    want = (x / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    got = D.normalize(x, mean, std)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    out = np.empty(x.shape, np.float32)
    assert D.normalize(x, mean, std, out=out) is out
    np.testing.assert_array_equal(out, got)


def _crops(padded: np.ndarray, h: int, w: int):
    for dy in range(padded.shape[1] - h + 1):
        for dx in range(padded.shape[2] - w + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            yield crop
            yield crop[:, :, ::-1]


def test_augment_crop_flip_is_a_crop_or_its_flip():
    x = np.random.default_rng(4).integers(1, 256, (16, 3, 8, 8), dtype=np.uint8)
    out = D.augment_crop_flip(x, np.random.default_rng(0), pad=2)
    assert out.shape == x.shape and out.dtype == np.uint8
    for i in range(len(x)):
        padded = np.pad(x[i], ((0, 0), (2, 2), (2, 2)))
        assert any(np.array_equal(out[i], c) for c in _crops(padded, 8, 8)), i
    again = D.augment_crop_flip(x, np.random.default_rng(0), pad=2)
    np.testing.assert_array_equal(out, again)
    assert not np.array_equal(out, x)


def test_augment_pad0_is_identity_or_flip():
    x = np.random.default_rng(5).integers(0, 256, (64, 1, 5, 7), dtype=np.uint8)
    out = D.augment_crop_flip(x, np.random.default_rng(1), pad=0)
    same = [np.array_equal(o, i) for o, i in zip(out, x)]
    flipped = [np.array_equal(o, i[:, :, ::-1]) for o, i in zip(out, x)]
    assert all(s or f for s, f in zip(same, flipped))
    assert 10 < sum(same) < 54  # both branches taken


# ------------------------------------------------------------------- batches
def _toy(n: int = 23) -> D.Dataset:
    images = (np.arange(n, dtype=np.uint8)[:, None, None, None]
              * np.ones((1, 2, 3, 3), np.uint8))
    return D.Dataset(images, np.arange(n, dtype=np.int64),
                     tuple(map(str, range(n))), (0.5, 0.5), (0.2, 0.2), "toy")


def test_batches_cover_each_index_once_and_are_deterministic():
    ds = _toy()
    run = list(D.batches(ds, 5, seed=7))
    assert [len(y) for _, y in run] == [5, 5, 5, 5, 3]
    ys = np.concatenate([y for _, y in run])
    assert sorted(ys.tolist()) == list(range(23)) and ys.tolist() != list(range(23))
    for x, y in run:
        np.testing.assert_array_equal(x, D.normalize(ds.images[y], ds.mean, ds.std))
    again = list(D.batches(ds, 5, seed=7))
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
               for a, b in zip(run, again))
    other = np.concatenate([y for _, y in D.batches(ds, 5, seed=8)])
    assert other.tolist() != ys.tolist()


def test_batches_options():
    ds = _toy()
    plain = np.concatenate([y for _, y in D.batches(ds, 4, seed=0, shuffle=False)])
    assert plain.tolist() == list(range(23))
    dropped = [len(y) for _, y in D.batches(ds, 4, seed=0, drop_last=True)]
    assert dropped == [4] * 5
    aug = list(D.batches(ds, 8, seed=3, augment=True))
    assert aug[0][0].shape == (8, 2, 3, 3) and aug[0][0].dtype == np.float32
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="batch_size"):
            D.batches(ds, bad, seed=0)


def test_dataset_subset_and_len():
    ds = _toy(10)
    sub = ds.subset([3, 1])
    assert len(sub) == 2 and sub.labels.tolist() == [3, 1]
    assert sub.images[0, 0, 0, 0] == 3 and sub.mean == ds.mean
    assert ds.subset(ds.labels % 2 == 0).labels.tolist() == [0, 2, 4, 6, 8]


@pytest.mark.parametrize("save, mapped", [(np.savez, True),
                                          (np.savez_compressed, False)])
def test_npz_images_are_memory_mapped_when_stored_uncompressed(tmp_path, save, mapped):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 3, 8, 8), dtype=np.uint8)
    path = tmp_path / "shard.npz"
    save(path, x_train=x, y_train=np.arange(6) % 3, x_test=x[:2], y_test=np.arange(2))

    train, test = D.load_npz(path, "train"), D.load_npz(path, "test")

    assert isinstance(train.images, np.memmap) == mapped
    np.testing.assert_array_equal(train.images, x)
    np.testing.assert_array_equal(test.images, x[:2])
    np.testing.assert_array_equal(train.subset([4, 1]).images, x[[4, 1]])
