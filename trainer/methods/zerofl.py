"""ZeroFL (Qiu et al., ICLR 2022): SWAT with a fixed sparsity s for the weights
and the kept activations of every layer but the first (thresholds refreshed
every ``swat_refresh`` batches); the upload keeps the top 1 - s + mask_ratio of
each layer's weights (per layer, as SWAT-U: the same sparsity everywhere)."""

from __future__ import annotations

from sparsefedpp.runtime.sparsity import activation_policy

from .base import Method, MethodConfig


class ZeroFL(Method):
    name = "zerofl"
    prune_scope = "layer"

    def upload_sparsity(self, cfg: MethodConfig) -> float:
        return cfg.sparsity - cfg.mask_ratio

    def prepare(self, model, cfg: MethodConfig) -> dict[str, float]:
        if cfg.sparsity > 0:
            return activation_policy.fixed(model, cfg.sparsity,
                                           refresh_every=cfg.swat_refresh)
        return activation_policy.dense(model)


METHOD = ZeroFL()
