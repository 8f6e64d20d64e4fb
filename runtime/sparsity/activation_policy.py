"""Per-layer sparsity policies for the SWAT-style backward (DESIGN.md).

* ``fixed`` (ZeroFL / SWAT-U): every conv/linear layer but the first keeps the top
  (1 - s) of its input activations for backward, and (``weights=True``) uses only
  its top (1 - s) weights in forward and grad_input; thresholds refresh every
  ``refresh_every`` batches (SWAT: 10).
* ``weight_driven`` (SparseFedPP): layer l keeps 1 - s_l of its activations, where
  s_l is the fraction of exact zeros in its own weights right now, never less than
  ``min_keep``; thresholds are computed once per round (``refresh_every=0``; call
  ``reset_thresholds`` at the start of a round).
* ``dense``: everything off (dense FedAvg, Top-k's local training).

Each returns the kept fraction per layer, which is what the metrics record.
"""

from __future__ import annotations

from ..errors import ConfigError
from .pruning import prunable_layers, weight_sparsity

POLICIES = ("dense", "fixed", "weight_driven")


def _fraction(name: str, value: float, low_open: bool) -> float:
    v = float(value)
    ok = (0.0 < v <= 1.0) if low_open else (0.0 <= v < 1.0)
    if not ok:
        span = "(0, 1]" if low_open else "[0, 1)"
        raise ConfigError(f"activation policy {name}: expected a fraction in {span}, "
                          f"got {value!r}")
    return v


def dense(model) -> dict[str, float]:
    """Dense backward and dense forward weights in every layer."""
    for layer in prunable_layers(model).values():
        layer.sparsify_activations(None)
        layer.weight_keep = None
    return {name: 1.0 for name in prunable_layers(model)}


def fixed(model, sparsity: float, *, refresh_every: int = 10,
          first_layer_dense: bool = True, weights: bool = True) -> dict[str, float]:
    """ZeroFL/SWAT-U: the same sparsity s for activations (and weights) everywhere."""
    keep = 1.0 - _fraction("sparsity", sparsity, low_open=False)
    if int(refresh_every) != refresh_every or refresh_every < 0:
        raise ConfigError(f"activation policy refresh_every: expected an integer >= 0, "
                          f"got {refresh_every!r}")
    kept = {}
    for i, (name, layer) in enumerate(prunable_layers(model).items()):
        k = 1.0 if (i == 0 and first_layer_dense) else keep
        layer.sparsify_activations(k, int(refresh_every))
        layer.weight_keep = k if (weights and k < 1.0) else None
        kept[name] = k
    return kept


def weight_driven(model, *, min_keep: float = 0.05,
                  refresh_every: int = 0) -> dict[str, float]:
    """SparseFedPP: keep 1 - (the layer's weight sparsity), at least ``min_keep``."""
    floor = _fraction("min_keep", min_keep, low_open=True)
    kept = {}
    sparsity = weight_sparsity(model)
    for name, layer in prunable_layers(model).items():
        k = max(1.0 - sparsity[name], floor)
        layer.sparsify_activations(k, refresh_every)
        layer.weight_keep = None
        kept[name] = k
    return kept


def reset_thresholds(model) -> None:
    """Make every layer recompute its activation threshold exactly on the next batch."""
    for layer in prunable_layers(model).values():
        layer.reset_thresholds()
