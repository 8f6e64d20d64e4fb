"""Layers and models on a static sparse pattern (runtime/static_pattern.py) against
their PyTorch twins: output, grad_in and every parameter grad (dL/dv, zero at the
pruned entries), on the first step (pattern built) and the next (pattern reused),
and SGD on patterns against torch.optim.SGD.

Autograd of v|v|^0.25 gives 0 * inf = NaN at v = 0 where the derivative
1.25|v|^0.25 is 0: the reference takes that limit (``_at_zero``).
"""

from __future__ import annotations

import numpy as np
import pytest
from sparsefedpp.runtime import SGD, Conv2d, Linear, build, softmax_cross_entropy
from sparsefedpp.runtime.sparsity import pruning

torch = pytest.importorskip("torch")  # under CI=true tests/conftest.py fails this

# torch_twins imports torch, so it comes after the importorskip
from test_torch_layers import random_input, run_both
from test_torch_models import batch, moved_running_stats
from test_torch_models import run_both as run_both_model
from torch_twins import assert_matches

pytestmark = pytest.mark.torch

TOL = 1e-4


def _at_zero(ref: dict) -> dict:
    return {k: torch.nan_to_num(v, nan=0.0) if k.startswith("grad ") else v
            for k, v in ref.items()}


def _prune(layer, density, seed=0):
    layer.weight *= np.random.default_rng(seed).random(layer.weight.shape) < density
    return layer


@pytest.mark.parametrize(("kernel", "stride", "padding"), [
    (3, 1, 1), (3, 2, 1), (3, 1, 0), (1, 1, 0), (1, 2, 0)])
@pytest.mark.parametrize("density", [0.3, 0.05])
def test_conv2d_on_a_pattern(kernel, stride, padding, density):
    layer = _prune(Conv2d(6, 8, kernel, stride=stride, padding=padding, bias=True,
                          alpha=1.25, rng=np.random.default_rng(0)), density)
    x = random_input((2, 6, 9, 8))
    for _ in range(2):  # built, then reused
        ours, ref = run_both(layer, x, train=True)
        assert layer.static_pattern is not None
        assert_matches(ours, _at_zero(ref), TOL)


@pytest.mark.parametrize("density", [0.3, 0.05])
def test_linear_on_a_pattern(density):
    layer = _prune(Linear(30, 7, alpha=1.25, rng=np.random.default_rng(0)), density)
    x = random_input((3, 30))
    for _ in range(2):
        ours, ref = run_both(layer, x, train=True)
        assert layer.static_pattern is not None
        assert_matches(ours, _at_zero(ref), TOL)


# (at 0.99 the engine's dense kernels differ from float64 torch by ~1e-2 too: a
# channel with a few weights left gives BatchNorm a tiny variance to divide by)
@pytest.mark.parametrize("sparsity", [0.9])
def test_pruned_resnet_on_patterns_matches_torch(sparsity):
    model = moved_running_stats(build("resnet8", width=1.0, alpha=1.25, seed=0), 16)
    pruning.prune(model, sparsity, "layer")
    x, labels = batch(4, 16)  # pruned channels put exact zeros at ReLU kinks
    for _ in range(2):
        ours, ref = run_both_model(model, x, labels, True)
        assert all(layer.static_pattern is not None
                   for layer in pruning.prunable_layers(model).values())
        assert_matches(ours, _at_zero(ref), TOL)


@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
def test_sgd_steps_on_patterns_match_torch_optim(nesterov):
    model = build("resnet8", width=0.25, alpha=1.25, seed=0)
    pruning.prune(model, 0.9, "layer")
    hparams = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": nesterov}
    ours = SGD(model.params(), model.grads(), **hparams)
    theirs_params = {k: torch.tensor(v.copy(), requires_grad=True)
                     for k, v in model.params().items()}
    theirs = torch.optim.SGD(list(theirs_params.values()), **hparams)
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
        model.zero_grad()
        _, grad_logits = softmax_cross_entropy(model.forward(x, train=True),
                                               rng.integers(0, 10, 4))
        model.backward(grad_logits)
        for key, p in theirs_params.items():
            p.grad = torch.from_numpy(model.grads()[key].copy())
        ours.step()
        theirs.step()
    assert ours._pattern_buffers  # the pattern path ran
    assert_matches(model.params(), theirs_params, 1e-5)
