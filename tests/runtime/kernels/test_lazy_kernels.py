"""Kernels keep explicit signatures but load them at their first call
(runtime/kernels/config.py, ``kernel``): a process holds only the kernels it ran,
and a lazily loaded kernel computes exactly what an eagerly loaded one does."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from sparsefedpp.runtime.kernels import config, pool

STEP = """
import json, sys, numpy as np
from sparsefedpp.runtime import losses, models
from sparsefedpp.runtime.sparsity import pruning
from sparsefedpp.tools.kernel_cache import load_all, report
before = report()
if sys.argv[1] == "eager":
    load_all()
rng = np.random.default_rng(0)
model = models.build("resnet8", width=0.25, alpha=1.25, seed=0)
pruning.prune(model, 0.9)
x = rng.random((4, 3, 32, 32), dtype=np.float32)
_, g = losses.softmax_cross_entropy(model.forward(x, train=True), np.arange(4))
model.backward(g, input_grad=False)
after = report()
print(json.dumps({"before": [before.loaded, before.compiled, before.pending,
                             before.signatures],
                  "after_pending": after.pending,
                  "logits": model.forward(x, train=False).tolist(),
                  "grads": {k: v.ravel().tolist() for k, v in model.grads().items()}}))
"""


def _step(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", STEP, mode], capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # child processes: not in the emulated-ARM subset
def test_a_step_loads_only_its_kernels_and_computes_what_eager_loading_does():
    # A kernel compiled in this process and the same kernel loaded from Numba's
    # cache can differ in the last bit of float32 results (measured here, eager
    # and lazy alike), so the eager child first fills the cache and both children
    # under comparison load from it: the same machine code either way.
    _step("eager")
    lazy, eager = _step("lazy"), _step("eager")
    loaded, compiled, pending, signatures = lazy["before"]
    assert loaded == compiled == 0 and pending == signatures > 20  # import: none
    assert 0 < lazy["after_pending"] < signatures  # the step loaded some, not all
    assert eager["after_pending"] == 0
    assert lazy["logits"] == eager["logits"]
    assert lazy["grads"] == eager["grads"]


@pytest.mark.device  # part of the emulated-ARM subset (.ci/aarch64.sh)
def test_a_loaded_kernel_refuses_other_types_instead_of_compiling_them():
    config.load(pool._maxpool_backward)
    assert config.is_loaded(pool._maxpool_backward)
    bad = np.zeros((1, 1, 2, 2))  # float64: no explicit signature takes it
    with pytest.raises(TypeError):
        pool._maxpool_backward(bad, np.zeros((1, 1, 2, 2), np.int32), bad)
    assert len(pool._maxpool_backward.signatures) == 1


@pytest.mark.device  # part of the emulated-ARM subset (.ci/aarch64.sh)
def test_first_call_with_other_types_refuses_them_too():
    @config.kernel("i8(i8)", cache=False)
    def twice(a):  # pragma: no cover - compiled
        return 2 * a

    assert not config.is_loaded(twice)
    assert twice(np.int32(4)) == 8  # converted to the explicit i8, as njit does
    assert config.is_loaded(twice) and len(twice.signatures) == 1
    with pytest.raises(TypeError):
        twice(np.zeros(3))
    assert len(twice.signatures) == 1


@pytest.mark.device  # part of the emulated-ARM subset (.ci/aarch64.sh)
def test_a_kernel_called_by_another_is_loaded_with_its_own_signature():
    @config.kernel("f8(f8)", cache=False)
    def inner(a):  # pragma: no cover - compiled
        return a + 1.0

    @config.kernel("f8(i8)", cache=False)
    def outer(a):  # pragma: no cover - compiled
        return inner(a)

    assert outer(3) == 4.0
    assert [str(s) for s in inner.signatures] == ["(float64,)"]  # not (int64,)


@pytest.mark.device  # part of the emulated-ARM subset (.ci/aarch64.sh)
def test_kernel_needs_a_signature():
    with pytest.raises(ValueError, match="signature"):
        config.kernel([])
