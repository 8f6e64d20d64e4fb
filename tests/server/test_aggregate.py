"""Tests of server/aggregate.py: weighted_mean and the streaming Accumulator."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sparsefedpp.runtime.errors import ConfigError, DTypeError, ShapeError
from sparsefedpp.server import aggregate as A
from sparsefedpp.server.aggregate import Accumulator, weighted_mean


def _client(rng: np.random.Generator, density: float, steps: int) -> dict:
    """A state-dict-like update: sparse conv/linear weights, dense BN, int64 buffer."""
    conv = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    conv[rng.random(conv.shape) >= density] = 0.0
    fc = rng.standard_normal((10, 8)).astype(np.float32)
    fc[rng.random(fc.shape) >= density] = 0.0
    return {"conv1.weight": conv,
            "bn1.running_var": rng.random(8).astype(np.float32) + 0.5,
            "bn1.num_batches_tracked": np.array(steps, dtype=np.int64),
            "fc.weight": fc}


def _numpy_mean(results: list[tuple[dict, int]]) -> dict:
    """The dense weighted mean, straight from np.average in float64."""
    w = np.array([n for _, n in results], dtype=np.float64)
    return {name: np.average(np.stack([t[name].astype(np.float64) for t, _ in results]),
                             axis=0, weights=w)
            for name in results[0][0]}


@pytest.fixture
def results() -> list[tuple[dict, int]]:
    rng = np.random.default_rng(0)
    # different masks and densities (1 %, 10 %, 50 %, dense): both add() paths
    return [(_client(rng, d, s), n) for d, s, n in
            ((0.01, 100, 500), (0.1, 120, 37), (0.5, 90, 260), (1.0, 101, 3))]


def test_weighted_mean_equals_dense_numpy_mean(results):
    expected = _numpy_mean(results)

    got = weighted_mean(results)

    assert list(got) == list(results[0][0])
    for name in ("conv1.weight", "bn1.running_var", "fc.weight"):
        assert got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=1e-7)
    steps = got["bn1.num_batches_tracked"]
    assert isinstance(steps, np.ndarray)  # not a NumPy scalar: the codec wants arrays
    assert steps.dtype == np.int64 and steps.shape == ()
    # (100*500 + 120*37 + 90*260 + 101*3) / 800 = 78143 / 800 = 97.68..., so 98
    assert int(steps) == 98 == round(float(expected["bn1.num_batches_tracked"]))


def test_sparse_mean_keeps_the_union_of_masks_and_zeros_count(results):
    got = weighted_mean(results[:2])

    union = (results[0][0]["fc.weight"] != 0) | (results[1][0]["fc.weight"] != 0)
    np.testing.assert_array_equal(got["fc.weight"] != 0, union)
    only_first = (results[0][0]["fc.weight"] != 0) & (results[1][0]["fc.weight"] == 0)
    np.testing.assert_allclose(got["fc.weight"][only_first],
                               results[0][0]["fc.weight"][only_first] * 500 / 537,
                               rtol=1e-6)


@pytest.mark.parametrize("threshold", [0.0, 1.01])
def test_sparse_and_dense_add_paths_give_identical_sums(results, monkeypatch,
                                                        threshold):
    reference = weighted_mean(results)
    monkeypatch.setattr(A, "SPARSE_ADD_MAX_DENSITY", threshold)  # all dense / sparse

    got = weighted_mean(results)

    for name in reference:
        np.testing.assert_array_equal(got[name], reference[name])


def test_accumulator_equals_weighted_mean_and_counts(results):
    acc = Accumulator()

    for tensors, n in results:
        acc.add(tensors, n)

    assert acc.num_added == 4 and acc.total_weight == 800
    expected = weighted_mean(results)
    got = acc.result()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
        assert got[name].dtype == expected[name].dtype


@pytest.mark.parametrize(("values", "weights", "expected"), [
    ([1, 2], [1, 1], 2),       # 1.5 rounds half up
    ([-1, -2], [1, 1], -1),    # -1.5 rounds half up too
    ([10, 20], [3, 1], 13),    # 12.5 -> 13
    ([7, 7, 7], [5, 0, 9], 7),
])
def test_integer_buffers_are_the_weighted_mean_rounded_half_up(values, weights,
                                                               expected):
    results = [({"n": np.array(v, dtype=np.int64)}, w)
               for v, w in zip(values, weights, strict=True)]

    got = weighted_mean(results)["n"]

    assert got.dtype == np.int64 and int(got) == expected


@given(arrays(np.float32, (3, 5), elements=st.floats(
           width=32, allow_subnormal=False, min_value=-1e3, max_value=1e3)),
       st.lists(st.integers(1, 5000), min_size=1, max_size=6))
def test_fedavg_of_identical_updates_returns_the_same_update(x, weights):
    results = [({"w": x}, w) for w in weights]

    got = weighted_mean(results)["w"]

    np.testing.assert_array_equal(got, x)


def test_inputs_are_not_modified_or_aliased(results):
    before = {name: t.copy() for name, t in results[0][0].items()}

    got = weighted_mean(results[:1])
    got["fc.weight"][...] = 123.0

    for name, t in results[0][0].items():
        np.testing.assert_array_equal(t, before[name])


def test_mismatched_names_raise_shape_error_naming_the_client(results):
    bad = dict(results[1][0])
    del bad["fc.weight"]
    bad["fc.bias"] = np.zeros(10, np.float32)

    with pytest.raises(ShapeError, match=r"client 1.*fc\.weight.*fc\.bias"):
        weighted_mean([results[0], (bad, 10)])


def test_mismatched_shape_raises_naming_tensor_and_client(results):
    bad = dict(results[2][0], **{"conv1.weight": np.zeros((8, 4, 1, 1), np.float32)})

    with pytest.raises(ShapeError,
                       match=r"'conv1\.weight' of client 2.*\(8, 4, 1, 1\)"):
        weighted_mean([results[0], results[1], (bad, 5)])


def test_a_rejected_add_leaves_the_sums_unchanged(results):
    acc = Accumulator()
    acc.add(*results[0])
    bad = dict(results[1][0], **{"fc.weight": np.zeros((10, 9), np.float32)})

    with pytest.raises(ShapeError):
        acc.add(bad, 37)
    acc.add(*results[1])

    expected = weighted_mean(results[:2])
    for name, arr in acc.result().items():
        np.testing.assert_array_equal(arr, expected[name])


def test_like_fixes_the_reference_before_any_client(results):
    like = {name: np.zeros_like(t) for name, t in results[0][0].items()}
    acc = Accumulator(like)
    wrong = {name: t for name, t in results[0][0].items() if name != "fc.weight"}

    with pytest.raises(ShapeError, match="client 0"):
        acc.add(wrong, 1)


def test_float_where_integer_was_seen_raises_dtype_error():
    with pytest.raises(DTypeError, match="'n' of client 1"):
        weighted_mean([({"n": np.array(3, np.int64)}, 1),
                       ({"n": np.array(3.0, np.float32)}, 1)])


@pytest.mark.parametrize("results", [
    [],
    [({"w": np.ones(3, np.float32)}, 0)],
    [({"w": np.ones(3, np.float32)}, 0), ({"w": np.ones(3, np.float32)}, 0)],
    [({"w": np.ones(3, np.float32)}, -1)],
    [({"w": np.ones(3, np.float32)}, 2.5)],
    [({"w": np.ones(3, np.float32)}, True)],
])
def test_no_clients_zero_total_or_bad_weights_raise_config_error(results):
    with pytest.raises(ConfigError):
        weighted_mean(results)
