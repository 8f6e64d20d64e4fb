"""Conv2d/Linear with the sparse machinery against explicit dense references.

The reference for a SWAT backward is the dense computation with the same masks
applied: grad_weight from the masked input, grad_input from the (masked) weights.
"""

import copy

import numpy as np
import pytest
from sparsefedpp.runtime import (
    SGD,
    Conv2d,
    Linear,
    accounting,
    models,
    softmax_cross_entropy,
)
from sparsefedpp.runtime.kernels import conv
from sparsefedpp.runtime.sparsity import activation_policy, pruning
from sparsefedpp.runtime.sparsity.activations import (
    ActivationSparsifier,
    SparseActivations,
)

pytestmark = pytest.mark.device  # part of the emulated-ARM subset (.ci/aarch64.sh)


def _step(model, x, y):
    model.zero_grad()
    _, g = softmax_cross_entropy(model.forward(x, train=True), y)
    gx = model.backward(g)
    return gx, {k: v.copy() for k, v in model.grads().items()}


def _batch(seed, n=8, shape=(3, 16, 16)):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *shape), dtype=np.float32), rng.integers(0, 10, n)


def _topk_mask(x, keep):
    k = int(np.ceil(keep * x.size))
    mag = np.abs(x).ravel()
    mask = np.zeros(x.size, bool)
    mask[np.argsort(mag)[x.size - k:]] = True
    return mask.reshape(x.shape) & (x != 0)


@pytest.mark.parametrize("policy", ["fixed0", "weight_driven"])
def test_sparsity_zero_reproduces_the_dense_engine_to_float_rounding(policy):
    # Arrange: the policy at sparsity zero keeps everything ...
    dense = models.build("resnet8", seed=0, alpha=1.25)
    sparse = copy.deepcopy(dense)
    if policy == "fixed0":
        kept = activation_policy.fixed(sparse, 0.0)
    else:
        kept = activation_policy.weight_driven(sparse, min_keep=0.05)  # nothing pruned
    assert set(kept.values()) == {1.0}
    # ... and a layer takes keep 1 as "dense input"; run that keep through the sparse
    # machinery instead: the SWAT backward from compressed activations that hold
    # every nonzero
    layers = pruning.prunable_layers(sparse)
    for name, layer in layers.items():
        assert layer.sparsifier is None and layer.weight_keep is None, name
        layer.sparsifier = ActivationSparsifier(kept[name], refresh_every=0)
    x, y = _batch(0)

    # Act
    gx_d, g_d = _step(dense, x, y)
    gx_s, g_s = _step(sparse, x, y)

    # Assert: the compressed path ran (after a ReLU a layer held only its nonzeros,
    # about half; the image into conv1 and the pooled features into fc have no zeros),
    # the dense one did not, and the gradients are bit-identical
    held = {name: layer.cost.act_keep for name, layer in layers.items()}
    assert all(0.3 < held[n] < 0.8 for n in held if n not in ("conv1", "fc")), held
    dense_layers = pruning.prunable_layers(dense).values()
    assert {layer.cost.act_keep for layer in dense_layers} == {1.0}
    np.testing.assert_array_equal(gx_s, gx_d)
    # The sparse-activation weight gradient sums in another order than BLAS's
    # g.T @ x (fc.weight differed in the last float32 bit on some runs), so the
    # parameter gradients agree to float32 rounding, not bit for bit.
    for k in g_d:
        np.testing.assert_allclose(g_s[k], g_d[k], rtol=1e-5, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("k, stride, pad", [(3, 1, 1), (3, 2, 1), (1, 2, 0)])
@pytest.mark.parametrize("alpha", [1.0, 1.25])
@pytest.mark.parametrize("keep", [0.3, 0.005])  # dense-kernel and sparse-kernel grad_w
def test_conv_sparse_backward_equals_masked_reference_with_reused_threshold(
        k, stride, pad, alpha, keep):
    rng = np.random.default_rng(5)
    layer = Conv2d(6, 5, k, stride=stride, padding=pad, bias=True, alpha=alpha, rng=rng)
    layer.weight[rng.random(layer.weight.shape) < 0.6] = 0.0
    layer.sparsify_activations(keep, refresh_every=0)
    w, dw_dv = (layer.effective_weight(), None)
    if alpha != 1.0:
        dw_dv = alpha * np.abs(layer.weight) ** (alpha - 1)
    threshold = None
    for batch in range(3):  # batch 0 sets the threshold, 1 and 2 reuse it
        x = np.maximum(rng.standard_normal((4, 6, 9, 9), dtype=np.float32), 0)
        x *= 1.0 + batch  # later batches are larger: more values pass the threshold
        layer.zero_grad()
        y = layer.forward(x, train=True)
        assert isinstance(layer._cache[0], SparseActivations)
        g = rng.standard_normal(y.shape, dtype=np.float32)
        gx = layer.backward(g)
        if batch == 0:
            mask = _topk_mask(x, keep)
            threshold = np.abs(x[mask]).min()
            assert layer.sparsifier.threshold == pytest.approx(threshold)
        else:
            assert layer.sparsifier.threshold == pytest.approx(threshold)
            mask = (np.abs(x) >= threshold) & (x != 0)
            assert mask.sum() > _topk_mask(x, keep).sum()  # the reuse is visible
        np.testing.assert_allclose(y, conv.conv2d_forward(x, w, stride, pad)
                                   + layer.bias[None, :, None, None], rtol=1e-5, atol=1e-5)
        ref_gw = conv.conv2d_grad_weight(np.where(mask, x, 0), g, w.shape, stride, pad)
        if dw_dv is not None:
            ref_gw = ref_gw * dw_dv
        np.testing.assert_allclose(layer.grad_weight, ref_gw, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(gx, conv.conv2d_grad_input(g, w, x.shape, stride, pad),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(layer.grad_bias, g.sum(axis=(0, 2, 3)), rtol=1e-5,
                                   atol=1e-5)
        assert layer.cost.held_bytes < x.nbytes == layer.cost.dense_held_bytes


def test_linear_sparse_backward_equals_masked_reference():
    rng = np.random.default_rng(6)
    layer = Linear(40, 7, alpha=1.25, rng=rng)
    layer.weight[rng.random(layer.weight.shape) < 0.9] = 0.0
    layer.kernel = "csr"
    layer.sparsify_activations(0.2)
    x = rng.standard_normal((6, 40), dtype=np.float32)
    y = layer.forward(x, train=True)
    w = layer.effective_weight()
    np.testing.assert_allclose(y, x @ w.T + layer.bias, rtol=1e-5, atol=1e-6)
    g = rng.standard_normal(y.shape, dtype=np.float32)
    gx = layer.backward(g)
    mask = _topk_mask(x, 0.2)
    dw_dv = 1.25 * np.abs(layer.weight) ** 0.25
    np.testing.assert_allclose(layer.grad_weight, (g.T @ np.where(mask, x, 0)) * dw_dv,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gx, g @ w, rtol=1e-5, atol=1e-6)
    assert layer.cost.kernel == "csr"
    assert layer.cost.macs_forward == 6 * np.count_nonzero(w)
    # alpha > 1: the gradient is computed at the static pattern (density 0.1:
    # as the dense product g.T @ x, then gathered)
    assert layer.static_pattern is not None
    assert layer.cost.macs_grad_weight == 6 * w.size


def test_threshold_refreshes_on_schedule():
    rng = np.random.default_rng(7)
    layer = Conv2d(3, 4, 3, padding=1, rng=rng)
    layer.sparsify_activations(0.1, refresh_every=2)
    x = rng.standard_normal((2, 3, 8, 8), dtype=np.float32)
    seen = []
    for scale in (1.0, 10.0, 10.0, 100.0):
        layer.forward(x * scale, train=True)
        layer._cache = None
        seen.append(layer.sparsifier.threshold)
    # refreshed at calls 1 and 3 only: call 2 reuses call 1's threshold, call 4 call 3's
    assert seen[1] == seen[0] and seen[3] == seen[2]
    assert seen[2] == pytest.approx(10 * seen[0], rel=1e-5)


def test_swat_forward_weight_sparsity_uses_top_weights_and_dense_weight_grad():
    rng = np.random.default_rng(8)
    layer = Conv2d(4, 6, 3, padding=1, bias=False, rng=rng)
    layer.weight_keep = 0.25
    x = rng.standard_normal((3, 4, 7, 7), dtype=np.float32)
    y = layer.forward(x, train=True)
    w = layer.weight
    mask = _topk_mask(w, 0.25)
    assert mask.sum() == round(0.25 * w.size)
    np.testing.assert_allclose(y, conv.conv2d_forward(x, np.where(mask, w, 0), 1, 1),
                               rtol=1e-5, atol=1e-5)
    g = rng.standard_normal(y.shape, dtype=np.float32)
    gx = layer.backward(g)
    np.testing.assert_allclose(layer.grad_weight, conv.conv2d_grad_weight(x, g, w.shape,
                               1, 1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gx, conv.conv2d_grad_input(g, np.where(mask, w, 0),
                               x.shape, 1, 1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel", ["dense", "csr"])
def test_csr_and_dense_kernels_agree_inside_a_model(kernel):
    model = models.build("resnet8", seed=9, alpha=1.25, width=0.5)
    pruning.prune(model, 0.95, "layer")
    ref = copy.deepcopy(model)
    for layer in pruning.prunable_layers(ref).values():
        layer.kernel = "dense"
    for layer in pruning.prunable_layers(model).values():
        layer.kernel = kernel
    x, y = _batch(1)
    gx_r, g_r = _step(ref, x, y)
    gx, g = _step(model, x, y)
    np.testing.assert_allclose(gx, gx_r, rtol=1e-4, atol=1e-6)
    for k in g_r:
        np.testing.assert_allclose(g[k], g_r[k], rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("alpha, regrows", [(1.25, False), (2.0, False), (1.0, True)])
def test_zero_weights_stay_zero_under_powerprop_only(alpha, regrows):
    model = models.build("cnn", seed=10, alpha=alpha, width=0.25)
    pruning.prune(model, 0.7)
    zeros = {n: la.weight == 0 for n, la in pruning.prunable_layers(model).items()}
    activation_policy.weight_driven(model)
    opt = SGD(model.params(), model.grads(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for seed in range(3):
        x, y = _batch(seed, shape=(3, 12, 12))
        _step(model, x, y)
        opt.step()
    regrown = sum(int(np.count_nonzero(la.weight[zeros[n]]))
                  for n, la in pruning.prunable_layers(model).items())
    assert (regrown > 0) == regrows


def test_cost_report_counts_dense_and_sparse_work():
    model = models.build("resnet8", seed=11, alpha=1.25)
    x, y = _batch(2, n=4, shape=(3, 32, 32))
    _step(model, x, y)
    dense = accounting.cost_report(model)
    conv1 = model.named_layers()["conv1"].cost
    assert conv1.macs_forward == 4 * 16 * 32 * 32 * 3 * 9 == conv1.dense_macs_forward
    assert conv1.held_bytes == x.nbytes
    t = dense.totals
    assert t["macs_forward"] == t["dense_macs_forward"]
    assert t["held_bytes"] == t["dense_held_bytes"] > t["conv_linear_held_bytes"] > 0
    assert t["weight_nnz"] == t["weight_size"] == 77_360  # DESIGN.md's count

    pruning.prune(model, 0.99, "layer")
    activation_policy.fixed(model, 0.99, first_layer_dense=False, weights=False)
    for layer in pruning.prunable_layers(model).values():
        layer.kernel = "csr"
    _step(model, x, y)
    sparse = accounting.cost_report(model)
    s = sparse.totals
    assert s["weight_nnz"] == sum(pruning.nonzeros(model).values())
    assert s["macs_forward"] < 0.02 * s["dense_macs_forward"]
    assert s["macs_grad_weight"] < 0.05 * s["dense_macs_grad_weight"]
    assert s["conv_linear_held_bytes"] < 0.1 * s["conv_linear_dense_held_bytes"]
    assert s["weight_csr_bytes"] < 0.05 * s["weight_dense_bytes"]
    text = sparse.format()
    assert "layer3.0.conv2" in text and "held for backward" in text
    d = sparse.to_dict()
    assert d["totals"]["weight_nnz"] == s["weight_nnz"]
    assert {row["name"] for row in d["layers"]} >= {"conv1", "fc", "layer1.0.relu1"}
