"""trainer/methods/: one module per federated method, the configuration validated
once, and no method-name branches anywhere else."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.trainer import methods
from sparsefedpp.trainer.methods import MethodConfig

ROOT = Path(__file__).resolve().parents[2]


def test_every_method_has_a_module_and_says_what_it_does():
    assert methods.METHODS == ("sparsefedpp", "zerofl", "topk", "fedavg")
    for name in methods.METHODS:
        m = methods.get(name)
        assert m.name == name and (ROOT / "trainer" / "methods" / f"{name}.py").is_file()
    assert methods.default_alpha("sparsefedpp") == 1.25
    assert {methods.default_alpha(n) for n in ("zerofl", "topk", "fedavg")} == {1.0}
    assert methods.get("zerofl").prune_scope == "layer"
    assert methods.get("topk").prune_scope == "global"
    assert methods.is_dense("fedavg") and not methods.is_dense("topk")
    assert methods.default_sparsity("fedavg") == 0.0
    assert methods.default_sparsity("topk") == 0.9


def test_the_server_side_numbers_come_from_the_method():
    z = MethodConfig("zerofl", 0.9, mask_ratio=0.05)
    assert z.upload_sparsity == pytest.approx(0.85)     # top 1 - s + mask_ratio
    assert z.spec.eval_sparsity(z) == 0.9                # accuracy at S
    t = MethodConfig("topk", 0.99)
    assert t.upload_sparsity == 0.99 and t.spec.eval_sparsity(t) == 0.99
    assert MethodConfig("topk", 0.0).spec.eval_sparsity(MethodConfig("topk", 0.0)) is None
    f = MethodConfig("fedavg")
    assert f.spec.eval_sparsity(f) is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="sgd"), "method: expected one of sparsefedpp, zerofl, topk, fedavg"),
    (dict(method="topk", sparsity=1.0), "sparsity: expected a fraction in [0, 1)"),
    (dict(method="fedavg", sparsity=0.5), "fedavg is dense"),
    (dict(method="zerofl", sparsity=0.5, mask_ratio=0.6), "mask_ratio"),
    (dict(method="topk", sparsity=0.5, layer_floor=-1), "layer_floor"),
])
def test_a_bad_configuration_is_refused_where_it_is_built(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        MethodConfig(**kwargs)


def test_no_method_name_branches_outside_the_methods_package():
    names = "|".join(methods.METHODS)
    branch = re.compile(rf"""(==|!=)\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    found = []
    for package in ("runtime", "trainer", "server", "tools"):
        for path in (ROOT / package).rglob("*.py"):
            if "methods" in path.relative_to(ROOT).parts:
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                # the aggregation rule server/robust calls "fedavg" is not a method
                if branch.search(line) and "aggregator" not in line:
                    found.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert found == []
