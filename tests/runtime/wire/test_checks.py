"""runtime/wire/checks.py: the one check of an update's tensors, and the trust it
gives to what ``decode`` already scanned (validate once, on arrival)."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from sparsefedpp.runtime.wire import codec
from sparsefedpp.runtime.wire.checks import (
    MAX_INTEGER,
    CheckedTensors,
    finite_problem,
    tensors_problem,
)

pytestmark = pytest.mark.device


def _global() -> dict:
    return {"w": np.zeros((2, 2), np.float32), "n": np.array(0, np.int64)}


def test_tensors_problem_names_what_is_wrong():
    g = _global()
    assert tensors_problem({"w": np.ones((2, 2), np.float32),
                            "n": np.array(5)}, g) == ""
    assert "missing ['n']" in tensors_problem({"w": g["w"]}, g)
    assert "extra ['x']" in tensors_problem({**g, "x": g["w"]}, g)
    assert "shape" in tensors_problem({"w": np.zeros(4, np.float32), "n": g["n"]}, g)
    assert "dtype" in tensors_problem({"w": np.zeros((2, 2), np.int64), "n": g["n"]}, g)
    assert "got float64" in tensors_problem({"w": np.zeros((2, 2)), "n": g["n"]}, g)
    assert "integers within" in tensors_problem(
        {"w": g["w"], "n": np.array(2**40, np.int64)}, g)
    assert "integers within" in tensors_problem(  # would wrap to -2**63
        {"w": g["w"], "n": np.array(2**63, np.uint64)}, g)
    assert tensors_problem({"w": g["w"], "n": np.array(MAX_INTEGER, np.int64)}, g) == ""
    # the bound is for where counters are summed; arrival checks may leave it off
    assert tensors_problem({"w": g["w"], "n": np.array(2**40, np.int64)}, g,
                           max_integer=None) == ""


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_plain_dict_is_scanned_for_non_finite_values(bad):
    t = _global()
    t["w"][1, 0] = bad
    assert finite_problem(t) == "tensor 'w' holds NaN or inf (training diverged?)"
    assert tensors_problem(t, _global()) == finite_problem(t)


def test_decode_returns_checked_tensors_that_later_checks_trust():
    msg = codec.decode(codec.encode(codec.Message("update", 0, "d", "fedavg", _global(),
                                                  num_examples=3)))
    assert isinstance(msg.tensors, CheckedTensors)
    assert tensors_problem(msg.tensors, _global()) == ""
    # trust covers only the value scan decode did: names, shapes, dtypes and
    # integer ranges are still checked against the model they must fit
    other = {"w": np.zeros((2, 3), np.float32), "n": np.array(0, np.int64)}
    assert "shape" in tensors_problem(msg.tensors, other)
    big = CheckedTensors({"w": _global()["w"], "n": np.array(2**40, np.int64)})
    assert "integers within" in tensors_problem(big, _global())
    # what the trust means: the finite scan is not repeated (decode refuses NaN,
    # so only a hand-built CheckedTensors can hold one)
    forged = CheckedTensors({"w": np.full((2, 2), np.nan, np.float32),
                             "n": np.array(0, np.int64)})
    assert finite_problem(forged) == "" and tensors_problem(forged, _global()) == ""


def test_checked_tensors_are_read_only_and_copy_to_a_checked_copy():
    t = CheckedTensors(_global())
    for mutate in (lambda: t.__setitem__("w", np.zeros(1)), lambda: t.pop("w"),
                   lambda: t.update(x=1), lambda: t.__delitem__("n"), t.clear,
                   lambda: t.setdefault("x", 1), t.popitem):
        with pytest.raises(TypeError, match="read-only"):
            mutate()
    assert set(t) == {"w", "n"}
    for clone in (pickle.loads(pickle.dumps(t)), copy.deepcopy(t), copy.copy(t)):
        assert isinstance(clone, CheckedTensors) and set(clone) == {"w", "n"}
    edited = dict(t)  # an editable copy is a plain dict: checked in full again
    edited["w"] = np.full((2, 2), np.inf, np.float32)
    assert "NaN or inf" in tensors_problem(edited, _global())
