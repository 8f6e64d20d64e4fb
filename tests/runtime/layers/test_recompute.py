"""Recomputing residual blocks in backward (runtime/layers/recompute.py): the same
gradients, running statistics and SWAT thresholds bit for bit as holding every
activation, on the paths a client trains (dense, static sparse pattern, SWAT
activations with a refresh and with a reused threshold), and less held."""

from __future__ import annotations

import numpy as np
import pytest
from sparsefedpp.runtime import accounting, build
from sparsefedpp.runtime.layers import WeightedLayer
from sparsefedpp.runtime.layers.recompute import set_recompute
from sparsefedpp.runtime.losses import softmax_cross_entropy
from sparsefedpp.runtime.optim import SGD
from sparsefedpp.runtime.sparsity import pruning


def _model(sparsity: float, keep: float | None):
    model = build("resnet8", width=0.5, alpha=1.25, seed=3)
    if sparsity:
        pruning.prune(model, sparsity, "global")
    for layer in model.named_layers().values():
        if isinstance(layer, WeightedLayer):
            layer.sparsify_activations(keep, refresh_every=2)
    return model


def _train(model, steps: int, recompute: bool):
    """Gradients of every step and the final state, held bytes of the last step."""
    assert set_recompute(model, recompute) == 3
    rng = np.random.default_rng(0)
    opt = SGD(model.params(), model.grads(), 0.05, momentum=0.9, weight_decay=1e-3)
    grads = []
    for _ in range(steps):
        x = rng.standard_normal((6, 3, 16, 16)).astype(np.float32)
        y = rng.integers(0, 10, 6)
        model.zero_grad()
        _, g = softmax_cross_entropy(model.forward(x, train=True), y)
        held = accounting.cost_report(model).totals["held_bytes"]
        model.backward(g, input_grad=False)
        grads.append({k: v.copy() for k, v in model.grads().items()})
        opt.step()
    return grads, model.state_dict(), held


@pytest.mark.parametrize("sparsity, keep", [(0.0, None), (0.9, None), (0.9, 0.3),
                                            (0.0, 0.5)])
def test_recomputed_blocks_train_bit_for_bit_like_held_ones(sparsity, keep):
    held_grads, held_state, held_bytes = _train(_model(sparsity, keep), 4, False)
    re_grads, re_state, re_bytes = _train(_model(sparsity, keep), 4, True)
    for a, b in zip(held_grads, re_grads, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for k in held_state:  # weights, running statistics, num_batches_tracked
        np.testing.assert_array_equal(held_state[k], re_state[k], err_msg=k)
    assert re_bytes < 0.6 * held_bytes, (re_bytes, held_bytes)


def test_recompute_keeps_only_block_inputs_until_backward():
    model = _model(0.9, 0.3)
    set_recompute(model)
    x = np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype(np.float32)
    model.forward(x, train=True)
    rows = {r.name: r for r in accounting.cost_report(model).rows}
    blocks = [n for n, r in rows.items() if r.kind == "BasicBlock"]
    assert blocks == ["layer1.0", "layer2.0", "layer3.0"]
    inside = [r for n, r in rows.items() if n.startswith("layer") and n not in blocks]
    assert inside and all(r.cost.held_bytes == 0 for r in inside)
    assert all(r.cost.dense_held_bytes > 0 for r in inside if r.kind == "BatchNorm2d")
    # switched off: the blocks hold nothing themselves again
    set_recompute(model, False)
    model.forward(x, train=True)
    assert not any(r.kind == "BasicBlock" for r in accounting.cost_report(model).rows)


def test_set_recompute_counts_blocks():
    assert set_recompute(build("cnn"), True) == 0
    assert set_recompute(build("resnet18"), True) == 8
