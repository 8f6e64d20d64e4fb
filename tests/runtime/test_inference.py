"""Frozen inference (weights built once, BatchNorm folded) equals the plain eval forward."""

from __future__ import annotations

import numpy as np
import pytest
from sparsefedpp.runtime import inference, models
from sparsefedpp.runtime.errors import StateError
from sparsefedpp.runtime.layers import ReLU
from sparsefedpp.runtime.sparsity import pruning

pytestmark = pytest.mark.device


def _trained_like(name: str, sparsity: float, width: float = 0.5):
    model = models.build(name, alpha=1.25, width=width, seed=0)
    rng = np.random.default_rng(1)
    for layer in model.named_layers().values():  # non-trivial BatchNorm statistics
        if hasattr(layer, "running_var"):
            layer.running_mean[:] = rng.normal(0, 0.3, layer.num_features)
            layer.running_var[:] = rng.uniform(0.5, 2.0, layer.num_features)
            layer.weight[:] = rng.uniform(0.5, 1.5, layer.num_features)
            layer.bias[:] = rng.normal(0, 0.2, layer.num_features)
    if sparsity:
        pruning.prune(model, sparsity, "global")
    return model


@pytest.mark.parametrize("name", ["cnn", "resnet8", "resnet18"])
@pytest.mark.parametrize("sparsity", [0.0, 0.99])
@pytest.mark.parametrize("batch", [1, 4])
def test_frozen_forward_equals_eval_forward(name, sparsity, batch):
    model = _trained_like(name, sparsity)
    x = np.random.default_rng(2).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    want = model.forward(x, train=False)

    folded = inference.freeze(model)
    got = model.forward(x, train=False)

    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-5 * scale
    assert folded == sum(1 for _ in inference.conv_bn_pairs(model))


def test_resnet_pairs_are_conv_then_its_batchnorm():
    model = models.build("resnet18", width=0.25)

    names = {id(layer): n for n, layer in model.named_layers().items()}
    pairs = [(names[id(c)], names[id(b)]) for c, b in inference.conv_bn_pairs(model)]

    assert ("conv1", "bn1") in pairs and ("layer2.0.conv2", "layer2.0.bn2") in pairs
    assert ("layer2.0.downsample.0", "layer2.0.downsample.1") in pairs
    assert len(pairs) == 20   # 1 stem + 8 blocks x 2 + 3 downsamples


def test_relus_fused_are_those_right_after_a_conv_and_its_batchnorm():
    model = models.build("resnet18", width=0.25)
    names = {id(layer): n for n, layer in model.named_layers().items()}
    inference.freeze(model)

    fused = {n for n, layer in model.named_layers().items()
             if isinstance(layer, ReLU) and layer.fused}
    assert fused == {"relu"} | {f"layer{i}.{b}.relu1" for i in range(1, 5)
                                for b in range(2)}  # not relu2: after the add
    folded = {names[id(c)] for c, _ in inference.conv_bn_pairs(model)}
    assert len(folded) == 20
    inference.unfreeze(model)
    assert not any(getattr(layer, "fused", False) or getattr(layer, "folded", False)
                   for layer in model.named_layers().values())


@pytest.mark.parametrize("fold_bn", [True, False])
def test_unfused_and_unfolded_freezes_give_the_eval_forward(fold_bn):
    model = _trained_like("resnet8", 0.9)
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    want = model.forward(x, train=False)

    inference.freeze(model, fold_bn=fold_bn, fuse_relu=False)
    got = model.forward(x, train=False)

    assert not any(isinstance(layer, ReLU) and layer.fused
                   for layer in model.named_layers().values())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_training_a_frozen_model_is_refused_until_unfrozen():
    model = _trained_like("resnet8", 0.9, width=0.25)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    inference.freeze(model)

    with pytest.raises(StateError, match="unfreeze"):
        model.forward(x, train=True)
    with pytest.raises(StateError, match="ReLU: fused"):
        model["relu"].forward(x, train=True)
    inference.unfreeze(model)
    model.forward(x, train=True)


def test_load_state_dict_drops_the_stale_frozen_weights():
    model = _trained_like("resnet8", 0.0, width=0.25)
    other = _trained_like("resnet8", 0.99, width=0.25)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    inference.freeze(model)

    model.load_state_dict(other.state_dict())

    np.testing.assert_allclose(model.forward(x, train=False),
                               other.forward(x, train=False), rtol=1e-6, atol=1e-6)


def test_frozen_context_restores_the_trainable_model():
    model = _trained_like("cnn", 0.0)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)

    with inference.frozen(model):
        model.forward(x, train=False)
    model.forward(x, train=True)   # no StateError


def test_frozen_forwards_report_the_same_macs():
    from sparsefedpp.runtime import accounting

    model = _trained_like("resnet8", 0.99, width=0.5)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    model.forward(x, train=False)
    want = accounting.cost_report(model).totals["macs_forward"]

    inference.freeze(model)
    for batch in (x, x[:1], x):   # the cached count follows the input shape
        model.forward(batch, train=False)
    model.forward(x, train=False)

    assert accounting.cost_report(model).totals["macs_forward"] == want


def test_a_freeze_that_fails_leaves_nothing_frozen():
    model = _trained_like("resnet8", 0.9, width=0.25)
    model["layer2"][0].conv2.kernel = "no-such-kernel"  # the 5th conv refuses

    with pytest.raises(Exception, match="no-such-kernel"):
        inference.freeze(model)

    assert not inference.is_frozen(model)
    assert not any(getattr(layer, "fused", False) or getattr(layer, "folded", False)
                   or getattr(layer, "_fused_relu", False)
                   for layer in model.named_layers().values())
