"""Magnitude pruning (global and per layer) and the activation-sparsity policies."""

import numpy as np
import pytest
from sparsefedpp.runtime import models
from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.runtime.sparsity import activation_policy, pruning


def _all_weights(model):
    return np.concatenate([layer.effective_weight().ravel()
                           for layer in pruning.prunable_layers(model).values()])


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_global_prune_keeps_exact_count_of_largest(sparsity):
    model = models.build("resnet8", seed=1, alpha=1.25)
    before = np.abs(_all_weights(model))
    counts = pruning.prune(model, sparsity, "global")
    keep = round((1 - sparsity) * before.size)
    assert sum(counts.values()) == keep
    after = _all_weights(model)
    if 0 < keep < before.size:
        cut = np.sort(before)[before.size - keep]  # smallest surviving magnitude
        assert np.abs(after[after != 0]).min() >= cut
        assert np.all(np.abs(before[after == 0]) <= cut)


def test_layer_prune_hits_every_layer_and_spares_batchnorm():
    model = models.build("resnet8", seed=2)
    pruned = {f"{name}.weight" for name in pruning.prunable_layers(model)}
    bn_before = {k: v.copy() for k, v in model.params().items() if k not in pruned}
    assert "bn1.weight" in bn_before and "fc.bias" in bn_before
    pruning.prune(model, 0.9, "layer")
    for name, s in pruning.weight_sparsity(model).items():
        size = model.params()[f"{name}.weight"].size
        assert s == pytest.approx(1 - round(0.1 * size) / size), name
    for k, v in bn_before.items():
        np.testing.assert_array_equal(model.params()[k], v)


def test_global_prune_ranks_effective_weights_across_alphas():
    model = models.build("cnn", seed=3, width=0.25)
    layers = list(pruning.prunable_layers(model).values())
    layers[0].alpha = 2.0  # |w| = v^2: small v rank much lower than |v| suggests
    mags = np.concatenate([np.abs(layer.effective_weight()).ravel() for layer in layers])
    pruning.prune(model, 0.5)
    kept = np.concatenate([layer.effective_weight().ravel() for layer in layers]) != 0
    assert mags[kept].min() >= mags[~kept].max()


def test_pruned_weights_stay_pruned_by_a_second_pruning():
    model = models.build("resnet8", seed=4)
    pruning.prune(model, 0.8)
    zeros = {n: layer.weight == 0 for n, layer in pruning.prunable_layers(model).items()}
    pruning.prune(model, 0.9)
    for n, layer in pruning.prunable_layers(model).items():
        assert np.all(layer.weight[zeros[n]] == 0)
    assert pruning.global_sparsity(model) == pytest.approx(0.9, abs=1e-4)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_bad_sparsity_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="sparsity"):
        pruning.prune(models.build("cnn", seed=0, width=0.25), bad)


def test_bad_scope_and_mask_are_config_errors():
    model = models.build("cnn", seed=0, width=0.25)
    with pytest.raises(ConfigError, match="scope"):
        pruning.magnitude_masks(model, 0.5, "channel")
    with pytest.raises(ConfigError, match="expected shape"):
        pruning.apply_masks(model, {"conv1.weight": np.ones((2, 2), bool)})
    with pytest.raises(ConfigError, match="conv/linear"):
        pruning.apply_masks(model, {"bn1.weight": np.ones(3, bool)})


def test_nan_weights_refuse_pruning():
    model = models.build("cnn", seed=0, width=0.25)
    model.params()["conv2.weight"][0, 0, 0, 0] = np.nan
    with pytest.raises(ConfigError, match="diverged"):
        pruning.prune(model, 0.5)


def test_fixed_policy_keeps_first_layer_dense():
    model = models.build("resnet8", seed=0)
    kept = activation_policy.fixed(model, 0.9, refresh_every=10)
    layers = pruning.prunable_layers(model)
    first, *rest = layers
    assert kept[first] == 1.0 and layers[first].sparsifier is None
    assert layers[first].weight_keep is None
    for name in rest:
        assert kept[name] == pytest.approx(0.1)
        assert layers[name].sparsifier.keep_fraction == pytest.approx(0.1)
        assert layers[name].sparsifier.refresh_every == 10
        assert layers[name].weight_keep == pytest.approx(0.1)
    activation_policy.dense(model)
    assert all(la.sparsifier is None and la.weight_keep is None
               for la in layers.values())


def test_weight_driven_policy_follows_weight_sparsity_with_a_floor():
    model = models.build("resnet8", seed=0, alpha=1.25)
    pruning.prune(model, 0.9, "layer")
    layers = pruning.prunable_layers(model)
    kept = activation_policy.weight_driven(model, min_keep=0.05)
    for name, layer in layers.items():
        want = max(1 - pruning.weight_sparsity(model)[name], 0.05)
        assert kept[name] == pytest.approx(want)
        assert layer.sparsifier.keep_fraction == pytest.approx(want)
        assert layer.weight_keep is None
    kept = activation_policy.weight_driven(model, min_keep=0.5)
    assert all(v == 0.5 for v in kept.values())
    with pytest.raises(ConfigError, match="min_keep"):
        activation_policy.weight_driven(model, min_keep=0.0)
    with pytest.raises(ConfigError, match="sparsity"):
        activation_policy.fixed(model, 1.0)


# ---- layer floor (issue 16, part 2) ------------------------------------------------
@pytest.mark.parametrize("sparsity, floor", [(0.999, 1), (0.999, 4), (0.999, 1000),
                                             (0.99, 8), (0.9, 3)])
def test_floor_never_empties_a_layer_and_keeps_the_exact_total(sparsity, floor):
    model = models.build("resnet8", seed=5, alpha=1.25)
    total = _all_weights(model).size
    masks = pruning.magnitude_masks(model, sparsity, floor=floor)
    keep = round((1 - sparsity) * total)
    assert sum(int(m.sum()) for m in masks.values()) == keep
    assert all(m.any() for m in masks.values()), {n: int(m.sum())
                                                  for n, m in masks.items()}
    counts = pruning.prune(model, sparsity, floor=floor)
    assert sum(counts.values()) == keep and min(counts.values()) >= 1


def test_floor_keeps_each_layers_largest_and_the_rest_by_global_rank():
    model = models.build("resnet8", seed=6, alpha=1.25)
    layers = pruning.prunable_layers(model)
    mags = {n: np.abs(la.effective_weight()).ravel() for n, la in layers.items()}
    masks = pruning.magnitude_masks(model, 0.999, floor=5)
    floored = {}
    for n, mag in mags.items():
        kept = masks[f"{n}.weight"].ravel()
        assert kept.sum() >= 5
        top5 = np.sort(mag)[-5:]
        assert np.all(np.isin(top5, mag[kept]))  # its 5 largest survive
        floored[n] = kept
    # beyond the floors, no pruned weight outranks a surviving non-floor weight
    extra, dropped = [], []
    for n, mag in mags.items():
        order = np.argsort(mag)[::-1]
        kept = floored[n]
        extra.extend(mag[order[5:]][kept[order[5:]]])
        dropped.extend(mag[~kept])
    if extra:
        assert min(extra) >= max(dropped)


def test_global_prune_without_floor_can_empty_a_layer_and_floor_zero_is_today():
    model = models.build("resnet8", seed=0)
    plain = pruning.magnitude_masks(model, 0.999)
    assert any(not m.any() for m in plain.values())  # why the floor exists
    same = pruning.magnitude_masks(model, 0.999, floor=0)
    for n, m in plain.items():
        np.testing.assert_array_equal(same[n], m)
    layer = pruning.magnitude_masks(model, 0.999, "layer", floor=2)
    assert all(m.sum() >= 2 for m in layer.values())


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_floor_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="floor"):
        pruning.magnitude_masks(models.build("cnn", seed=0, width=0.25), 0.5, floor=bad)


@pytest.mark.parametrize("keep", [0, 1, 7, 50, 99, 100])
def test_keep_mask_keeps_exactly_the_largest_with_ties_by_position(keep):
    from sparsefedpp.runtime.sparsity.pruning import _keep_mask

    rng = np.random.default_rng(keep)
    mag = rng.integers(0, 5, 100).astype(np.float32)  # many ties
    order = np.lexsort((np.arange(mag.size), -mag))  # largest first, then position
    want = np.zeros(mag.size, dtype=bool)
    want[order[:keep]] = True
    np.testing.assert_array_equal(_keep_mask(mag, keep), want)


def test_global_masks_break_ties_across_layers_in_model_order():
    model = models.build("resnet8", width=0.25, seed=0)
    for layer in pruning.prunable_layers(model).values():
        layer.weight[...] = 1.0  # all tied
    masks = pruning.magnitude_masks(model, 0.5)
    flat = np.concatenate([m.ravel() for m in masks.values()])
    assert flat.sum() == round(0.5 * flat.size)
    assert flat[:flat.sum()].all() and not flat[flat.sum():].any()


@pytest.mark.parametrize("before,after", [(0.9, 0.99), (0.99, 0.99), (0.99, 0.9),
                                          (0.5, 0.5), (0.0, 0.75)])
def test_global_masks_of_an_already_sparse_model_rank_as_one_sort(before, after):
    # the threshold ranks only the nonzero magnitudes (no concatenated copy of
    # all): the masks must still be the `keep` largest, ties by model position,
    # with zeros ranked lowest -- also when fewer than `keep` are nonzero
    model = models.build("resnet8", width=0.25, alpha=1.25, seed=3)
    if before:
        pruning.prune(model, before)
    rng = np.random.default_rng(1)
    for layer in pruning.prunable_layers(model).values():  # ties across layers
        v = layer.weight
        tie = rng.random(v.shape) < 0.05
        v[tie & (v != 0)] = np.float32(0.05)
    mag = np.abs(_all_weights(model))
    keep = round((1.0 - after) * mag.size)
    order = np.lexsort((np.arange(mag.size), -mag))
    want = np.zeros(mag.size, dtype=bool)
    want[order[:keep]] = True
    got = np.concatenate([m.ravel() for m in pruning.magnitude_masks(model, after)
                          .values()])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("alpha", [1.0, 1.25])
@pytest.mark.parametrize("before,after", [(0.9, 0.99), (0.99, 0.99), (0.99, 0.9),
                                          (0.5, 0.5), (0.0, 0.75), (0.0, 1.0),
                                          (0.9, 0.0)])
def test_prune_from_nonzeros_equals_pruning_by_the_masks(alpha, before, after):
    # prune() ranks only the nonzero weights without building all-weight arrays;
    # the weights it leaves must be exactly those magnitude_masks + apply_masks
    # leave, ties (within and across layers) included
    models_ = [models.build("resnet8", width=0.25, alpha=alpha, seed=3) for _ in "ab"]
    for model in models_:
        if before:
            pruning.apply_masks(model, pruning.magnitude_masks(model, before))
        for layer in pruning.prunable_layers(model).values():
            v = layer.weight
            tie = np.random.default_rng(layer.weight.size).random(v.shape) < 0.05
            v[tie & (v != 0)] = np.float32(0.05)
    fast, slow = models_
    pruning.prune(fast, after)
    pruning.apply_masks(slow, pruning.magnitude_masks(slow, after))
    for (name, a), b in zip(fast.state_dict().items(), slow.state_dict().values(),
                            strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_prune_falls_back_where_a_nonzero_v_underflows_to_a_zero_w():
    model = models.build("resnet8", width=0.25, alpha=1.25, seed=0)
    twin = models.build("resnet8", width=0.25, alpha=1.25, seed=0)
    for m in (model, twin):
        pruning.prunable_layers(m)["conv1"].weight.reshape(-1)[:5] = np.float32(1e-44)
    pruning.prune(model, 0.9)
    pruning.apply_masks(twin, pruning.magnitude_masks(twin, 0.9))
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(),
                            strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)
