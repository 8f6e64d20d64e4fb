"""The client side of each federated method: one round of local training on a device.

A round is: load the global model, set the method's sparsity machinery, train
locally (SGD at the round's learning rate), apply the method's post-training
pruning, and hand back the tensors to upload (DESIGN.md, "SparseFedPP, per client
and round"):

* ``sparsefedpp``: Powerprop layers (alpha 1.25); each layer's activation sparsity
  follows its current weight sparsity (floor ``min_keep``), thresholds computed
  once per round; after training, one global magnitude pruning to the target.
* ``zerofl``: SWAT layers with a fixed sparsity s for weights and activations
  (first layer dense, thresholds refreshed every ``swat_refresh`` batches); the
  upload keeps the top 1 - s + mask_ratio of each layer's weights.
* ``topk``: plain layers, dense local training, global magnitude pruning after.
* ``fedavg``: dense everything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from sparsefedpp.runtime import activation_policy, pruning
from sparsefedpp.runtime.errors import ConfigError

from .data import Dataset
from .local import TrainConfig, train_epochs

METHODS = ("sparsefedpp", "zerofl", "topk", "fedavg")


def default_alpha(method: str) -> float:
    """Powerprop exponent a method trains with (SparseFedPP's reference: 1.25)."""
    return 1.25 if method == "sparsefedpp" else 1.0


@dataclass(frozen=True)
class MethodConfig:
    """What makes the methods differ; everything else is shared local training."""

    method: str
    sparsity: float = 0.0       # target weight sparsity of the upload
    mask_ratio: float = 0.0     # ZeroFL: extra upload density above 1 - sparsity
    min_keep: float = 0.05      # SparseFedPP: floor on the kept activation fraction
    swat_refresh: int = 10      # ZeroFL: activation/weight threshold refresh period
    layer_floor: int = 0        # not the reference: weights every layer keeps (0 off)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"method: expected one of {', '.join(METHODS)}, got "
                              f"{self.method!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity: expected a fraction in [0, 1), got {self.sparsity!r}")
        if self.method == "fedavg" and self.sparsity != 0.0:
            raise ConfigError(f"fedavg is dense: expected sparsity 0, got {self.sparsity}; "
                              "use --method topk for magnitude-pruned FedAvg")
        if not 0.0 <= self.mask_ratio <= self.sparsity:
            raise ConfigError(f"mask_ratio: expected a fraction in [0, sparsity], got "
                              f"{self.mask_ratio!r}")
        floor = self.layer_floor
        if isinstance(floor, bool) or int(floor) != floor or floor < 0:
            raise ConfigError(f"layer_floor: expected an integer >= 0, got "
                              f"{self.layer_floor!r}")

    @property
    def prune_scope(self) -> str:
        """ZeroFL's top-k is per layer (SWAT-U: the same sparsity in every layer);
        SparseFedPP and Top-k prune globally over all conv/linear weights."""
        return "layer" if self.method == "zerofl" else "global"

    @property
    def upload_sparsity(self) -> float:
        """Sparsity of the uploaded weights (ZeroFL uploads mask_ratio more)."""
        if self.method == "zerofl":
            return self.sparsity - self.mask_ratio
        return self.sparsity


@dataclass(frozen=True)
class LocalConfig:
    """Local SGD of one round (reference: 1 epoch, batch 16, weight decay 1e-3,
    no momentum, no augmentation; the learning rate comes from the round)."""

    epochs: int = 1
    batch_size: int = 16
    momentum: float = 0.0
    weight_decay: float = 1e-3
    augment: bool = False


@dataclass
class ClientUpdate:
    """What a client sends back: its model tensors, sample count and metrics."""

    tensors: dict[str, np.ndarray]
    num_examples: int
    metrics: dict = field(default_factory=dict)


def prepare(model, method: MethodConfig) -> dict[str, float]:
    """Set the method's sparsity machinery on the model; returns kept fractions."""
    if method.method == "sparsefedpp":
        kept = activation_policy.weight_driven(model, min_keep=method.min_keep)
        activation_policy.reset_thresholds(model)
        return kept
    if method.method == "zerofl" and method.sparsity > 0:
        return activation_policy.fixed(model, method.sparsity,
                                       refresh_every=method.swat_refresh)
    return activation_policy.dense(model)


def finish(model, method: MethodConfig) -> dict[str, int]:
    """Post-training pruning of the upload to the full target (every round, no
    schedule, no error feedback, as the reference); ``layer_floor`` keeps that
    many weights in every layer. Returns nonzeros per layer."""
    s = method.upload_sparsity
    if method.method != "fedavg" and s > 0:
        return pruning.prune(model, s, method.prune_scope, floor=method.layer_floor)
    return pruning.nonzeros(model)


def local_round(model, data: Dataset, method: MethodConfig, local: LocalConfig, *,
                lr: float, seed: int) -> ClientUpdate:
    """One client's round on ``model`` (already holding the global weights)."""
    if len(data) == 0:
        raise ConfigError("local_round: expected a client with training data, got none")
    start = time.perf_counter()
    kept = prepare(model, method)
    config = TrainConfig(epochs=local.epochs, batch_size=local.batch_size, lr=lr,
                         lr_end=lr, schedule="constant", momentum=local.momentum,
                         weight_decay=local.weight_decay, augment=local.augment,
                         seed=seed)
    results = list(train_epochs(model, data, config))
    nonzeros = finish(model, method)
    last = results[-1]
    if not np.isfinite(last.loss):
        raise ConfigError(f"local training diverged (loss {last.loss}); lower the "
                          "learning rate")
    metrics = {"loss": last.loss, "accuracy": last.accuracy,
               "train_seconds": time.perf_counter() - start,
               "nonzeros": sum(nonzeros.values()),
               "act_keep": float(np.mean(list(kept.values()))) if kept else 1.0}
    tensors = {k: v.copy() for k, v in model.state_dict().items()}
    activation_policy.dense(model)  # leave no per-round state behind
    return ClientUpdate(tensors, len(data), metrics)
