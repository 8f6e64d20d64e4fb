"""Model zoo and state dicts: torchvision names and shapes, width and channel options,
load_state_dict checks (all-or-nothing), and build() validation."""

from __future__ import annotations

import numpy as np
import pytest
from sparsefedpp.runtime import ConfigError, ShapeError, build

pytestmark = pytest.mark.device  # part of the emulated-ARM subset (.ci/aarch64.sh)


@pytest.fixture(scope="module")
def resnet18():
    return build("resnet18", seed=0)


# ---------------------------------------------------------------- names
@pytest.mark.parametrize("name", [
    "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
    "bn1.num_batches_tracked", "layer1.0.conv1.weight", "layer1.0.bn2.running_var",
    "layer2.0.downsample.0.weight", "layer2.0.downsample.1.weight",
    "layer2.0.downsample.1.num_batches_tracked", "layer3.0.conv2.weight",
    "fc.weight", "fc.bias",
])
def test_resnet8_state_dict_has_torchvision_name(name):
    assert name in build("resnet8", seed=0).state_dict()


def test_resnet8_has_no_shortcut_conv_where_shape_is_kept():
    names = build("resnet8", seed=0).state_dict()
    assert not any(k.startswith("layer1.0.downsample") for k in names)
    assert not any("bias" in k for k in names if "conv" in k)  # convs before BN


def test_resnet18_has_four_stages_of_two_blocks(resnet18):
    # Arrange
    names = resnet18.state_dict()
    # Act: every block index under every stage
    blocks = {".".join(k.split(".")[:2]) for k in names if k.startswith("layer")}
    # Assert
    assert blocks == {f"layer{i}.{b}" for i in range(1, 5) for b in (0, 1)}


@pytest.mark.parametrize(("stage", "planes"), [(1, 64), (2, 128), (3, 256), (4, 512)])
def test_resnet18_stage_widths(resnet18, stage, planes):
    state = resnet18.state_dict()
    assert state[f"layer{stage}.0.conv1.weight"].shape[0] == planes
    assert state[f"layer{stage}.1.conv2.weight"].shape == (planes, planes, 3, 3)
    assert state[f"layer{stage}.1.bn2.running_mean"].shape == (planes,)


def test_resnet18_shapes_match_torchvision(resnet18):
    state = resnet18.state_dict()
    assert state["conv1.weight"].shape == (64, 3, 3, 3)  # CIFAR stem: 3x3, stride 1
    assert state["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert state["fc.weight"].shape == (10, 512)
    assert state["bn1.num_batches_tracked"].shape == ()
    assert state["bn1.num_batches_tracked"].dtype == np.int64


@pytest.mark.parametrize(("name", "count"), [
    ("resnet8", 77_360),
    # stem 1728 + stages (2 blocks each, shortcut 1x1 from stage 2) + fc 5120
    ("resnet18", 11_164_352),
])
def test_prunable_weight_count(name, count, resnet18):
    model = resnet18 if name == "resnet18" else build(name, seed=0)
    assert sum(w.size for w in model.prunable().values()) == count


def test_prunable_holds_the_conv_and_linear_weights_only():
    model = build("resnet8", seed=0)
    names = set(model.prunable())
    assert names == {k for k, v in model.params().items() if v.ndim in (2, 4)}


def test_buffers_are_not_params():
    model = build("resnet8", seed=0)
    assert not set(model.buffers()) & set(model.params())
    assert set(model.state_dict()) == set(model.params()) | set(model.buffers())


@pytest.mark.parametrize("name", ["cnn", "resnet8"])
def test_grads_have_the_keys_and_shapes_of_params(name):
    model = build(name, width=0.5, seed=0)
    params, grads = model.params(), model.grads()
    assert list(grads) == list(params)
    assert all(grads[k].shape == p.shape for k, p in params.items())
    assert all(grads[k].dtype == np.float32 for k in params)


def test_params_are_the_live_arrays():
    # Arrange
    model = build("cnn", width=0.25, seed=0)
    # Act: writes through params() reach the model, state_dict() returns copies
    model.params()["fc.bias"][:] = 7.0
    model.state_dict()["fc.bias"][:] = -1.0
    # Assert
    np.testing.assert_array_equal(model.state_dict()["fc.bias"], 7.0)


# ---------------------------------------------------------- width, channels
@pytest.mark.parametrize(("name", "width", "tensor", "out_channels"), [
    ("resnet8", 1.0, "conv1.weight", 16),
    ("resnet8", 0.5, "conv1.weight", 8),
    ("resnet8", 0.5, "layer3.0.conv2.weight", 32),
    ("resnet8", 2.0, "layer2.0.conv1.weight", 64),
    ("resnet18", 0.25, "layer4.1.conv2.weight", 128),
    ("cnn", 1.0, "conv3.weight", 128),
    ("cnn", 0.5, "conv2.weight", 32),
    ("cnn", 0.01, "conv1.weight", 1),  # never fewer than one channel
])
def test_width_multiplier_scales_channels(name, width, tensor, out_channels):
    model = build(name, width=width, seed=0)
    assert model.state_dict()[tensor].shape[0] == out_channels


@pytest.mark.parametrize("name", ["cnn", "resnet8"])
def test_one_input_channel_runs_on_28x28(name):
    # Arrange
    model = build(name, num_classes=10, in_channels=1, width=0.5, seed=0)
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    # Act
    logits = model.forward(x, train=True)
    grad_x = model.backward(np.ones_like(logits))
    # Assert
    assert model.state_dict()["conv1.weight"].shape[1] == 1
    assert logits.shape == (3, 10)
    assert grad_x.shape == x.shape
    assert np.all(np.isfinite(logits))


def test_num_classes_sets_the_head():
    model = build("resnet8", num_classes=7, seed=0)
    assert model.state_dict()["fc.weight"].shape == (7, 64)


def test_seed_makes_build_deterministic():
    a, b = build("resnet8", seed=3), build("resnet8", seed=3)
    c = build("resnet8", seed=4)
    assert all(np.array_equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not np.array_equal(a.state_dict()["fc.weight"], c.state_dict()["fc.weight"])


@pytest.mark.parametrize("kwargs", [
    {"name": "vgg16"}, {"name": "ResNet8"}, {"name": "resnet8", "width": 0},
    {"name": "resnet8", "width": -0.5}, {"name": "resnet8", "width": float("nan")},
    {"name": "resnet8", "width": float("inf")}, {"name": "cnn", "num_classes": 0},
    {"name": "cnn", "in_channels": 0}, {"name": "cnn", "in_channels": 1.5},
    {"name": "cnn", "alpha": 0.5},
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_build_rejects_bad_arguments(kwargs):
    with pytest.raises(ConfigError):
        build(**kwargs)


def test_build_error_lists_the_known_names():
    with pytest.raises(ConfigError, match="cnn, resnet8, resnet18.*'vgg16'"):
        build("vgg16")


# ----------------------------------------------------------- load_state_dict
def test_load_state_dict_round_trip():
    # Arrange: two models with different weights and running stats
    src, dst = build("resnet8", width=0.5, seed=1), build("resnet8", width=0.5, seed=2)
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    src.forward(x, train=True)  # moves running stats and num_batches_tracked
    # Act
    dst.load_state_dict(src.state_dict())
    # Assert: same tensors, same eval outputs
    for name, arr in src.state_dict().items():
        np.testing.assert_array_equal(dst.state_dict()[name], arr, err_msg=name)
    np.testing.assert_array_equal(dst.forward(x, train=False),
                                  src.forward(x, train=False))


def test_load_state_dict_accepts_missing_num_batches_tracked():
    model = build("resnet8", width=0.25, seed=0)
    state = {k: v for k, v in build("resnet8", width=0.25, seed=1).state_dict().items()
             if not k.endswith("num_batches_tracked")}
    model.load_state_dict(state)
    np.testing.assert_array_equal(model.state_dict()["fc.weight"], state["fc.weight"])


def corrupt(state, how):
    """Return a copy of ``state`` broken in one tensor, and that tensor's name."""
    state = dict(state)
    if how == "missing":
        del state["layer2.0.bn1.bias"]
        return state, "layer2.0.bn1.bias"
    if how == "unexpected":
        state["layer9.0.conv1.weight"] = np.zeros(3, np.float32)
        return state, "layer9.0.conv1.weight"
    if how == "shape":
        state["layer3.0.conv2.weight"] = state["layer3.0.conv2.weight"][:, :-1]
        return state, "layer3.0.conv2.weight"
    if how == "transposed":
        state["fc.weight"] = state["fc.weight"].T
        return state, "fc.weight"
    if how == "nan":
        state["fc.bias"] = state["fc.bias"].copy()
        state["fc.bias"][3] = np.nan
        return state, "fc.bias"
    if how == "inf":
        state["bn1.running_var"] = np.full_like(state["bn1.running_var"], np.inf)
        return state, "bn1.running_var"
    if how == "strings":
        state["fc.bias"] = np.array(["a"] * state["fc.bias"].size)
        return state, "fc.bias"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing", "unexpected", "shape", "transposed", "nan",
                                 "inf", "strings"])
def test_bad_state_dict_raises_naming_the_tensor_and_changes_nothing(how):
    # Arrange: every other tensor differs from the model's, so a partial write shows
    model = build("resnet8", width=0.25, seed=0)
    before = model.state_dict()
    bad, culprit = corrupt(build("resnet8", width=0.25, seed=1).state_dict(), how)
    # Act
    with pytest.raises(ShapeError) as err:
        model.load_state_dict(bad)
    # Assert
    assert culprit in str(err.value)
    for name, arr in model.state_dict().items():
        np.testing.assert_array_equal(arr, before[name], err_msg=name)


def test_non_strict_load_ignores_unknown_names():
    model = build("cnn", width=0.25, seed=0)
    state = build("cnn", width=0.25, seed=1).state_dict()
    state["extra.weight"] = np.zeros(2, np.float32)
    model.load_state_dict(state, strict=False)
    np.testing.assert_array_equal(model.state_dict()["fc.bias"], state["fc.bias"])


@pytest.mark.parametrize("name", ["cnn", "resnet8"])
def test_backward_without_input_grad_leaves_the_same_parameter_grads(name):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    grads = []
    for input_grad in (True, False):
        model = build(name, width=0.25, seed=1)
        logits = model.forward(x, train=True)
        out = model.backward(np.ones_like(logits) / len(x), input_grad=input_grad)
        assert (out is None) == (not input_grad)
        grads.append({k: v.copy() for k, v in model.grads().items()})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        np.testing.assert_array_equal(grads[0][k], grads[1][k], err_msg=k)


def test_zero_grad_clears_every_gradient_after_a_step():
    model = build("resnet8", width=0.25, alpha=1.25, seed=2)
    from sparsefedpp.runtime.sparsity import pruning
    pruning.prune(model, 0.9)
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    logits = model.forward(x, train=True)
    model.backward(np.ones_like(logits), input_grad=False)
    assert any(np.any(g) for g in model.grads().values())
    model.zero_grad()
    assert not any(np.any(g) for g in model.grads().values())


def _plain_init_weight(shape, fan_in, alpha, rng):
    """powerprop.init_weight as it was written before it ran in place: the
    reference the seeded initialisation must keep matching bit for bit."""
    std = np.sqrt(1.0 / fan_in) / 0.87962566
    z = rng.standard_normal(shape)
    bad = np.abs(z) > 2.0
    while bad.any():
        z[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(z) > 2.0
    u = z * std
    return (np.sign(u) * np.abs(u) ** (1.0 / alpha)).astype(np.float32)


@pytest.mark.parametrize("alpha", [1.0, 1.25, 2.0, 3.0])
@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (10, 64), (7,)])
def test_in_place_init_is_the_same_bits_as_the_plain_expression(alpha, shape):
    from sparsefedpp.runtime.layers import powerprop

    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 3
    got = powerprop.init_weight(shape, fan_in, alpha, np.random.default_rng(5))
    want = _plain_init_weight(shape, fan_in, alpha, np.random.default_rng(5))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("name", ["cnn", "resnet8"])
def test_build_without_init_draws_nothing_and_then_equals_the_loaded_model(
        name, monkeypatch):
    from sparsefedpp.runtime import losses

    source = build(name, width=0.25, alpha=1.25, seed=4)
    x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    source.forward(x, train=True)  # moves the BatchNorm running statistics
    state = source.state_dict()

    def no_draws(*args, **kwargs):
        raise AssertionError("a model built with init=False drew random numbers")

    monkeypatch.setattr(np.random, "default_rng", no_draws)
    client = build(name, width=0.25, alpha=1.25, init=False)
    monkeypatch.undo()
    for key, arr in client.params().items():
        if "bn" not in key and "downsample.1" not in key:  # conv/linear weight, bias
            assert not arr.any(), key
    client.load_state_dict(state)
    for key, arr in client.state_dict().items():
        np.testing.assert_array_equal(arr, state[key], err_msg=key)
    fresh = build(name, width=0.25, alpha=1.25, seed=4)
    fresh.load_state_dict(state)
    for model in (client, fresh):
        model.zero_grad()
        logits = model.forward(x, train=True)
        model.backward(losses.softmax_cross_entropy(logits, np.array([1, 2]))[1],
                       input_grad=False)
    np.testing.assert_array_equal(client.forward(x, train=False),
                                  fresh.forward(x, train=False))
    for key, g in client.grads().items():
        np.testing.assert_array_equal(g, fresh.grads()[key], err_msg=key)


def test_build_init_must_be_a_bool():
    with pytest.raises(ConfigError, match="init"):
        build("cnn", init="zeros")
