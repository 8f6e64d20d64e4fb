"""Dense FedAvg: plain layers, dense training, a dense upload; the baseline."""

from __future__ import annotations

from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.runtime.sparsity import pruning

from .base import Method, MethodConfig


class FedAvg(Method):
    name = "fedavg"
    default_sparsity = 0.0
    dense = True

    def check(self, cfg: MethodConfig) -> None:
        if cfg.sparsity != 0.0:
            raise ConfigError(f"fedavg is dense: expected sparsity 0, got {cfg.sparsity}; "
                              "use --method topk for magnitude-pruned FedAvg")

    def finish(self, model, cfg: MethodConfig) -> dict[str, int]:
        return pruning.nonzeros(model)

    def eval_sparsity(self, cfg: MethodConfig) -> float | None:
        return None


METHOD = FedAvg()
