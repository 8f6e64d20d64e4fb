"""Tests of server/fedavg.py and server/strategy.py: sampling, quorum, FedAvg,
pruning of the global model and evaluation at one-shot sparsities."""

from __future__ import annotations

import inspect
import logging

import numpy as np
import pytest
from sparsefedpp.runtime import models
from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.runtime.sparsity import pruning
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
    # Arrange
    strategy = FedAvg(per_round=2, seed=0)
    callbacks = Strategy.__abstractmethods__

    # Assert: FedAvg implements every callback of the interface itself, with the
    # interface's parameters (the round loop calls them by keyword too) ...
    assert callbacks and isinstance(strategy, Strategy)
    with pytest.raises(TypeError):
        Strategy()
    for name in callbacks:
        assert name in vars(FedAvg), f"FedAvg inherits the abstract {name}"
        ours, interface = (inspect.signature(getattr(cls, name)).parameters
                           for cls in (FedAvg, Strategy))
        assert list(ours) == list(interface), name
    # ... and answers as the interface documents: instructions for the picked
    # clients, no tensors when there is nothing to aggregate or no server-side evaluation
    picked = strategy.configure_round(1, IDS)
    assert len(picked) == 2 and all(isinstance(i, ClientInstruction) for i in picked)
    nothing = strategy.aggregate(1, [], [(picked[0].client_id, "timeout")])
    assert nothing.tensors is None and nothing.num_results == 0
    assert nothing.failures == [(picked[0].client_id, "timeout")]
    assert strategy.evaluate(1, {}) is None


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

    out = strategy.aggregate(1, _results(client_states), [])
    got = out.tensors

    expected = weighted_mean([(s, n) for s, n in
                              zip(client_states, (500, 300, 200), strict=True)])
    assert list(got) == list(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    assert got["bn1.num_batches_tracked"] == 17  # (10*500 + 20*300 + 30*200) / 1000
    assert out.num_examples == 1000
    assert out.fit_metrics == {"loss": pytest.approx(0.7)}


def test_below_min_clients_returns_none_with_a_logged_reason(client_states, caplog):
    strategy = FedAvg(per_round=3, min_clients=2)
    diverged = {**client_states[1], "fc.weight": np.full((10, 64), np.nan, np.float32)}
    results = [ClientResult("a", client_states[0], 50),
               ClientResult("a", client_states[2], 50),  # a QoS 1 redelivery
               ClientResult("b", diverged, 50),
               ClientResult("c", client_states[2], 0)]

    with caplog.at_level(logging.WARNING, logger="sparsefedpp.server.fedavg"):
        out = strategy.aggregate(2, results, [("d", "deadline")])
        got = out.tensors

    assert got is None
    assert "min_clients=2" in caplog.text and "keeping the previous" in caplog.text
    reasons = dict(out.failures)
    assert set(reasons) == {"a", "b", "c", "d"}
    assert "NaN" in reasons["b"] and "duplicate" in reasons["a"]
    assert out.num_results == 1


def test_a_mismatched_client_is_dropped_and_the_rest_averaged(client_states, model):
    bad = {**client_states[1], "fc.weight": np.zeros((10, 32), np.float32)}
    strategy = FedAvg(per_round=3, min_clients=2, prune_model=model)

    out = strategy.aggregate(0, [ClientResult("x", bad, 10),
                                 *_results(client_states[::2], (1, 3))], [])
    got = out.tensors

    expected = weighted_mean([(client_states[0], 1), (client_states[2], 3)])
    np.testing.assert_array_equal(got["fc.weight"], expected["fc.weight"])
    assert "fc.weight" in dict(out.failures)["x"]


# ----------------------------------------------------------------------- pruning
@pytest.mark.parametrize("sparsity", [0.9, 0.99])
def test_prune_to_gives_the_global_sparsity_on_the_aggregate(client_states, model,
                                                             prunable, sparsity):
    strategy = FedAvg(per_round=3, prune_to=sparsity, prune_model=model)
    dense = weighted_mean([(s, n) for s, n in
                           zip(client_states, (500, 300, 200), strict=True)])

    out = strategy.aggregate(0, _results(client_states), [])
    got = out.tensors

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

    out = strategy.aggregate(0, _results(client_states), [])
    got = out.tensors

    for name in prunable:  # ZeroFL's per-layer top-k: no layer is emptied
        assert np.count_nonzero(got[name]) == round(0.1 * got[name].size), name
    with pytest.raises(ConfigError, match="prune_scope"):
        FedAvg(per_round=3, prune_to=0.9, prune_scope="channel", prune_model=model)


def _pruned_states(states: list[dict], sparsity: float) -> list[dict]:
    """The clients' models after their own global pruning (different masks)."""
    out = []
    for state in states:
        m = models.build("resnet8", seed=0)
        m.load_state_dict(state)
        pruning.prune(m, sparsity)
        out.append(m.state_dict())
    return out


def test_by_default_the_aggregate_of_pruned_models_is_not_pruned_again(client_states,
                                                                        model, prunable):
    pruned = _pruned_states(client_states, 0.9)  # as the reference: clients prune
    strategy = FedAvg(per_round=3, prune_model=model)

    out = strategy.aggregate(0, _results(pruned), [])
    got = out.tensors

    want = weighted_mean([(s, n) for s, n in zip(pruned, (500, 300, 200), strict=True)])
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    assert _sparsity(got, prunable) < 0.9 - 0.05  # the union of three masks


def test_evaluate_global_scores_the_model_as_is_and_pruned_to_s(client_states, model,
                                                                prunable):
    def evaluate_fn(tensors):
        return {"sparsity": _sparsity(tensors, prunable), "accuracy": 0.5}

    strategy = FedAvg(per_round=1, prune_model=model, evaluate_fn=evaluate_fn,
                      eval_pruned=0.999, prune_floor=3, eval_sparsities=(0.99,))

    every_round = strategy.evaluate_global(client_states[0])
    last_round = strategy.evaluate(3, client_states[0])

    for metrics in (every_round, last_round):
        assert metrics["sparsity"] == 0.0 and metrics["density"] == 1.0
        assert metrics["sparsity_pruned"] == pytest.approx(0.999, abs=1e-5)
        assert metrics["accuracy_pruned"] == 0.5
        counts = metrics["nonzeros_pruned"]
        assert sum(counts.values()) == round(0.001 * NUM_WEIGHTS)
        assert min(counts.values()) >= 3  # the floor: no layer emptied
    assert "accuracy@0.99" in last_round and "accuracy@0.99" not in every_round
    assert min(last_round["nonzeros@0.99"].values()) >= 3
    assert FedAvg(per_round=1).evaluate_global(client_states[0]) == {}


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
    {"per_round": 2, "eval_pruned": 0.9},  # no evaluate_fn
    {"per_round": 2, "eval_pruned": 0.9, "evaluate_fn": dict},  # no prune_model
    {"per_round": 2, "eval_pruned": 1.0, "evaluate_fn": dict, "prune_model": "m"},
    {"per_round": 2, "prune_floor": -1},
    {"per_round": 2, "eval_sparsities": (1.5,), "evaluate_fn": dict},
    {"per_round": 2, "evaluate_fn": "accuracy"},
    {"per_round": 2, "aggregator": "krum"},
    {"per_round": 2, "aggregator": "median"},  # no initial global model
    {"per_round": 2, "trim": 0.5},
    {"per_round": 2, "screen_median": 0.5},
    {"per_round": 2, "screen_global": float("inf")},
    {"per_round": 2, "screen_median": "ten"},
    {"per_round": 2, "max_examples": 0},
])
def test_bad_settings_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        FedAvg(**kwargs)


def test_constructor_is_keyword_only():
    with pytest.raises(TypeError):
        FedAvg(10)


# ------------------------------------------------- screening and robust aggregation
def _honest(g: dict, count: int, seed: int = 0,
            scale: float = 0.01) -> list[ClientResult]:
    """Clients that moved a little from the global model ``g``."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        t = {k: (v + scale * rng.normal(size=v.shape)).astype(np.float32)
             if v.dtype.kind == "f" else v + 5 for k, v in g.items()}
        out.append(ClientResult(f"h{i}", t, 100 + i, {"loss": 1.0}))
    return out


def _attack(g: dict, honest: ClientResult, cid: str, fn) -> ClientResult:
    t = {k: fn(g[k].astype(np.float64), v.astype(np.float64)).astype(np.float32)
         if v.dtype.kind == "f" else v for k, v in honest.tensors.items()}
    return ClientResult(cid, t, 100, {"loss": 1.0})


@pytest.fixture(scope="module")
def global_state() -> dict:
    return models.build("resnet8", seed=9).state_dict()


@pytest.mark.parametrize("aggregator", ["fedavg", "clip", "trimmed-mean", "median"])
def test_screening_rejects_scaled_and_big_updates_and_keeps_honest_ones(
        global_state, aggregator, caplog):
    g = global_state
    honest = _honest(g, 8)
    attacks = [_attack(g, honest[0], "x1e3", lambda g, x: g + 1e3 * (x - g)),
               _attack(g, honest[1], "x1e30", lambda g, x: 1e30 * x),
               _attack(g, honest[2], "flip100", lambda g, x: g - 100 * (x - g))]
    strategy = FedAvg(per_round=11, initial=g, aggregator=aggregator)

    with caplog.at_level(logging.WARNING, logger="sparsefedpp.server.fedavg"):
        out = strategy.aggregate(0, [*honest[:4], *attacks, *honest[4:]], [])
        got = out.tensors

    reasons = dict(out.failures)
    assert set(reasons) == {"x1e3", "x1e30", "flip100"}
    assert all("exceeds the bound" in r for r in reasons.values())
    assert "x1e30" in caplog.text and "rejected" in caplog.text
    assert out.num_results == 8
    screening = out.screening
    assert set(screening["norms"]) == {r.client_id for r in honest} | set(reasons)
    assert max(screening["ratios"][r.client_id] for r in honest) < 2
    assert screening["ratios"]["x1e3"] > 500
    # the aggregate is the honest ones' (exactly, for FedAvg)
    for name, a in got.items():
        assert np.isfinite(a).all() if a.dtype.kind == "f" else True
    if aggregator == "fedavg":
        want = weighted_mean([(r.tensors, r.num_examples) for r in honest])
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    change = max(float(np.max(np.abs(got[k] - g[k]))) for k in g
                 if g[k].dtype.kind == "f")
    assert change < 0.1


def test_a_round_of_two_is_bounded_by_the_global_model_norm(global_state):
    g = global_state
    honest = _honest(g, 1)
    strategy = FedAvg(per_round=2, initial=g)

    scaled = _attack(g, honest[0], "x1e3", lambda g, x: g + 1e3 * (x - g))

    out = strategy.aggregate(0, [honest[0], scaled], [])
    got = out.tensors

    assert [c for c, _ in out.failures] == ["x1e3"]
    np.testing.assert_array_equal(got["fc.weight"], honest[0].tensors["fc.weight"])


def test_screening_follows_the_global_model(global_state):
    """The reference is each returned model, or one given to set_global."""
    g = global_state
    strategy = FedAvg(per_round=5, initial=g)
    out = strategy.aggregate(0, _honest(g, 5), [])
    first = out.tensors
    moved = {k: (v + 1.0).astype(v.dtype) if v.dtype.kind == "f" else v
             for k, v in first.items()}

    out = strategy.aggregate(1, _honest(first, 5, seed=1), [])  # small changes
    assert out.screening["median"] < 5  # ~0.01 * sqrt(#weights)

    strategy.set_global(moved)
    out = strategy.aggregate(2, _honest(first, 5, seed=2), [])
    assert out.screening["median"] > 100  # ~sqrt(#weights) away


def test_screening_off_accepts_everything_finite(global_state):
    g = global_state
    honest = _honest(g, 4)
    big = _attack(g, honest[0], "x1e30", lambda g, x: 1e30 * x)
    strategy = FedAvg(per_round=5, initial=g, screen_median=0, screen_global=0)

    out = strategy.aggregate(0, [*honest, big], [])
    got = out.tensors

    assert out.failures == []
    assert np.abs(got["fc.weight"]).max() > 1e25  # what plain FedAvg lets through


def test_a_non_finite_aggregate_keeps_the_old_model(global_state, monkeypatch, caplog):
    from sparsefedpp.server import aggregate

    g = global_state
    real = aggregate.Accumulator.result

    def overflowing(self):
        out = real(self)
        out["fc.weight"] = np.full_like(out["fc.weight"], np.inf)
        return out

    monkeypatch.setattr(aggregate.Accumulator, "result", overflowing)
    strategy = FedAvg(per_round=3, initial=g)
    with caplog.at_level(logging.WARNING, logger="sparsefedpp.server.fedavg"):
        out = strategy.aggregate(0, _honest(g, 3), [])
        assert out.tensors is None
    assert "not finite" in caplog.text and "fc.weight" in caplog.text
    assert out.aggregated is False


def test_num_examples_above_max_examples_is_a_failure(global_state):
    g = global_state
    honest = _honest(g, 3)
    greedy = ClientResult("greedy", honest[0].tensors, 10**7)
    strategy = FedAvg(per_round=4, initial=g, max_examples=50_000)

    out = strategy.aggregate(0, [*honest, greedy], [])

    reasons = dict(out.failures)
    assert list(reasons) == ["greedy"] and "max_examples=50000" in reasons["greedy"]
    assert out.num_examples == sum(r.num_examples for r in honest)


def test_default_max_examples_is_documented_and_bounds_the_weight():
    from sparsefedpp.server import fedavg

    assert FedAvg(per_round=1).max_examples == fedavg.MAX_EXAMPLES == 100_000


def test_mismatched_or_hostile_integer_tensors_are_failures(global_state):
    g = global_state
    honest = _honest(g, 3)
    huge = dict(honest[0].tensors, **{"bn1.num_batches_tracked": np.array(2**62)})
    strategy = FedAvg(per_round=4, initial=g)

    out = strategy.aggregate(0, [*honest, ClientResult("huge", huge, 10)], [])
    got = out.tensors

    assert "integers within" in dict(out.failures)["huge"]
    assert got["bn1.num_batches_tracked"] == g["bn1.num_batches_tracked"] + 5


@pytest.mark.parametrize("bad", [10**400, -10**400, float("nan"), float("inf"), 1e300,
                                 "1.0", None, [1.0], True])
def test_hostile_metrics_are_skipped_not_fatal(client_states, bad):
    results = _results(client_states)
    results[1] = ClientResult("c1", client_states[1], 300, {"loss": bad, "acc": 0.5})

    strategy = FedAvg(per_round=3)
    out = strategy.aggregate(0, results, [])
    assert out.tensors is not None

    fit = out.fit_metrics
    assert fit["loss"] == pytest.approx((0 * 500 + 2 * 200) / 700)  # c1's loss skipped
    assert fit["acc"] == 0.5


def test_metrics_that_are_not_a_dict_are_skipped(client_states):
    results = _results(client_states)
    results[0] = ClientResult("c0", client_states[0], 500, metrics=["loss", 1.0])
    strategy = FedAvg(per_round=3)
    out = strategy.aggregate(0, results, [])
    assert out.fit_metrics == {"loss": pytest.approx(1.4)}
