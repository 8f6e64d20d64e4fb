"""The fused BatchNorm + ReLU (+ residual add) path of BasicBlock and the ResNet stem
(BatchNorm2d.forward_relu / backward_relu, kernels/norm.py bn_relu_*): the same
outputs, gradients and running statistics as the unfused layers, finite
differences, held bytes, NaN handling, eval after train and frozen inference.
The PyTorch side is tests/conformance/test_torch_models.py (train and eval-with-
grad forwards run this path)."""

from __future__ import annotations

import numpy as np
import pytest
from sparsefedpp.runtime import BasicBlock, BatchNorm2d, ReLU, StateError, build
from sparsefedpp.runtime import inference
from sparsefedpp.runtime.kernels import norm


def unfused(monkeypatch):
    monkeypatch.setattr(BatchNorm2d, "fusable", lambda self, relu, train, grad: False)


def moved_stats(block, shape, rng):
    block.forward(rng.standard_normal(shape).astype(np.float32) * 1.5 + 0.3,
                  train=True, grad=False)


def run(layer, x, train, r, grad=True):
    layer.zero_grad()
    y = layer.forward(x, train, grad)
    gx = layer.backward(r)
    return (y.copy(), gx.copy(), {k: v.copy() for k, v in layer.grads().items()},
            {k: v.copy() for k, v in layer.buffers().items()})


def assert_same(a, b, rtol=2e-5):
    (ya, ga, pa, ba), (yb, gb, pb, bb) = a, b
    np.testing.assert_array_equal(ya, yb)  # same float32 ops in the forward
    scale = np.abs(gb).max()
    np.testing.assert_allclose(ga, gb, rtol=0, atol=rtol * scale)
    assert pa.keys() == pb.keys() and ba.keys() == bb.keys()
    for k in pb:
        np.testing.assert_allclose(pa[k], pb[k], rtol=0,
                                   atol=rtol * (np.abs(pb[k]).max() + 1e-30), err_msg=k)
    for k in bb:
        np.testing.assert_array_equal(ba[k], bb[k], err_msg=k)


BLOCKS = [pytest.param(8, 8, 1, (4, 8, 8, 8), id="identity"),
          pytest.param(4, 8, 2, (3, 4, 10, 10), id="downsample"),
          pytest.param(3, 5, 1, (2, 3, 7, 7), id="width-change-7x7"),  # 49 per plane
          pytest.param(2, 2, 1, (2, 2, 3, 3), id="3x3")]


@pytest.mark.parametrize(("cin", "cout", "stride", "shape"), BLOCKS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval-grad"])
@pytest.mark.parametrize("keep", [None, 0.3], ids=["dense", "swat"])
def test_fused_block_equals_unfused(monkeypatch, cin, cout, stride, shape, train, keep):
    # Arrange: two identical blocks with moved running stats
    rng = np.random.default_rng(0)
    blocks = []
    for _ in range(2):
        b = BasicBlock(cin, cout, stride, alpha=1.25, rng=np.random.default_rng(1))
        moved_stats(b, shape, np.random.default_rng(2))
        if keep is not None:
            for layer in b.named_layers().values():
                if hasattr(layer, "sparsify_activations"):
                    layer.sparsify_activations(keep)
        blocks.append(b)
    x = rng.standard_normal(shape).astype(np.float32)
    out_shape = blocks[0].forward(x, False).shape
    r = rng.standard_normal(out_shape).astype(np.float32)
    # Act
    fused = run(blocks[0], x, train, r)
    assert blocks[0]._fused
    unfused(monkeypatch)
    plain = run(blocks[1], x, train, r)
    assert not blocks[1]._fused
    # Assert
    assert_same(fused, plain)


def fd_loss(block, x, r):
    return float(np.sum(block.forward(x, True, grad=False).astype(np.float64) * r))


def test_fused_block_grad_input_matches_finite_differences():
    # a block whose every pre-ReLU value is clear of zero by more than the step
    rng = np.random.default_rng(3)
    block = BasicBlock(3, 4, 2, rng=rng)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    r = rng.standard_normal((2, 4, 3, 3))
    block.forward(x, True)
    assert block._fused
    gx = block.backward(r.astype(np.float32))
    eps = 1e-2
    for t in rng.choice(x.size, 16, replace=False):
        xp, xm = x.copy(), x.copy()
        xp.flat[t] += eps
        xm.flat[t] -= eps
        step = float(xp.flat[t]) - float(xm.flat[t])
        fd = (fd_loss(block, xp, r) - fd_loss(block, xm, r)) / step
        assert abs(fd - gx.flat[t]) <= 2e-2 * max(1.0, abs(fd)), (t, fd, gx.flat[t])


def test_fused_path_records_held_bytes():
    block = BasicBlock(4, 4, 1, rng=np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((2, 4, 7, 7)).astype(np.float32)
    block.forward(x, True)
    mask_bytes = x.size  # relu2: a byte each, as ReLU alone
    for bn, relu, held in ((block.bn1, block.relu1, 0),  # recomputed from x
                           (block.bn2, block.relu2, mask_bytes)):
        assert bn.cost.held_bytes == bn.cost.dense_held_bytes == x.nbytes
        assert relu.cost.held_bytes == relu.cost.dense_held_bytes == held
    block.backward(np.ones_like(x))


def test_mask_is_the_positive_outputs():
    rng = np.random.default_rng(5)
    for shape in ((2, 3, 7, 7), (1, 2, 4, 4), (3, 1, 1, 5), (2, 2, 3, 3)):
        x = rng.standard_normal(shape).astype(np.float32)
        res = rng.standard_normal(shape).astype(np.float32)
        s = rng.standard_normal(shape[1]).astype(np.float32)
        t = rng.standard_normal(shape[1]).astype(np.float32)
        y, mask = norm.bn_relu_forward(x, s, t, res)
        v = x * s[None, :, None, None] + t[None, :, None, None] + res
        np.testing.assert_allclose(y, np.maximum(v, 0), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(mask, (y > 0).reshape(mask.shape))


def test_recomputed_positives_equal_the_forward_ones():
    # no residual: backward finds the ReLU's positives again from x*scale + shift;
    # they must be the forward's exactly, also at x = -shift/scale and near it
    rng = np.random.default_rng(11)
    n, c, hw = 8, 16, 1024
    scale = rng.standard_normal(c).astype(np.float32)
    shift = rng.standard_normal(c).astype(np.float32)
    x = rng.standard_normal((n, c, hw)).astype(np.float32)
    edge = (-shift / scale).astype(np.float32)[None, :, None]
    x[:, :, :300] = edge + np.float32(1e-7) * rng.integers(-4, 5, (n, c, 300))
    x = x.reshape(n, c, 32, 32)
    y, mask = norm.bn_relu_forward(x, scale, shift)
    assert mask is None
    ones = np.ones_like(x)
    zeros = np.zeros(c, np.float32)
    unit = np.ones(c, np.float32)
    # with a = 1, b = k = 0 the grad input is the mask itself
    g_in = norm.bn_relu_grad_input(ones, x, unit, zeros, scale, shift, unit, zeros,
                                   zeros)
    np.testing.assert_array_equal(g_in > 0, y > 0)
    sum_g, _ = norm.bn_relu_grad_sums(ones, x, unit, zeros, scale, shift)
    np.testing.assert_array_equal(sum_g, (y > 0).sum(axis=(0, 2, 3)))


def test_nan_is_kept_forward_and_its_gradient_follows_relu(monkeypatch):
    rng = np.random.default_rng(6)
    blocks = [BasicBlock(2, 2, 1, rng=np.random.default_rng(0)) for _ in range(2)]
    x = rng.standard_normal((2, 2, 4, 4)).astype(np.float32)
    r = rng.standard_normal((2, 2, 4, 4)).astype(np.float32)
    r.flat[[0, 5, 17]] = np.nan  # NaN gradients behind clipped units are dropped
    y_f = blocks[0].forward(x, True)
    g_f = blocks[0].backward(r)
    unfused(monkeypatch)
    y_u = blocks[1].forward(x, True)
    g_u = blocks[1].backward(r)
    np.testing.assert_array_equal(y_f, y_u)
    np.testing.assert_array_equal(np.isnan(g_f), np.isnan(g_u))
    x[0, 0, 0, 0] = np.nan
    out = BasicBlock(2, 2, 1, rng=np.random.default_rng(0)).forward(x, True)
    assert np.isnan(out).any()


def test_model_stem_runs_fused_in_training_only(monkeypatch):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    labels = rng.standard_normal((2, 10)).astype(np.float32)
    models = [build("resnet8", width=0.5, seed=0) for _ in range(2)]
    fused = run(models[0], x, True, labels)
    assert models[0]._fused_at == frozenset({1})  # conv1, [bn1, relu], ...
    models[0].forward(x, False)
    assert models[0]._fused_at == frozenset()
    unfused(monkeypatch)
    plain = run(models[1], x, True, labels)
    assert_same(fused, plain)
    # eval after train: the same running statistics, the same eval logits
    np.testing.assert_array_equal(models[0].forward(x, False),
                                  models[1].forward(x, False))


def test_frozen_model_evaluates_unfused_and_refuses_training():
    model = build("resnet8", width=0.5, seed=0)
    x = np.random.default_rng(8).standard_normal((2, 3, 8, 8)).astype(np.float32)
    model.forward(x, True)
    model.backward(np.ones((2, 10), np.float32))
    before = model.forward(x, False)
    inference.freeze(model)
    np.testing.assert_allclose(model.forward(x, False), before, rtol=1e-4, atol=1e-5)
    with pytest.raises(StateError):
        model.forward(x, True)
    inference.unfreeze(model)
    model.forward(x, True)  # fused again
    assert model._fused_at


def test_plain_backward_after_fused_forward_raises_state_error():
    bn, relu = BatchNorm2d(2), ReLU()
    x = np.random.default_rng(9).standard_normal((2, 2, 3, 3)).astype(np.float32)
    bn.forward_relu(x, True, None, relu, residual=x)
    with pytest.raises(StateError, match="backward_relu"):
        bn.backward(np.ones_like(x))
    bn.forward(x, True)
    with pytest.raises(StateError, match="forward_relu"):
        bn.backward_relu(np.ones_like(x))
