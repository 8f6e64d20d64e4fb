"""Tests of trainer/partition.py: IID and LDA splits, validation hold-out, skew."""

from __future__ import annotations

import numpy as np
import pytest
from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.trainer import partition as P

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """10 classes x 500 examples, shuffled (as a real label array would be)."""
    y = np.repeat(np.arange(NUM_CLASSES, dtype=np.int64), 500)
    return np.random.default_rng(123).permutation(y)


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert allidx.dtype == np.int64
    assert allidx.size == n  # disjoint (no index twice) ...
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))  # ... and covering
    for p in parts:
        assert np.all(np.diff(p) > 0)  # sorted, unique


SPLITS = {
    "iid": lambda y, k, seed: P.iid(y, k, seed=seed),
    "lda0.1": lambda y, k, seed: P.dirichlet(y, k, 0.1, seed=seed),
    "lda1": lambda y, k, seed: P.dirichlet(y, k, 1.0, seed=seed),
    "lda1000": lambda y, k, seed: P.dirichlet(y, k, 1000.0, seed=seed),
}


@pytest.mark.parametrize("name", SPLITS)
@pytest.mark.parametrize("num_clients", [1, 7, 10, 100])
def test_split_is_a_partition_with_nonempty_clients(labels, name, num_clients):
    parts = SPLITS[name](labels, num_clients, 0)

    assert len(parts) == num_clients
    _assert_exact_cover(parts, labels.size)
    assert min(p.size for p in parts) >= 1


@pytest.mark.parametrize("name", SPLITS)
def test_split_is_deterministic_per_seed_and_changes_across_seeds(labels, name):
    a, b, c = (SPLITS[name](labels, 10, seed) for seed in (3, 3, 4))

    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(x.size != z.size or np.any(x != z) for x, z in zip(a, c, strict=True))


@pytest.mark.parametrize("n", [5000, 5003, 10])
def test_iid_sizes_differ_by_at_most_one(n):
    parts = P.iid(np.zeros(n, np.int64), 7, seed=1)

    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == n


def test_skew_grows_as_alpha_falls(labels):
    skew = {a: np.mean([P.label_skew(P.dirichlet(labels, 10, a, seed=s), labels,
                                     NUM_CLASSES) for s in range(3)])
            for a in (0.1, 1.0, 1000.0)}

    assert skew[0.1] > skew[1.0] > skew[1000.0]
    assert skew[0.1] > 0.5


def test_alpha_1000_is_close_to_iid(labels):
    parts = P.dirichlet(labels, 10, 1000.0, seed=0)

    # iid's multinomial noise gives ~0.05 mean TV (500 examples, 10 classes);
    # LDA(1000) cuts every class almost evenly and lands near 0.01.
    assert P.label_skew(parts, labels, NUM_CLASSES) < 0.1
    assert P.label_skew(P.iid(labels, 10, seed=0), labels, NUM_CLASSES) < 0.1
    sizes = np.array([p.size for p in parts])
    assert np.all(np.abs(sizes - 500) < 100)
    hist = P.label_histogram(parts, labels, NUM_CLASSES)
    assert hist.min() > 20  # every client sees every class


def test_label_histogram_counts_and_skew_extremes():
    y = np.array([0, 0, 1, 1, 2, 2], dtype=np.int64)
    one_class_each = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])]
    mixed = [np.array([0, 2, 4]), np.array([1, 3, 5])]

    hist = P.label_histogram(one_class_each, y, 4)

    np.testing.assert_array_equal(hist, [[2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0]])
    assert hist.dtype == np.int64
    assert P.label_skew(one_class_each, y, 3) == pytest.approx(2 / 3)
    assert P.label_skew(mixed, y, 3) == 0.0


@pytest.mark.parametrize("min_size", [1, 20, 50])
def test_dirichlet_min_size_is_met_at_small_alpha(labels, min_size):
    parts = P.dirichlet(labels, 100, 0.05, seed=5, min_size=min_size)

    _assert_exact_cover(parts, labels.size)
    assert min(p.size for p in parts) >= min_size


def test_dirichlet_min_size_at_the_limit_gives_equal_parts(labels):
    parts = P.dirichlet(labels, 10, 0.1, seed=0, min_size=500)

    assert [p.size for p in parts] == [500] * 10
    _assert_exact_cover(parts, labels.size)


def test_cifar_scale_100_clients_over_50000_labels():
    y = np.random.default_rng(0).integers(0, 10, 50_000).astype(np.int64)

    parts = P.dirichlet(y, 100, 1.0, seed=0, min_size=10)

    _assert_exact_cover(parts, y.size)
    assert min(p.size for p in parts) >= 10
    np.testing.assert_array_equal(P.label_histogram(parts, y, 10).sum(axis=0),
                                  np.bincount(y, minlength=10))


def test_labels_with_a_missing_class_are_fine():
    y = np.array([0, 0, 0, 3, 3, 3, 3, 3], dtype=np.int64)

    parts = P.dirichlet(y, 4, 0.5, seed=0, min_size=2)

    _assert_exact_cover(parts, y.size)
    assert [p.size >= 2 for p in parts] == [True] * 4


@pytest.mark.parametrize("share", [0.0, 0.1, 0.25, 0.5, 0.9])
def test_split_validation_sizes_and_cover(labels, share):
    parts = P.dirichlet(labels, 20, 0.3, seed=2)

    train, val = P.split_validation(parts, share, seed=0)

    for p, t, v in zip(parts, train, val, strict=True):
        assert v.size == min(int(np.floor(share * p.size + 0.5)), p.size - 1)
        assert t.size >= 1
        np.testing.assert_array_equal(np.sort(np.concatenate([t, v])), p)
    again = P.split_validation(parts, share, seed=0)[1]
    for v, w in zip(val, again, strict=True):
        np.testing.assert_array_equal(v, w)


def test_split_validation_keeps_one_training_example():
    train, val = P.split_validation([np.array([7]), np.array([1, 2])], 0.9, seed=0)

    assert [t.size for t in train] == [1, 1]
    assert [v.size for v in val] == [0, 1]


@pytest.mark.parametrize("call", [
    lambda y: P.iid(y, 0, seed=0),
    lambda y: P.iid(y, y.size + 1, seed=0),
    lambda y: P.iid(y, 2.5, seed=0),
    lambda y: P.iid(y.astype(np.float32), 2, seed=0),
    lambda y: P.dirichlet(y, 0, 1.0, seed=0),
    lambda y: P.dirichlet(y, 11, 1.0, seed=0, min_size=500),
    lambda y: P.dirichlet(y, 10, 1.0, seed=0, min_size=0),
    lambda y: P.dirichlet(y, 10, 0.0, seed=0),
    lambda y: P.dirichlet(y, 10, -1.0, seed=0),
    lambda y: P.dirichlet(y, 10, float("nan"), seed=0),
    lambda y: P.dirichlet(y, 10, float("inf"), seed=0),
    lambda y: P.dirichlet(y, 10, 1.0, seed=-1),
    lambda y: P.split_validation([np.arange(5)], 1.0, seed=0),
    lambda y: P.split_validation([np.arange(5)], -0.1, seed=0),
    lambda y: P.split_validation([np.arange(5)], float("nan"), seed=0),
    lambda y: P.split_validation([np.arange(0)], 0.1, seed=0),
    lambda y: P.label_histogram([np.arange(5)], y, 5),
    lambda y: P.label_skew([np.arange(0)], y, 10),
])
def test_bad_arguments_raise_config_error(labels, call):
    with pytest.raises(ConfigError):
        call(labels)
