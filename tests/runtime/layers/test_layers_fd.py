"""Backward of every layer (and of whole models) against central finite differences,
plus the layer contract: cache rules, shape errors, dtype conversion, Powerprop zeros.

The engine computes in float32 only, so the scalar loss L = sum(y * R) for a fixed
random R is summed in float64, and each difference quotient divides by the step
that float32 really took (x + eps and x - eps are rounded before the forward).
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
    ShapeError,
    StateError,
    build,
)
from sparsefedpp.runtime.arrays import as_f32
from sparsefedpp.runtime.kernels import pool

INPUT_COORDS = 24  # coordinates of x probed per case
PARAM_COORDS = 12  # coordinates probed per parameter tensor
# Deep inside a block no input keeps every ReLU far from its kink: a probe whose
# step crosses one retries with the next smaller step (float32 noise grows as the
# step shrinks, so the large step comes first).
MODEL_STEPS = (1e-2, 1e-3, 3e-4)


# ------------------------------------------------------------------- helpers
def away_from_zero(rng, shape, low=0.2, high=1.0) -> np.ndarray:
    """Random signs times |values| in [low, high]: no ReLU kink and no Powerprop
    |v|^(alpha-1) singularity within a finite-difference step."""
    mag = rng.uniform(low, high, shape)
    return (rng.choice([-1.0, 1.0], shape) * mag).astype(np.float32)


def distinct_values(rng, shape, gap=0.05) -> np.ndarray:
    """A scaled random permutation: every value differs from every other by >= gap,
    so a max-pool argmax cannot flip within a step smaller than gap / 2."""
    n = int(np.prod(shape))
    return ((rng.permutation(n) - n / 2) * gap).reshape(shape).astype(np.float32)


def loss_of(y: np.ndarray, r: np.ndarray) -> float:
    return float(np.sum(y.astype(np.float64) * r))


def sample(rng, arr: np.ndarray, k: int) -> np.ndarray:
    return rng.choice(arr.size, size=min(arr.size, k), replace=False)


@pytest.fixture
def kink_sides(monkeypatch):
    """Record, on every forward, which side of each ReLU and max-pool kink the
    inputs sit on; the returned callable gives (and clears) what was recorded.

    A difference quotient whose step crosses a kink measures neither one-sided
    derivative. Deep inside a block or a model no input can be chosen to avoid
    every kink, so such steps are detected (and retried smaller, or skipped).
    """
    seen = []
    relu_forward, pool_forward = ReLU.forward, MaxPool2d.forward

    def relu(self, x, train, grad=None, **kwargs):
        seen.append(as_f32(x, "test") > 0)
        return relu_forward(self, x, train, grad, **kwargs)

    def maxpool(self, x, train, grad=None):
        _, argmax = pool.maxpool2d_forward(as_f32(x, "test"), self.kernel_size,
                                           self.stride, self.padding)
        seen.append(argmax)
        return pool_forward(self, x, train, grad)

    monkeypatch.setattr(ReLU, "forward", relu)
    monkeypatch.setattr(MaxPool2d, "forward", maxpool)

    def take() -> bytes:
        sides = b"".join(a.tobytes() for a in seen)
        seen.clear()
        return sides
    return take


def central_differences(f, arr: np.ndarray, coords, steps, kink_sides):
    """dL/d arr.flat[i] for i in coords, perturbing ``arr`` (float32) in place.

    For each coordinate the first step in ``steps`` whose x - eps, x and x + eps
    lie on the same side of every kink is used (only then is the quotient a
    derivative). Returns the quotients and a mask of the coordinates that had one.
    """
    out = np.zeros(len(coords))
    smooth = np.zeros(len(coords), dtype=bool)
    for n, i in enumerate(coords):
        orig = arr.flat[i]
        kink_sides()
        f()
        sides = kink_sides()
        for eps in steps:
            arr.flat[i] = orig + np.float32(eps)
            hi, f_hi, sides_hi = float(arr.flat[i]), f(), kink_sides()
            arr.flat[i] = orig - np.float32(eps)
            lo, f_lo, sides_lo = float(arr.flat[i]), f(), kink_sides()
            arr.flat[i] = orig
            if sides_hi == sides == sides_lo:
                out[n], smooth[n] = (f_hi - f_lo) / (hi - lo), True
                break
    return out, smooth


def rel_err(analytic, numeric) -> float:
    return float(np.linalg.norm(analytic - numeric) / np.linalg.norm(numeric))


def check_against_fd(layer, x, kink_sides, *, train=True, steps=(1e-2,), tol=1e-2,
                     seed=0, min_smooth=1.0):
    """Compare grad_in and every param grad of ``layer`` at ``x`` with central
    differences of L = sum(layer(x) * R); returns {tensor name: relative error}.

    ``steps`` are tried largest first; a coordinate where every step crosses a
    kink is skipped, but at least ``min_smooth`` of all probed coordinates, and
    one per tensor, must remain.
    """
    rng = np.random.default_rng(seed)
    y = layer.forward(x, train, grad=True)
    r = rng.standard_normal(y.shape).astype(np.float32)
    layer.zero_grad()
    grad_in = layer.backward(r)
    probes = [("input", x, grad_in, INPUT_COORDS)]
    probes += [(name, p, layer.grads()[name].copy(), PARAM_COORDS)
               for name, p in layer.params().items()]

    def f():
        return loss_of(layer.forward(x, train, grad=False), r)

    errors, num_smooth, num_probed = {}, 0, 0
    for name, arr, analytic, k in probes:
        coords = sample(rng, arr, k)
        numeric, smooth = central_differences(f, arr, coords, steps, kink_sides)
        assert smooth.any(), f"{layer!r}: every probe of {name} crossed a kink"
        errors[name] = rel_err(analytic.flat[coords][smooth], numeric[smooth])
        num_smooth += int(smooth.sum())
        num_probed += smooth.size
    assert num_smooth >= min_smooth * num_probed, (
        f"{layer!r}: only {num_smooth} of {num_probed} probes avoided every kink")
    bad = {k: e for k, e in errors.items() if not e < tol}
    assert not bad, f"{layer!r}: relative error above {tol}: {bad}"
    return errors


def calibrate_running_stats(model, x) -> None:
    """Set every BatchNorm's running stats to the statistics of ``x`` (as after
    long training on it), so eval-mode activations are normalised, not tiny."""
    norms = [m for m in model.named_layers().values() if isinstance(m, BatchNorm2d)]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.momentum = 1.0
    model.forward(x, train=True, grad=False)
    for bn, momentum in zip(norms, momenta, strict=True):
        bn.momentum = momentum


def with_weights_away_from_zero(layer, rng):
    """Replace every Conv2d/Linear weight ``v`` (Powerprop needs |v| >> eps)."""
    for p_name, p in layer.params().items():
        if p_name.endswith("weight") and p.ndim >= 2:
            p[...] = away_from_zero(rng, p.shape, 0.1, 0.5)
    return layer


def conv(c, o, k, stride, padding, bias, alpha=1.0):
    return lambda rng: Conv2d(c, o, k, stride=stride, padding=padding, bias=bias,
                              alpha=alpha, rng=rng)


def linear(i, o, bias, alpha=1.0):
    return lambda rng: Linear(i, o, bias=bias, alpha=alpha, rng=rng)


# ------------------------------------------------ weighted layers (linear in x)
WEIGHTED = [
    pytest.param(conv(3, 4, 3, 1, 1, True), (2, 3, 6, 6), id="conv-k3-s1-p1-bias"),
    pytest.param(conv(3, 4, 3, 1, 0, False), (2, 3, 6, 6), id="conv-k3-s1-p0"),
    pytest.param(conv(3, 4, 3, 2, 1, False), (2, 3, 7, 7), id="conv-k3-s2-p1"),
    pytest.param(conv(3, 4, 3, 2, 0, True), (2, 3, 7, 6), id="conv-k3-s2-p0-bias"),
    pytest.param(conv(3, 5, 1, 1, 0, True), (2, 3, 4, 4), id="conv-k1-s1-bias"),
    pytest.param(conv(3, 5, 1, 2, 0, False), (2, 3, 5, 5), id="conv-k1-s2"),
    pytest.param(conv(2, 3, 1, 1, 1, False), (1, 2, 3, 3), id="conv-k1-p1"),
    pytest.param(conv(3, 4, 3, 1, 1, True, 1.25), (2, 3, 5, 5), id="conv-pp1.25-bias"),
    pytest.param(conv(3, 4, 3, 2, 1, False, 1.25), (2, 3, 6, 6), id="conv-pp1.25-s2"),
    pytest.param(linear(7, 5, True), (3, 7), id="linear-bias"),
    pytest.param(linear(7, 5, False), (3, 7), id="linear"),
    pytest.param(linear(7, 5, True, 1.25), (3, 7), id="linear-pp1.25-bias"),
    pytest.param(linear(7, 5, False, 1.25), (3, 7), id="linear-pp1.25"),
]


@pytest.mark.device
@pytest.mark.parametrize(("make", "in_shape"), WEIGHTED)
def test_weighted_layer_backward_matches_fd(make, in_shape, kink_sides):
    # Arrange
    rng = np.random.default_rng(1)
    layer = with_weights_away_from_zero(make(rng), rng)
    x = rng.standard_normal(in_shape).astype(np.float32)
    # Act / Assert: linear in x, and in v when alpha = 1, so FD is near-exact there
    check_against_fd(layer, x, kink_sides, tol=1e-3)


# ------------------------------------------------------ layers without params
def relu_input(rng, shape):
    return away_from_zero(rng, shape, 0.1, 2.0)


def normal_input(rng, shape):
    return (rng.standard_normal(shape) * 1.5 + 0.3).astype(np.float32)


PLAIN = [
    pytest.param(lambda: ReLU(), relu_input, (2, 3, 4, 4), id="relu-4d"),
    pytest.param(lambda: ReLU(), relu_input, (3, 6), id="relu-2d"),
    pytest.param(lambda: MaxPool2d(2), distinct_values, (2, 3, 6, 6), id="maxpool-k2"),
    pytest.param(lambda: MaxPool2d(2), distinct_values, (1, 2, 5, 7),
                 id="maxpool-k2-odd"),
    pytest.param(lambda: MaxPool2d(3, 2, 1), distinct_values, (2, 2, 7, 7),
                 id="maxpool-k3-s2-p1"),
    pytest.param(lambda: GlobalAvgPool2d(), normal_input, (2, 3, 5, 4), id="gap"),
    pytest.param(lambda: Flatten(), normal_input, (2, 3, 2, 4), id="flatten"),
]


@pytest.mark.device
@pytest.mark.parametrize(("make", "make_input", "in_shape"), PLAIN)
def test_parameterless_layer_backward_matches_fd(make, make_input, in_shape,
                                                 kink_sides):
    # Arrange
    rng = np.random.default_rng(2)
    layer = make()
    x = make_input(rng, in_shape)
    # Act / Assert: inputs keep every step away from the kinks (min_smooth=1)
    check_against_fd(layer, x, kink_sides, tol=1e-3)


# ---------------------------------------------------------------- batch norm
@pytest.mark.device
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("in_shape", [(4, 3, 3, 3), (2, 2, 1, 2), (5, 4, 2, 1)])
def test_batchnorm_backward_matches_fd(train, in_shape, kink_sides):
    # Arrange: non-trivial affine params and running stats
    rng = np.random.default_rng(3)
    bn = BatchNorm2d(in_shape[1])
    bn.weight[:] = rng.uniform(0.5, 1.5, bn.num_features)
    bn.bias[:] = rng.standard_normal(bn.num_features)
    bn.running_mean[:] = rng.standard_normal(bn.num_features)
    bn.running_var[:] = rng.uniform(0.5, 2.0, bn.num_features)
    x = normal_input(rng, in_shape)
    # Act / Assert: every train-mode forward re-computes the batch statistics
    # (and moves the running ones, which a train-mode forward never reads)
    check_against_fd(bn, x, kink_sides, train=train)


# ------------------------------------------------------ blocks, whole models
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("in_planes", "planes", "stride"),
                         [(3, 3, 1), (3, 4, 2), (2, 4, 1)],
                         ids=["identity", "downsample-s2", "downsample-wider"])
def test_basic_block_backward_matches_fd(in_planes, planes, stride, train,
                                         kink_sides):
    # Arrange
    rng = np.random.default_rng(4)
    block = BasicBlock(in_planes, planes, stride, rng=rng)
    x = normal_input(rng, (2, in_planes, 5, 5))
    if not train:
        calibrate_running_stats(block, x)
    # Act / Assert: probes crossing a ReLU kink inside the block retry smaller steps
    errors = check_against_fd(block, x, kink_sides, train=train, steps=MODEL_STEPS,
                              min_smooth=0.75)
    # Assert: the shortcut's tensors are probed too
    has_downsample = stride != 1 or in_planes != planes
    assert ("downsample.0.weight" in errors) == has_downsample


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", [pytest.param("cnn", marks=pytest.mark.device),
                                  "resnet8"])  # resnet8-train takes seconds
def test_whole_model_backward_matches_fd(name, train, kink_sides):
    # Arrange
    model = build(name, width=0.25, seed=5)
    x = normal_input(np.random.default_rng(5), (2, 3, 8, 8))
    if not train:
        calibrate_running_stats(model, x)
    # Act / Assert: probes crossing a ReLU or max-pool kink retry smaller steps
    check_against_fd(model, x, kink_sides, train=train, steps=MODEL_STEPS,
                     min_smooth=0.75)


# ----------------------------------------------------------- layer contract
EVERY_LAYER = [
    pytest.param(lambda: Conv2d(3, 4, 3, padding=1), (2, 3, 5, 5), id="conv"),
    pytest.param(lambda: Linear(6, 4), (2, 6), id="linear"),
    pytest.param(lambda: BatchNorm2d(3), (2, 3, 4, 4), id="batchnorm"),
    pytest.param(lambda: ReLU(), (2, 3, 4, 4), id="relu"),
    pytest.param(lambda: MaxPool2d(2), (2, 3, 4, 4), id="maxpool"),
    pytest.param(lambda: GlobalAvgPool2d(), (2, 3, 4, 4), id="gap"),
    pytest.param(lambda: Flatten(), (2, 3, 4, 4), id="flatten"),
    pytest.param(lambda: BasicBlock(3, 4, 2), (2, 3, 4, 4), id="block"),
    pytest.param(lambda: build("resnet8", width=0.25, seed=0), (2, 3, 8, 8),
                 id="resnet8"),
]


@pytest.mark.parametrize(("make", "in_shape"), EVERY_LAYER)
def test_backward_before_forward_raises_state_error(make, in_shape):
    layer = make()
    y_shape = make().forward(np.ones(in_shape, np.float32), True).shape
    with pytest.raises(StateError):
        layer.backward(np.ones(y_shape, np.float32))


@pytest.mark.parametrize(("make", "in_shape"), EVERY_LAYER)
def test_eval_forward_keeps_no_cache(make, in_shape):
    # Arrange
    layer = make()
    x = np.random.default_rng(0).standard_normal(in_shape).astype(np.float32)
    # Act
    y = layer.forward(x, train=False)
    # Assert
    with pytest.raises(StateError):
        layer.backward(np.ones_like(y))


@pytest.mark.parametrize(("make", "in_shape"), EVERY_LAYER)
def test_backward_consumes_the_cache(make, in_shape):
    # Arrange
    layer = make()
    x = np.random.default_rng(0).standard_normal(in_shape).astype(np.float32)
    y = layer.forward(x, train=True)
    layer.backward(np.ones_like(y))
    # Act / Assert: a second backward needs a second forward
    with pytest.raises(StateError):
        layer.backward(np.ones_like(y))




@pytest.mark.parametrize(("make", "in_shape"), [
    pytest.param(*case.values, id=case.id,
                 marks=())
    for case in EVERY_LAYER])
def test_wrong_grad_out_shape_raises_shape_error(make, in_shape):
    # Arrange
    layer = make()
    y = layer.forward(np.ones(in_shape, np.float32), train=True)
    wrong = np.ones((y.shape[0] + 1,) + y.shape[1:], np.float32)
    # Act / Assert
    with pytest.raises(ShapeError):
        layer.backward(wrong)


@pytest.mark.parametrize(("make", "bad_shape", "expected"), [
    (lambda: Conv2d(3, 4, 3), (2, 5, 6, 6), "(N, 3, H, W)"),
    (lambda: Conv2d(3, 4, 3), (3, 6, 6), "(N, 3, H, W)"),
    (lambda: Linear(12, 4), (2, 3, 4), "(N, 12)"),
    (lambda: Linear(12, 4), (2, 11), "(N, 12)"),
    (lambda: BatchNorm2d(3), (2, 4, 5, 5), "(N, 3, H, W)"),
    (lambda: MaxPool2d(2), (3, 6, 6), "(N, C, H, W)"),
    (lambda: GlobalAvgPool2d(), (2, 6), "(N, C, H, W)"),
    (lambda: build("cnn", width=0.25, seed=0), (2, 1, 8, 8), "(N, 3, H, W)"),
], ids=["conv-channels", "conv-ndim", "linear-ndim", "linear-features", "bn-channels",
        "maxpool-ndim", "gap-ndim", "model-channels"])
def test_wrong_input_shape_names_expected_and_actual(make, bad_shape, expected):
    layer = make()
    with pytest.raises(ShapeError) as err:
        layer.forward(np.ones(bad_shape, np.float32), train=True)
    assert expected in str(err.value)
    assert str(bad_shape) in str(err.value)


@pytest.mark.parametrize(("make", "in_shape"), EVERY_LAYER)
def test_float64_input_is_converted(make, in_shape):
    # Arrange: two identical layers, one fed float32 and one float64
    x32 = np.random.default_rng(0).standard_normal(in_shape).astype(np.float32)
    a, b = make(), make()
    for name, p in b.params().items():
        p[...] = a.params()[name]
    # Act
    y32 = a.forward(x32, train=True)
    y64 = b.forward(x32.astype(np.float64), train=True)
    # Assert
    assert y64.dtype == np.float32
    np.testing.assert_array_equal(y64, y32)


# ------------------------------------------------------------------ powerprop
@pytest.mark.parametrize(("alpha", "expect_zero"), [(1.25, True), (1.0, False)])
@pytest.mark.parametrize("make", [
    lambda alpha: Linear(4, 3, bias=False, alpha=alpha,
                         rng=np.random.default_rng(0)),
    lambda alpha: Conv2d(2, 3, 3, padding=1, bias=False, alpha=alpha,
                         rng=np.random.default_rng(0)),
], ids=["linear", "conv"])
def test_powerprop_zero_weight_gets_zero_gradient_only_when_alpha_above_one(
        make, alpha, expect_zero):
    # Arrange: one weight exactly zero, all inputs and output grads non-zero
    layer = make(alpha)
    layer.weight.flat[0] = 0.0
    rng = np.random.default_rng(1)
    in_shape = (3, 4) if isinstance(layer, Linear) else (2, 2, 4, 4)
    x = away_from_zero(rng, in_shape)
    y = layer.forward(x, train=True)
    # Act
    layer.backward(np.ones_like(y))
    # Assert
    assert (layer.grad_weight.flat[0] == 0.0) == expect_zero
    assert np.count_nonzero(layer.grad_weight) >= layer.weight.size - 1
