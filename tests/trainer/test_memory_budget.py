"""The memory budget: sizes, the batch-size plan, and that the estimate bounds a real
round's peak (measured with VmHWM after resetting it)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.trainer.data import Dataset
from sparsefedpp.trainer.memory_budget import parse_size, plan_batch_size

SPEC = {"name": "resnet8", "num_classes": 10, "width": 1.0, "alpha": 1.25,
        "in_channels": 3}
MB = 1 << 20


def _data(n: int = 8) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
                   rng.integers(0, 10, n).astype(np.int64), tuple("0123456789"),
                   (0.5,) * 3, (0.25,) * 3, "random")


@pytest.mark.parametrize("text, size", [("256M", 256 * MB), ("1G", 1 << 30),
                                        ("512MiB", 512 * MB), ("300k", 300 << 10),
                                        ("1000", 1000), ("1.5G", int(1.5 * (1 << 30)))])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "12T", "-5M", "lots"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(ConfigError, match="memory size"):
        parse_size(text)


def test_a_roomy_budget_keeps_the_batch_size():
    assert plan_batch_size(10 << 30, 32, SPEC, _data(), rss=150 * MB)[0] == 32


def test_a_tight_budget_halves_the_batch_size():
    batch, estimate = plan_batch_size(150 * MB + 30 * MB, 32, SPEC, _data(),
                                      rss=150 * MB)

    assert batch in (4, 8, 16) and estimate <= 180 * MB


def test_no_room_at_all_is_refused_with_the_figures():
    with pytest.raises(ConfigError, match="at least .* MB for a round at batch size 1"):
        plan_batch_size(150 * MB, 32, SPEC, _data(), rss=150 * MB)


def test_recompute_fits_the_announced_batch_where_holding_needs_a_smaller_one():
    from sparsefedpp.trainer.memory_budget import GROWTH, MARGIN, dense_held_per_example

    shape = _data().images.shape[1:]
    held = dense_held_per_example(SPEC, shape)
    rebuilt = dense_held_per_example(SPEC, shape, recompute=True)
    assert 0.2 * held < rebuilt < 0.8 * held, (held, rebuilt)
    budget = int(150 * MB + GROWTH * rebuilt * 32 + MARGIN) + MB
    assert plan_batch_size(budget, 32, SPEC, _data(), rss=150 * MB)[0] < 32
    assert plan_batch_size(budget, 32, SPEC, _data(), rss=150 * MB,
                           recompute=True)[0] == 32
    cnn = {**SPEC, "name": "cnn"}  # no residual blocks: recompute changes nothing
    assert dense_held_per_example(cnn, shape, True) == dense_held_per_example(cnn, shape)


PROBE = """
import json, numpy as np
from sparsefedpp.trainer.local_round import LocalConfig, local_round
from sparsefedpp.trainer.methods import MethodConfig
from sparsefedpp.trainer.data import Dataset
from sparsefedpp.trainer.memory_budget import current_rss, plan_batch_size
from sparsefedpp.runtime import models
rng = np.random.default_rng(0)
data = Dataset(rng.integers(0, 256, (256, 3, 32, 32), dtype=np.uint8),
               rng.integers(0, 10, 256).astype(np.int64), tuple("0123456789"),
               (0.5,) * 3, (0.25,) * 3, "random")
spec = %r
model = models.build("resnet8", alpha=1.25, seed=0)
local_round(model, data.subset(np.arange(4)), MethodConfig("fedavg"),
            LocalConfig(batch_size=4), lr=0.01, seed=0)   # first-call allocations
out = {}
for method, sparsity, re in (("fedavg", 0.0, False), ("sparsefedpp", 0.99, False),
                             ("sparsefedpp", 0.99, True)):
    rss = current_rss()
    batch, estimate = plan_batch_size(rss + 40 * 2**20, 64, spec, data, recompute=re)
    open("/proc/self/clear_refs", "w").write("5")   # reset VmHWM to the current RSS
    local_round(model, data, MethodConfig(method, sparsity),
                LocalConfig(batch_size=batch, recompute=re), lr=0.01, seed=0)
    peak = [int(l.split()[1]) * 1024 for l in open("/proc/self/status")
            if l.startswith("VmHWM:")][0]
    out[method + ("+recompute" if re else "")] = {"batch": batch, "estimate": estimate,
                                                  "peak": peak, "rss": rss}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_the_estimate_bounds_the_measured_peak_of_a_round():
    out = subprocess.run([sys.executable, "-c", PROBE % (SPEC,)], capture_output=True,
                         text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = json.loads(out.stdout.strip().splitlines()[-1])

    for name, r in runs.items():
        assert 1 <= r["batch"] < 64, (name, r)   # the 40 MB budget forced a smaller batch
        assert r["peak"] <= r["estimate"], (name, r)


def test_a_device_turns_on_recompute_before_it_halves_the_batch(tmp_path, monkeypatch):
    from sparsefedpp.runtime.wire.broker import BrokerSettings
    from sparsefedpp.trainer import device_agent, memory_budget
    from sparsefedpp.trainer.device_agent import AgentConfig, DeviceAgent
    from sparsefedpp.trainer.local_round import LocalConfig

    monkeypatch.setattr(memory_budget, "current_rss", lambda: 150 * MB)
    shape = _data().images.shape[1:]
    rebuilt = memory_budget.dense_held_per_example(SPEC, shape, recompute=True)
    fits_rebuilt = int(150 * MB + memory_budget.GROWTH * rebuilt * 32
                       + memory_budget.MARGIN) + MB

    def fit(budget, recompute=False):
        agent = DeviceAgent(AgentConfig("dev", str(tmp_path / "state"),
                                        max_memory=budget, recompute=recompute),
                            _data(), BrokerSettings("127.0.0.1", 1))
        return agent._fit_memory(LocalConfig(batch_size=32), SPEC, _data())

    assert fit(None) == LocalConfig(batch_size=32)
    assert fit(None, recompute=True) == LocalConfig(batch_size=32, recompute=True)
    assert fit(fits_rebuilt) == LocalConfig(batch_size=32, recompute=True)
    tight = fit(150 * MB + 30 * MB)  # even recomputing needs a smaller batch
    assert tight.recompute and tight.batch_size < 32
    assert fit(10 << 30) == LocalConfig(batch_size=32)  # roomy: nothing changes
    assert device_agent.plan_batch_size is memory_budget.plan_batch_size
