"""SGD (PyTorch's update rule, written out here by hand) and the LR schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sparsefedpp.runtime import SGD, CheckpointError, ConfigError, lr_schedule

pytestmark = pytest.mark.device  # part of the emulated-ARM subset (.ci/aarch64.sh)


# ---------------------------------------------------------------- schedules
@given(lr0=st.floats(1e-4, 1.0), ratio=st.floats(1e-4, 1.0), total=st.integers(1, 500))
def test_exponential_runs_geometrically_from_lr0_to_lr_end(lr0, ratio, total):
    # Arrange
    lr_end = lr0 * ratio
    f = lr_schedule("exponential", lr0, total, lr_end=lr_end)
    # Act
    lrs = np.array([f(t) for t in range(total + 1)])
    # Assert: the ends, and one constant ratio between neighbours
    assert math.isclose(lrs[0], lr0, rel_tol=1e-12)
    assert math.isclose(lrs[-1], lr_end, rel_tol=1e-9)
    np.testing.assert_allclose(lrs[1:] / lrs[:-1], ratio ** (1 / total), rtol=1e-9)


def test_exponential_stays_at_lr_end_after_the_last_step():
    f = lr_schedule("exponential", 0.1, 10, lr_end=0.001)
    assert math.isclose(f(25), 0.001, rel_tol=1e-12)


@given(lr0=st.floats(1e-4, 1.0), frac=st.floats(0.0, 1.0), total=st.integers(1, 500))
def test_cosine_runs_from_lr0_down_to_lr_end(lr0, frac, total):
    # Arrange
    lr_end = lr0 * frac
    f = lr_schedule("cosine", lr0, total, lr_end=lr_end)
    # Act
    lrs = np.array([f(t) for t in range(total + 1)])
    # Assert
    assert math.isclose(lrs[0], lr0, rel_tol=1e-12)
    assert math.isclose(lrs[-1], lr_end, rel_tol=1e-9, abs_tol=1e-15)
    assert np.all(np.diff(lrs) <= 1e-15)
    assert math.isclose(f(total / 2), (lr0 + lr_end) / 2, rel_tol=1e-9)
    assert math.isclose(f(2 * total), lr_end, rel_tol=1e-9, abs_tol=1e-15)


@pytest.mark.parametrize(("step_size", "gamma", "expected"), [
    (1, 0.1, [1.0, 0.1, 0.01, 0.001, 1e-4, 1e-5, 1e-6]),
    (3, 0.5, [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]),
    (10, 0.1, [1.0] * 7),
])
def test_step_schedule(step_size, gamma, expected):
    f = lr_schedule("step", 1.0, 100, step_size=step_size, gamma=gamma)
    np.testing.assert_allclose([f(t) for t in range(7)], expected, rtol=1e-12)


def test_constant_schedule():
    f = lr_schedule("constant", 0.05, 10)
    assert [f(t) for t in (0, 5, 10, 99)] == [0.05] * 4


@pytest.mark.parametrize(("args", "kwargs"), [
    (("linear", 0.1, 10), {}),
    (("cosine", 0.1, 0), {}),
    (("step", 0.1, 10), {"step_size": 0}),
    (("exponential", 0.1, 10), {"lr_end": 0.0}),
    (("exponential", 0.0, 10), {"lr_end": 0.01}),
], ids=["unknown-kind", "no-steps", "step-size-0", "exp-to-zero", "exp-from-zero"])
def test_bad_schedule_raises_config_error(args, kwargs):
    with pytest.raises(ConfigError):
        lr_schedule(*args, **kwargs)


# -------------------------------------------------------------------- SGD
def arrays_like(seed, names=("a", "b"), shape=(3, 4)):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(shape).astype(np.float32) for n in names}


def torch_rule(p, grads, lr, momentum, weight_decay, nesterov, dampening):
    """torch.optim.SGD written out in float64, one parameter, several steps."""
    p = p.astype(np.float64)
    buf = None
    for g in grads:
        g = g + weight_decay * p
        if momentum:
            buf = g.copy() if buf is None else momentum * buf + (1 - dampening) * g
            g = g + momentum * buf if nesterov else buf
        p = p - lr * g
    return p


@pytest.mark.parametrize(("momentum", "weight_decay", "nesterov", "dampening"), [
    (0.0, 0.0, False, 0.0),
    (0.0, 5e-4, False, 0.0),
    (0.9, 0.0, False, 0.0),
    (0.9, 5e-4, False, 0.0),
    (0.9, 5e-4, True, 0.0),
    (0.5, 1e-2, False, 0.3),
])
def test_sgd_follows_the_torch_rule(momentum, weight_decay, nesterov, dampening):
    # Arrange
    params = arrays_like(0)
    start = {k: v.copy() for k, v in params.items()}
    grads = {k: np.zeros_like(v) for k, v in params.items()}
    step_grads = [arrays_like(s) for s in (1, 2, 3)]
    opt = SGD(params, grads, 0.1, momentum=momentum, weight_decay=weight_decay,
              nesterov=nesterov, dampening=dampening)
    # Act
    for g in step_grads:
        for k, grad in grads.items():
            grad[...] = g[k]
        opt.step()
    # Assert
    for k in params:
        ref = torch_rule(start[k], [g[k] for g in step_grads], 0.1, momentum,
                         weight_decay, nesterov, dampening)
        np.testing.assert_allclose(params[k], ref, rtol=1e-5, atol=1e-6)


def test_sgd_updates_in_place_and_leaves_grads_alone():
    params, grads = arrays_like(0), arrays_like(1)
    p_ids, g_before = {k: id(v) for k, v in params.items()}, arrays_like(1)
    SGD(params, grads, 0.1, momentum=0.9, weight_decay=1e-3).step()
    assert {k: id(v) for k, v in params.items()} == p_ids
    assert all(np.array_equal(grads[k], g_before[k]) for k in grads)
    assert all(params[k].dtype == np.float32 for k in params)


@pytest.mark.parametrize("kwargs", [
    {"lr": -0.1}, {"lr": float("nan")}, {"lr": float("inf")}, {"lr": "0.1"},
    {"lr": 0.1, "momentum": -0.9}, {"lr": 0.1, "weight_decay": -1e-4},
    {"lr": 0.1, "nesterov": True},
    {"lr": 0.1, "momentum": 0.9, "nesterov": True, "dampening": 0.1},
], ids=["lr<0", "lr-nan", "lr-inf", "lr-str", "momentum<0", "wd<0",
        "nesterov-no-momentum", "nesterov-dampening"])
def test_sgd_rejects_bad_hyper_parameters(kwargs):
    with pytest.raises(ConfigError):
        SGD(arrays_like(0), arrays_like(1), **kwargs)


@pytest.mark.parametrize(("params", "grads"), [
    ({}, {}),
    (arrays_like(0, ("a", "b")), arrays_like(1, ("a", "c"))),
], ids=["empty", "names-differ"])
def test_sgd_rejects_bad_param_dicts(params, grads):
    with pytest.raises(ConfigError):
        SGD(params, grads, 0.1)


def test_sgd_state_round_trip_continues_identically():
    # Arrange: two optimizers, the second restored from the first after one step
    params_a, grads = arrays_like(0), arrays_like(1)
    params_b = {k: v.copy() for k, v in params_a.items()}
    a = SGD(params_a, grads, 0.1, momentum=0.9, nesterov=True)
    a.step()
    for k, p in params_b.items():
        p[...] = params_a[k]
    b = SGD(params_b, grads, 0.1, momentum=0.9, nesterov=True)
    # Act
    b.load_state_dict(a.state_dict())
    a.step()
    b.step()
    # Assert
    for k in params_a:
        np.testing.assert_array_equal(params_b[k], params_a[k])


def test_sgd_load_state_dict_rejects_a_buffer_of_the_wrong_shape():
    opt = SGD(arrays_like(0), arrays_like(1), 0.1, momentum=0.9)
    with pytest.raises(CheckpointError, match="momentum_buffer.a"):
        opt.load_state_dict({"momentum_buffer.a": np.zeros((4, 3), np.float32)})
