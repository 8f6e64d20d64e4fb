"""``sparsefedpp warmup`` fills the kernel cache with every signature; a warm
process compiles nothing, not even inside a training round."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROUND = """
import json, numpy as np
from sparsefedpp.runtime import models
from sparsefedpp.trainer.local_round import LocalConfig, local_round
from sparsefedpp.trainer.methods import MethodConfig
from sparsefedpp.trainer.data import Dataset
from sparsefedpp.tools.kernel_cache import report
rng = np.random.default_rng(0)
data = Dataset(rng.integers(0, 255, (32, 3, 32, 32), dtype=np.uint8),
               rng.integers(0, 10, 32).astype(np.int64), tuple("0123456789"),
               (0.5,) * 3, (0.25,) * 3, "random")
for method, sparsity in (("sparsefedpp", 0.99), ("zerofl", 0.9), ("fedavg", 0.0)):
    model = models.build("resnet8", width=0.25, alpha=1.25, seed=0)
    local_round(model, data, MethodConfig(method, sparsity), LocalConfig(batch_size=8),
                lr=0.05, seed=0)
r = report()
print(json.dumps({"compiled": r.compiled, "loaded": r.loaded, "pending": r.pending}))
"""


def _run(args: list[str], cache) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    out = subprocess.run([sys.executable, *args], env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_warmup_then_a_round_compiles_nothing(tmp_path):
    cli = ["-m", "sparsefedpp.tools.cli", "warmup", "--json", "--quiet"]

    cold = _run(cli, tmp_path)
    warm = _run(cli, tmp_path)
    in_round = _run(["-c", ROUND], tmp_path)

    assert cold["compiled"] == cold["signatures"] > 20
    assert warm["compiled"] == 0 and warm["loaded_from_cache"] == warm["signatures"]
    assert str(tmp_path) in warm["cache_dir"]
    # kernels load at their first call: the rounds loaded what they ran, all of it
    # from the cache the warm-up filled
    assert in_round["compiled"] == 0 and in_round["loaded"] > 20
    assert in_round["loaded"] + in_round["pending"] == warm["signatures"]
