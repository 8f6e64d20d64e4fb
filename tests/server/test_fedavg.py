"""Tests of server/fedavg.py and server/strategy.py: sampling, quorum, FedAvg,
pruning of the global model and evaluation at one-shot sparsities."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from sparsefedpp.runtime import models
from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.server.aggregate import weighted_mean
from sparsefedpp.server.fedavg import FedAvg
from sparsefedpp.server.strategy import ClientInstruction, ClientResult, Strategy

IDS = [f"client-{i:03d}" for i in range(100)]
NUM_WEIGHTS = 77_360  # conv/linear weights of ResNet-8 (DESIGN.md)


@pytest.fixture(scope="module")
def model():
    return models.build("resnet8", seed=0)


@pytest.fixture(scope="module")
def prunable(model) -> list[str]:
    return list(model.prunable())


@pytest.fixture(scope="module")
def client_states() -> list[dict]:
    states = [models.build("resnet8", seed=s).state_dict() for s in (1, 2, 3)]
    for i, state in enumerate(states):  # clients saw different numbers of batches
        for name in state:
            if name.endswith("num_batches_tracked"):
                state[name] = np.array(10 * (i + 1), dtype=np.int64)
    return states


def _results(states: list[dict], sizes=(500, 300, 200)) -> list[ClientResult]:
    return [ClientResult(f"c{i}", s, n, {"loss": float(i)})
            for i, (s, n) in enumerate(zip(states, sizes, strict=True))]


def _sparsity(tensors: dict, names: list[str]) -> float:
    total = sum(tensors[n].size for n in names)
    return 1.0 - sum(np.count_nonzero(tensors[n]) for n in names) / total


# ---------------------------------------------------------------------- sampling
def test_fedavg_is_a_strategy():
    assert isinstance(FedAvg(per_round=1), Strategy)
    with pytest.raises(TypeError):
        Strategy()


def test_sampling_is_deterministic_per_seed_and_round():
    a = FedAvg(per_round=10, seed=7).configure_round(3, IDS)
    b = FedAvg(per_round=10, seed=7).configure_round(3, list(reversed(IDS)))

    assert a == b  # same (seed, round, set of ids): same draw, in any input order
    ids = [ins.client_id for ins in a]
    assert len(ids) == len(set(ids)) == 10
    assert set(ids) <= set(IDS)


def test_sampling_differs_across_rounds_and_seeds():
    strategy = FedAvg(per_round=10, seed=0)
    draws = {tuple(i.client_id for i in strategy.configure_round(r, IDS))
             for r in range(5)}
    other_seed = FedAvg(per_round=10, seed=1).configure_round(0, IDS)

    assert len(draws) == 5
    assert [i.client_id for i in other_seed] != [
        i.client_id for i in strategy.configure_round(0, IDS)]


def test_fewer_available_than_per_round_takes_them_all():
    got = FedAvg(per_round=10, min_clients=2).configure_round(0, IDS[:4] + IDS[:2])

    assert sorted(i.client_id for i in got) == IDS[:4]


def test_fewer_available_than_min_clients_skips_the_round(caplog):
    with caplog.at_level(logging.WARNING, logger="sparsefedpp.server.fedavg"):
        got = FedAvg(per_round=10, min_clients=3).configure_round(0, IDS[:2])

    assert got == []
    assert "min_clients=3" in caplog.text


def test_round_config_is_merged_into_every_instruction():
    strategy = FedAvg(per_round=3, round_config=lambda rnd: {"lr": 0.5 / (rnd + 1)})

    got = strategy.configure_round(4, IDS)

    assert all(isinstance(i, ClientInstruction) for i in got)
    assert [i.config for i in got] == [{"round": 4, "lr": 0.1}] * 3
    with pytest.raises(ConfigError, match="round_config"):
        FedAvg(per_round=3, round_config=lambda rnd: 0.1).configure_round(0, IDS)


# ------------------------------------------------------------------- aggregation
def test_aggregate_is_the_weighted_mean_of_the_results(client_states):
    strategy = FedAvg(per_round=3)

    got = strategy.aggregate(1, _results(client_states), [])

    expected = weighted_mean([(s, n) for s, n in
                              zip(client_states, (500, 300, 200), strict=True)])
    assert list(got) == list(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    assert got["bn1.num_batches_tracked"] == 17  # (10*500 + 20*300 + 30*200) / 1000
    assert strategy.last_round["num_examples"] == 1000
    assert strategy.last_round["fit_metrics"] == {"loss": pytest.approx(0.7)}


def test_below_min_clients_returns_none_with_a_logged_reason(client_states, caplog):
    strategy = FedAvg(per_round=3, min_clients=2)
    diverged = {**client_states[1], "fc.weight": np.full((10, 64), np.nan, np.float32)}
    results = [ClientResult("a", client_states[0], 50),
               ClientResult("a", client_states[2], 50),  # a QoS 1 redelivery
               ClientResult("b", diverged, 50),
               ClientResult("c", client_states[2], 0)]

    with caplog.at_level(logging.WARNING, logger="sparsefedpp.server.fedavg"):
        got = strategy.aggregate(2, results, [("d", "deadline")])

    assert got is None
    assert "min_clients=2" in caplog.text and "keeping the previous" in caplog.text
    reasons = dict(strategy.last_round["failures"])
    assert set(reasons) == {"a", "b", "c", "d"}
    assert "NaN" in reasons["b"] and "duplicate" in reasons["a"]
    assert strategy.last_round["num_results"] == 1


def test_a_mismatched_client_is_dropped_and_the_rest_averaged(client_states, model):
    bad = {**client_states[1], "fc.weight": np.zeros((10, 32), np.float32)}
    strategy = FedAvg(per_round=3, min_clients=2, prune_model=model)

    got = strategy.aggregate(0, [ClientResult("x", bad, 10),
                                 *_results(client_states[::2], (1, 3))], [])

    expected = weighted_mean([(client_states[0], 1), (client_states[2], 3)])
    np.testing.assert_array_equal(got["fc.weight"], expected["fc.weight"])
    assert "fc.weight" in dict(strategy.last_round["failures"])["x"]


# ----------------------------------------------------------------------- pruning
@pytest.mark.parametrize("sparsity", [0.9, 0.99])
def test_prune_to_gives_the_global_sparsity_on_the_aggregate(client_states, model,
                                                             prunable, sparsity):
    strategy = FedAvg(per_round=3, prune_to=sparsity, prune_model=model)
    dense = weighted_mean([(s, n) for s, n in
                           zip(client_states, (500, 300, 200), strict=True)])

    got = strategy.aggregate(0, _results(client_states), [])

    kept = sum(np.count_nonzero(got[n]) for n in prunable)
    assert kept == round((1 - sparsity) * NUM_WEIGHTS)
    assert _sparsity(got, prunable) == pytest.approx(sparsity, abs=1e-4)
    # global scope: every surviving weight outranks every pruned one
    survivors = np.concatenate([np.abs(got[n][got[n] != 0]) for n in prunable])
    pruned = np.concatenate([np.abs(dense[n][got[n] == 0]) for n in prunable])
    assert survivors.min() >= pruned.max()
    for name in got:  # kept weights and every non-prunable tensor are untouched
        keep = got[name] != 0
        np.testing.assert_array_equal(got[name][keep], dense[name][keep])
        if name not in prunable:
            np.testing.assert_array_equal(got[name], dense[name])


def test_prune_scope_layer_prunes_every_layer_on_its_own(client_states, model,
                                                         prunable):
    strategy = FedAvg(per_round=3, prune_to=0.9, prune_scope="layer", prune_model=model)

    got = strategy.aggregate(0, _results(client_states), [])

    for name in prunable:  # ZeroFL's per-layer top-k: no layer is emptied
        assert np.count_nonzero(got[name]) == round(0.1 * got[name].size), name
    with pytest.raises(ConfigError, match="prune_scope"):
        FedAvg(per_round=3, prune_to=0.9, prune_scope="channel", prune_model=model)


# -------------------------------------------------------------------- evaluation
def test_evaluate_without_evaluate_fn_is_none(client_states):
    assert FedAvg(per_round=1).evaluate(0, client_states[0]) is None


def test_eval_sparsities_score_pruned_copies(client_states, model, prunable):
    seen = []

    def evaluate_fn(tensors):  # what the engine would see: the tensors' own sparsity
        seen.append(tensors)
        return {"sparsity": _sparsity(tensors, prunable), "accuracy": 0.5}

    levels = (0.9, 0.95, 0.99, 0.995, 0.999)
    strategy = FedAvg(per_round=1, prune_model=model, evaluate_fn=evaluate_fn,
                      eval_sparsities=levels)
    global_model = client_states[0]

    metrics = strategy.evaluate(5, global_model)

    assert metrics["sparsity"] == 0.0
    for s, key in zip(levels, ("0.9", "0.95", "0.99", "0.995", "0.999"), strict=True):
        assert metrics[f"sparsity@{key}"] == pytest.approx(s, abs=1e-4)
        assert metrics[f"accuracy@{key}"] == 0.5
        assert sum(metrics[f"nonzeros@{key}"].values()) == round((1 - s) * NUM_WEIGHTS)
    assert sum(metrics["nonzeros"].values()) == NUM_WEIGHTS
    assert len(seen) == 1 + len(levels)
    assert _sparsity(global_model, prunable) == 0.0  # the input was not pruned


@pytest.mark.parametrize("kwargs", [
    {"per_round": 0},
    {"per_round": 2.0},
    {"per_round": 2, "min_clients": 3},
    {"per_round": 2, "min_clients": 0},
    {"per_round": 2, "seed": -1},
    {"per_round": 2, "round_config": 0.1},
    {"per_round": 2, "prune_to": 0.9},  # no prune_model
    {"per_round": 2, "prune_to": 1.0, "prune_model": "model"},
    {"per_round": 2, "prune_to": float("nan")},
    {"per_round": 2, "eval_sparsities": (0.9,)},  # no evaluate_fn
    {"per_round": 2, "eval_sparsities": (1.5,), "evaluate_fn": dict},
    {"per_round": 2, "evaluate_fn": "accuracy"},
])
def test_bad_settings_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        FedAvg(**kwargs)


def test_constructor_is_keyword_only():
    with pytest.raises(TypeError):
        FedAvg(10)
