"""Static sparse patterns (runtime/static_pattern.py, kernels/sddmm.py): a layer's
gradients and SGD steps on its pattern equal the per-step dense path's, and the
pattern is dropped whenever the weights can change from outside training."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from sparsefedpp.runtime import (
    SGD,
    Conv2d,
    Linear,
    inference,
    models,
    softmax_cross_entropy,
)
from sparsefedpp.runtime.kernels import sddmm
from sparsefedpp.runtime.sparsity import activation_policy, pruning, static_pattern

# The emulated-ARM subset (.ci/aarch64.sh) runs every test here but only one
# density of the two gradient grids: the whole grid took minutes under qemu.
DEVICE = pytest.mark.device

TOL = 1e-5  # of the largest reference value (float32 sums in another order)


def _sparse(layer, density, seed=0):
    mask = np.random.default_rng(seed).random(layer.weight.shape) < density
    layer.weight *= mask
    return layer


def _close(ours, ref, what=""):
    scale = max(float(np.abs(ref).max()), 1e-30)
    err = float(np.abs(ours - ref).max()) / scale
    assert err <= TOL, f"{what}: relative error {err:.2e}"


def _fwd_bwd(layer, x, g_seed=3):
    layer.zero_grad()
    y = layer.forward(x, train=True)
    g = np.random.default_rng(g_seed).standard_normal(y.shape).astype(np.float32)
    return y, layer.backward(g), layer.grad_weight.copy()


def _relu_input(shape, seed=1):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return np.maximum(x, 0.0)  # mostly zeros after a ReLU, as in a ResNet


CONVS = [(3, 1, 1), (3, 2, 1), (3, 1, 0), (1, 1, 0), (1, 2, 0)]


@pytest.mark.parametrize(("k", "stride", "pad"), CONVS)
@pytest.mark.parametrize("density", [0.3, pytest.param(0.05, marks=DEVICE), 0.005])
@pytest.mark.parametrize("keep", [None, 0.2, 0.01])
def test_conv_pattern_grads_equal_the_dense_path(k, stride, pad, density, keep):
    # Arrange: the same layer, once on its pattern and once on the dense kernels
    layer = _sparse(Conv2d(12, 16, k, stride=stride, padding=pad, bias=True,
                           alpha=1.25, rng=np.random.default_rng(0)), density)
    ref = copy.deepcopy(layer)
    ref.kernel = "dense"
    for lay in (layer, ref):
        lay.sparsify_activations(keep)
    x = _relu_input((3, 12, 11, 10))
    # Act: two steps, the second reusing the pattern
    for _ in range(2):
        ours = _fwd_bwd(layer, x)
        pat = layer.static_pattern
        theirs = _fwd_bwd(ref, x)
    # Assert
    assert pat is not None and pat is layer.static_pattern and ref.static_pattern is None
    for a, b, what in zip(ours, theirs, ("output", "grad_input", "grad_weight"),
                          strict=True):
        _close(a, b, what)
    np.testing.assert_array_equal(layer.grad_weight[layer.weight == 0], 0.0)
    _close(layer.grad_bias, ref.grad_bias, "grad_bias")
    assert layer.cost.macs_grad_weight <= ref.cost.dense_macs_grad_weight


@pytest.mark.parametrize("density", [0.4, pytest.param(0.1, marks=DEVICE), 0.03, 0.01])
@pytest.mark.parametrize("keep", [None, 0.2])
def test_linear_pattern_grads_equal_the_dense_path(density, keep):
    layer = _sparse(Linear(40, 12, alpha=1.25, rng=np.random.default_rng(0)), density)
    ref = copy.deepcopy(layer)
    ref.kernel = "dense"
    for lay in (layer, ref):
        lay.sparsify_activations(keep)
    x = _relu_input((5, 40))

    ours, theirs = _fwd_bwd(layer, x), _fwd_bwd(ref, x)

    pat = layer.static_pattern
    assert pat is not None
    per_entry = pat.nnz <= static_pattern.LINEAR_DENSE_DENSITY * pat.size
    assert layer.cost.macs_grad_weight == 5 * (pat.nnz if per_entry else pat.size)
    for a, b, what in zip(ours, theirs, ("output", "grad_input", "grad_weight"),
                          strict=True):
        _close(a, b, what)


def _count_dense_macs(indptr, indices, kshape, x_shape, stride, pad):
    o, _, kh, kw = kshape
    n, _, h, w = x_shape
    oh, ow = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    total = 0
    for e, col in enumerate(indices):
        i, j = col // kw % kh, col % kw
        rows = sum(0 <= a * stride - pad + i < h for a in range(oh))
        cols = sum(0 <= b * stride - pad + j < w for b in range(ow))
        total += n * rows * cols
    return total


def _count_kept_macs(flat, indptr, indices, kshape, x_shape, stride, pad):
    o, c_all, kh, kw = kshape
    n, _, h, w = x_shape
    oh, ow = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    total = 0
    for f in flat:
        _, c, y, x = np.unravel_index(f, x_shape)
        for col in indices:
            if col // (kh * kw) != c:
                continue
            i, j = col // kw % kh, col % kw
            yy, xx = y + pad - i, x + pad - j
            total += (yy >= 0 and xx >= 0 and yy % stride == 0 and xx % stride == 0
                      and yy // stride < oh and xx // stride < ow)
    return total


@DEVICE
@pytest.mark.parametrize(("k", "stride", "pad"), CONVS)
def test_sddmm_kernels_report_the_multiply_adds_they_run(k, stride, pad):
    rng = np.random.default_rng(0)
    layer = _sparse(Conv2d(4, 5, k, stride=stride, padding=pad, alpha=1.25, rng=rng),
                    0.3)
    layer.forward(_relu_input((2, 4, 7, 6)), train=True)
    layer._cache = None
    pat = layer.static_pattern
    x = _relu_input((2, 4, 7, 6))
    oh, ow = (7 + 2 * pad - k) // stride + 1, (6 + 2 * pad - k) // stride + 1
    g = rng.standard_normal((2, 5, oh, ow)).astype(np.float32)
    kept = np.flatnonzero(x.ravel() > 1.0).astype(np.int32)

    _, dense_macs = sddmm.conv_grad_pattern_dense(x, g, pat.indptr, pat.indices,
                                                  pat.shape, stride, pad)
    _, kept_macs = sddmm.conv_grad_pattern_kept(kept, x.ravel()[kept], x.shape, g,
                                                pat.indptr, pat.indices, pat.shape,
                                                stride, pad)

    assert dense_macs == _count_dense_macs(pat.indptr, pat.indices,
                                                    pat.shape, x.shape, stride, pad)
    assert kept_macs == _count_kept_macs(kept, pat.indptr, pat.indices, pat.shape,
                                         x.shape, stride, pad)


def _pruned_model(sparsity=0.9, alpha=1.25, keep=True, seed=0):
    model = models.build("resnet8", width=0.5, alpha=alpha, seed=seed)
    pruning.prune(model, sparsity, "layer")
    if keep:
        activation_policy.fixed(model, sparsity, first_layer_dense=False,
                                weights=False)
    return model


def _batch(seed=0, n=4):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 3, 16, 16), dtype=np.float32),
            rng.integers(0, 10, n))


def _train_step(model, x, y, opt=None):
    model.zero_grad()
    _, g = softmax_cross_entropy(model.forward(x, train=True), y)
    model.backward(g)
    if opt is not None:
        opt.step()
    return {k: v.copy() for k, v in model.grads().items()}


def _patterns(model):
    return {name: layer.static_pattern
            for name, layer in pruning.prunable_layers(model).items()}


@DEVICE
def test_model_grads_on_patterns_equal_the_dense_path():
    model = _pruned_model()
    ref = copy.deepcopy(model)
    for layer in pruning.prunable_layers(ref).values():
        layer.kernel = "dense"
    x, y = _batch()

    ours, theirs = _train_step(model, x, y), _train_step(ref, x, y)

    assert all(p is not None for p in _patterns(model).values())
    for key in theirs:
        _close(ours[key], theirs[key], key)


@DEVICE
def test_an_alpha_one_model_never_uses_a_pattern():
    model = _pruned_model(0.99, alpha=1.0)
    opt = SGD(model.params(), model.grads(), 0.05, momentum=0.9)
    x, y = _batch()
    for _ in range(2):
        _train_step(model, x, y, opt)
    assert not any(_patterns(model).values())
    assert not opt._pattern_buffers


@DEVICE
def test_zerofl_weight_keep_never_uses_a_pattern():
    model = _pruned_model(0.9, keep=False)
    activation_policy.fixed(model, 0.9, weights=True)
    _train_step(model, *_batch())
    layers = pruning.prunable_layers(model).values()
    assert all(layer.static_pattern is None for layer in layers
               if layer.weight_keep is not None)
    assert sum(layer.weight_keep is not None for layer in layers) == len(layers) - 1


# ---------------------------------------------------------------- invalidation


@DEVICE
def test_load_state_dict_drops_the_patterns_and_the_new_weights_are_used():
    # Arrange: a pattern built on one mask, then a state with another mask loaded
    model = _pruned_model(seed=0)
    other = _pruned_model(seed=1)
    x, y = _batch()
    _train_step(model, x, y)
    before = _patterns(model)
    # Act
    model.load_state_dict(other.state_dict())
    after_load = _patterns(model)
    activation_policy.reset_thresholds(model)  # as fresh as `other`
    ours = _train_step(model, x, y)
    # Assert: new patterns, and gradients equal those of the model whose state it is
    assert not any(after_load.values())
    assert all(p is not None and p is not before[k] for k, p in _patterns(model).items())
    ref = _train_step(other, x, y)
    for key in ref:
        _close(ours[key], ref[key], key)


@DEVICE
def test_freeze_and_unfreeze_drop_the_pattern():
    model = _pruned_model()
    _train_step(model, *_batch())
    with inference.frozen(model):
        model.forward(_batch()[0], train=False)
    assert not any(_patterns(model).values())


@DEVICE
@pytest.mark.parametrize("change", ["weight array", "kernel", "alpha", "weight_keep"])
def test_a_changed_setting_drops_the_pattern(change):
    layer = _sparse(Conv2d(6, 8, 3, padding=1, alpha=1.25,
                           rng=np.random.default_rng(0)), 0.1)
    x = _relu_input((2, 6, 8, 8))
    _fwd_bwd(layer, x)
    assert layer.static_pattern is not None
    if change == "weight array":
        layer.weight = _sparse(Conv2d(6, 8, 3, padding=1, alpha=1.25,
                                      rng=np.random.default_rng(5)), 0.1).weight
    elif change == "kernel":
        layer.kernel = "dense"
    elif change == "alpha":
        layer.alpha = 1.0
    else:
        layer.weight_keep = 0.5
    ref = copy.deepcopy(layer)
    ref.kernel, ref._pattern = "dense", None

    assert layer.static_pattern is None
    ours, theirs = _fwd_bwd(layer, x), _fwd_bwd(ref, x)
    for a, b in zip(ours, theirs, strict=True):
        _close(a, b)
    if change == "weight array":
        assert layer.static_pattern is not None


@DEVICE
def test_pruning_after_the_pattern_is_built_keeps_the_step_exact():
    # pruning only writes zeros: the old pattern is a superset and stays in use
    model = _pruned_model(0.7)
    opt = SGD(model.params(), model.grads(), 0.05, momentum=0.9, weight_decay=1e-3)
    x, y = _batch()
    _train_step(model, x, y, opt)
    before = _patterns(model)
    pruning.prune(model, 0.95, "layer")
    ref = copy.deepcopy(model)
    for layer in pruning.prunable_layers(ref).values():
        layer.kernel = "dense"

    ours, theirs = _train_step(model, x, y), _train_step(ref, x, y)

    assert _patterns(model) == before
    for key in theirs:
        _close(ours[key], theirs[key], key)
        np.testing.assert_array_equal(ours[key][model.params()[key] == 0], 0.0)


# ---------------------------------------------------------------------- SGD


@pytest.mark.parametrize(("momentum", "weight_decay", "nesterov", "dampening"), [
    (0.0, 0.0, False, 0.0), (0.9, 0.0, False, 0.0), (0.9, 1e-3, False, 0.0),
    (0.9, 5e-4, True, 0.0), (0.5, 1e-3, False, 0.3), (0.0, 1e-3, False, 0.0)])
@DEVICE
def test_sgd_on_patterns_equals_sgd_dense(momentum, weight_decay, nesterov,
                                          dampening):
    # Arrange: the same gradients fed to a pattern model's optimizer and to one over
    # plain copies of the arrays (no layer behind them: the dense update)
    model = _pruned_model()
    hp = {"lr": 0.05, "momentum": momentum, "weight_decay": weight_decay,
          "nesterov": nesterov, "dampening": dampening}
    opt = SGD(model.params(), model.grads(), **hp)
    params = {k: v.copy() for k, v in model.params().items()}
    grads = {k: np.zeros_like(v) for k, v in params.items()}
    dense = SGD(params, grads, **hp)
    # Act
    for step in range(3):
        for key, g in _train_step(model, *_batch(step)).items():
            grads[key][...] = g
        opt.step()
        dense.step()
    # Assert: bit for bit, and the pattern path was taken
    for key, p in model.params().items():
        np.testing.assert_array_equal(p, params[key], err_msg=key)
    if momentum:
        assert len(opt._pattern_buffers) == len(pruning.prunable_layers(model))
        ours, theirs = opt.state_dict(), dense.state_dict()
        assert ours.keys() == theirs.keys()
        for key in theirs:
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


@DEVICE
def test_sgd_falls_back_to_dense_when_momentum_lies_outside_the_pattern():
    # momentum built up, then weights pruned and the pattern rebuilt from the
    # survivors: the dense rule moves the pruned weights again, so must we
    model = _pruned_model(0.7)
    opt = SGD(model.params(), model.grads(), 0.05, momentum=0.9)
    x, y = _batch()
    _train_step(model, x, y, opt)
    pruning.prune(model, 0.95, "layer")
    inference.unfreeze(model)  # drops the patterns: rebuilt from fewer nonzeros
    params = {k: v.copy() for k, v in model.params().items()}
    grads = {k: np.zeros_like(v) for k, v in params.items()}
    dense = SGD(params, grads, 0.05, momentum=0.9)
    dense.load_state_dict(opt.state_dict())

    for key, g in _train_step(model, x, y).items():
        grads[key][...] = g
    opt.step()
    dense.step()

    for key, p in model.params().items():
        np.testing.assert_array_equal(p, params[key], err_msg=key)
    _train_step(model, x, y, opt)  # patterns rebuilt around the regrown weights
    assert all(p is not None for p in _patterns(model).values())


@DEVICE
def test_optimizer_state_round_trips_through_state_dict():
    model = _pruned_model()
    opt = SGD(model.params(), model.grads(), 0.05, momentum=0.9, weight_decay=1e-3)
    x, y = _batch()
    _train_step(model, x, y, opt)
    twin = copy.deepcopy(model)
    twin_opt = SGD(twin.params(), twin.grads(), 0.05, momentum=0.9, weight_decay=1e-3)
    twin_opt.load_state_dict(opt.state_dict())

    _train_step(model, x, y, opt)
    _train_step(twin, x, y, twin_opt)

    for key, p in model.params().items():
        np.testing.assert_array_equal(p, twin.params()[key], err_msg=key)


@DEVICE
def test_layer_zero_grad_clears_a_pattern_gradient():
    layer = _sparse(Conv2d(6, 8, 3, padding=1, alpha=1.25,
                           rng=np.random.default_rng(0)), 0.1)
    _fwd_bwd(layer, _relu_input((2, 6, 8, 8)))
    assert np.any(layer.grad_weight)

    layer.zero_grad()

    assert not np.any(layer.grad_weight) and not np.any(layer.grad_bias)


@DEVICE
@pytest.mark.parametrize("way", ["kept", "sparse", "dense"])
def test_every_way_to_the_pattern_gradient_agrees(way, monkeypatch):
    # Arrange: make the chosen way the only cheap one
    for name in ("NS_KEPT", "NS_SPARSE", "NS_DENSE"):
        monkeypatch.setattr(static_pattern, name, 0.0 if way in name.lower() else 1e9)
    layer = _sparse(Conv2d(12, 16, 3, stride=2, padding=1, alpha=1.25,
                           rng=np.random.default_rng(0)), 0.1)
    ref = copy.deepcopy(layer)
    ref.kernel = "dense"
    for lay in (layer, ref):
        lay.sparsify_activations(0.1)
    x = _relu_input((3, 12, 11, 10))
    # Act
    ours, theirs = _fwd_bwd(layer, x), _fwd_bwd(ref, x)
    # Assert
    assert layer.static_pattern is not None
    _close(ours[2], theirs[2], way)


@DEVICE
def test_serial_and_parallel_kept_kernels_agree(monkeypatch):
    rng = np.random.default_rng(0)
    layer = _sparse(Conv2d(8, 16, 3, padding=1, alpha=1.25, rng=rng), 0.2)
    layer.forward(_relu_input((2, 8, 9, 9)), train=True)
    layer._cache = None
    pat = layer.static_pattern
    x = _relu_input((2, 8, 9, 9))
    g = rng.standard_normal((2, 16, 9, 9)).astype(np.float32)
    kept = np.flatnonzero(x.ravel() > 0.5).astype(np.int32)
    args = (kept, x.ravel()[kept], x.shape, g, pat.indptr, pat.indices, pat.shape, 1, 1)
    monkeypatch.setattr(sddmm, "SERIAL_PAIRS", 0)
    parallel = sddmm.conv_grad_pattern_kept(*args)
    monkeypatch.setattr(sddmm, "SERIAL_PAIRS", 10**12)
    serial = sddmm.conv_grad_pattern_kept(*args)
    np.testing.assert_array_equal(serial[0], parallel[0])
    assert serial[1] == parallel[1]


@DEVICE
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_pattern_gradients_stay_values_until_someone_reads_them(momentum):
    # Arrange: twin models; one is stepped without anyone reading its gradients,
    # the other's are read (made dense) before every step
    model, twin = _pruned_model(), _pruned_model()
    hp = {"lr": 0.05, "momentum": momentum, "weight_decay": 1e-3}
    opt = SGD(model.params(), model.grads(), **hp)
    twin_opt = SGD(twin.params(), twin.grads(), **hp)
    layers = pruning.prunable_layers(model)
    for step in range(3):
        x, y = _batch(step)
        # Act
        for m, o, read in ((model, opt, False), (twin, twin_opt, True)):
            m.zero_grad()
            _, g = softmax_cross_entropy(m.forward(x, train=True), y)
            m.backward(g)
            if step == 2 and not read:
                # Assert: the gradient is held as values; the dense arrays are
                # unwritten (their pages never backed)
                assert all(lay._grad_vals is not None for lay in layers.values())
                assert not any(lay._grad_dense.any() for lay in layers.values())
            if read:
                m.grads()
            o.step()
    # Assert: the same weights either way, bit for bit, and reading still works
    for key, p in model.params().items():
        np.testing.assert_array_equal(p, twin.params()[key], err_msg=key)
    for key, g in model.grads().items():
        np.testing.assert_array_equal(g, twin.grads()[key], err_msg=key)
