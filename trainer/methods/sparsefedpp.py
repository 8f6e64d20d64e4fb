"""SparseFedPP: Powerprop layers (alpha 1.25) whose zeros stay zero in local
training, so the clients' masks agree; each layer's activation sparsity follows
its current weight sparsity (floor ``min_keep``) with thresholds computed once
per round; after training, one global magnitude pruning to the target."""

from __future__ import annotations

from sparsefedpp.runtime.sparsity import activation_policy

from .base import Method, MethodConfig


class SparseFedPP(Method):
    name = "sparsefedpp"
    alpha = 1.25

    def prepare(self, model, cfg: MethodConfig) -> dict[str, float]:
        kept = activation_policy.weight_driven(model, min_keep=cfg.min_keep)
        activation_policy.reset_thresholds(model)
        return kept


METHOD = SparseFedPP()
