"""Each engine layer against its PyTorch twin: output, grad_in, parameter grads and
BatchNorm running stats, for L = sum(y * R) with a fixed random R.

The reference is torch in float64 (same float32 weights and inputs, upcast), so
what is measured is the engine's own float32 error, not torch's. The tolerance is
relative to the largest reference value: max|ours - torch| / max|torch| <= 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
from sparsefedpp.runtime import (
    BasicBlock,
    BatchNorm2d,
    Conv2d,
    Flatten,
    GlobalAvgPool2d,
    Linear,
    MaxPool2d,
    ReLU,
)

torch = pytest.importorskip("torch")  # under CI=true tests/conftest.py fails this

# torch_twins imports torch, so it comes after the importorskip
from torch_twins import assert_matches, twin

pytestmark = pytest.mark.torch

TOL = 1e-4


def run_both(layer, x: np.ndarray, train: bool):
    """Forward and backward in the engine and in the float64 twin.

    Returns two dicts with the same keys: output, grad_input, ``grad <param>``
    and ``buffer <name>`` (read after the forward, so train mode has moved them).
    """
    module = twin(layer)  # copies the tensors before the engine's forward moves them
    module.train(train)
    # engine
    y = layer.forward(x, train, grad=True)
    r = np.random.default_rng(0).standard_normal(y.shape).astype(np.float32)
    layer.zero_grad()
    grad_in = layer.backward(r)
    # torch
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    yt = module(xt)
    (yt * torch.from_numpy(r).double()).sum().backward()
    ours = {"output": y, "grad_input": grad_in}
    ours.update({f"grad {k}": g for k, g in layer.grads().items()})
    ours.update({f"buffer {k}": b for k, b in layer.buffers().items()})
    ref = {"output": yt, "grad_input": xt.grad}
    ref.update({f"grad {k}": p.grad for k, p in module.named_parameters()})
    ref.update({f"buffer {k}": b for k, b in module.named_buffers()})
    return ours, ref


def random_input(shape, seed=1):
    return (np.random.default_rng(seed).standard_normal(shape) * 2 + 0.5).astype(
        np.float32)


def with_moved_stats(bn: BatchNorm2d, seed=2) -> BatchNorm2d:
    """Non-trivial affine parameters and running statistics."""
    rng = np.random.default_rng(seed)
    bn.weight[:] = rng.uniform(0.5, 1.5, bn.num_features)
    bn.bias[:] = rng.standard_normal(bn.num_features)
    bn.running_mean[:] = rng.standard_normal(bn.num_features)
    bn.running_var[:] = rng.uniform(0.5, 2.0, bn.num_features)
    bn.num_batches_tracked[...] = 7
    return bn


def rng(seed=0):
    return np.random.default_rng(seed)


# ------------------------------------------------------------ weighted layers
@pytest.mark.parametrize(("kernel", "stride", "padding", "bias"), [
    (3, 1, 1, True), (3, 1, 0, False), (3, 2, 1, False), (3, 2, 0, True),
    (1, 1, 0, True), (1, 2, 0, False), (3, 3, 1, True),
])
@pytest.mark.parametrize("alpha", [1.0, 1.25])
def test_conv2d(kernel, stride, padding, bias, alpha):
    layer = Conv2d(3, 5, kernel, stride=stride, padding=padding, bias=bias,
                   alpha=alpha, rng=rng())
    ours, ref = run_both(layer, random_input((2, 3, 7, 6)), train=True)
    assert_matches(ours, ref, TOL)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("alpha", [1.0, 1.25])
def test_linear(bias, alpha):
    layer = Linear(9, 4, bias=bias, alpha=alpha, rng=rng())
    ours, ref = run_both(layer, random_input((3, 9)), train=True)
    assert_matches(ours, ref, TOL)


# ---------------------------------------------------------------- batch norm
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (2, 6, 1, 3), (8, 2, 2, 2)])
def test_batchnorm(shape, train):
    # Arrange
    bn = with_moved_stats(BatchNorm2d(shape[1]))
    # Act
    ours, ref = run_both(bn, random_input(shape), train=train)
    # Assert: includes running_mean, running_var (unbiased) and num_batches_tracked
    assert_matches(ours, ref, TOL)
    assert int(ours["buffer num_batches_tracked"]) == (8 if train else 7)


def test_batchnorm_large_offset_stays_accurate():
    # a large common offset is where single-pass float32 variance loses digits
    bn = with_moved_stats(BatchNorm2d(3))
    x = random_input((4, 3, 6, 6)) + np.float32(300.0)
    ours, ref = run_both(bn, x, train=True)
    assert_matches(ours, ref, TOL)


# ------------------------------------------------------ layers without params
@pytest.mark.parametrize(("make", "shape"), [
    (lambda: ReLU(), (2, 3, 4, 5)),
    (lambda: ReLU(), (3, 7)),
    (lambda: MaxPool2d(2), (2, 3, 6, 6)),
    (lambda: MaxPool2d(2), (2, 3, 7, 5)),
    (lambda: MaxPool2d(3, 2, 1), (2, 3, 7, 7)),
    (lambda: MaxPool2d(3, 2, 1), (1, 2, 8, 5)),
    (lambda: GlobalAvgPool2d(), (2, 3, 5, 4)),
    (lambda: Flatten(), (2, 3, 4, 2)),
], ids=["relu-4d", "relu-2d", "maxpool-k2", "maxpool-k2-odd", "maxpool-k3-s2-p1",
        "maxpool-k3-s2-p1-odd", "gap", "flatten"])
def test_parameterless_layer(make, shape):
    ours, ref = run_both(make(), random_input(shape), train=True)
    assert_matches(ours, ref, TOL)


# ---------------------------------------------------------------- basic block
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("alpha", [1.0, 1.25])
@pytest.mark.parametrize(("in_planes", "planes", "stride"),
                         [(4, 4, 1), (4, 8, 2), (3, 6, 1)],
                         ids=["identity", "downsample-s2", "downsample-wider"])
def test_basic_block(in_planes, planes, stride, alpha, train):
    # Arrange
    block = BasicBlock(in_planes, planes, stride, alpha=alpha, rng=rng())
    for name, layer in block.named_layers().items():
        if isinstance(layer, BatchNorm2d):
            with_moved_stats(layer, seed=len(name))
    # Act
    ours, ref = run_both(block, random_input((3, in_planes, 8, 8)), train=train)
    # Assert
    assert_matches(ours, ref, TOL)
