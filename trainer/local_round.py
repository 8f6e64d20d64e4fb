"""One client's round of local training, the same for every method: set the
method's sparsity machinery, train locally (SGD at the round's learning rate),
prune the upload as the method says, and hand back the tensors to upload
(DESIGN.md, "SparseFedPP, per client and round"). What differs per method lives
in trainer/methods/.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.runtime.layers import set_recompute
from sparsefedpp.runtime.sparsity import activation_policy

from .data import Dataset
from .local import TrainConfig, train_epochs
from .methods import MethodConfig


@dataclass(frozen=True)
class LocalConfig:
    """Local SGD of one round (reference: 1 epoch, batch 16, weight decay 1e-3,
    no momentum, no augmentation; the learning rate comes from the round)."""

    epochs: int = 1
    batch_size: int = 16
    momentum: float = 0.0
    weight_decay: float = 1e-3
    augment: bool = False
    #: rebuild each residual block's activations in backward instead of holding
    #: them (runtime/layers/recompute.py): the same result bit for bit, about
    #: half the activation memory, one more forward per block; a device's own
    #: choice (``client --recompute``), never announced
    recompute: bool = False


@dataclass
class ClientUpdate:
    """What a client sends back: its model tensors, sample count and metrics."""

    tensors: dict[str, np.ndarray]
    num_examples: int
    metrics: dict = field(default_factory=dict)


def local_round(model, data: Dataset, method: MethodConfig, local: LocalConfig, *,
                lr: float, seed: int) -> ClientUpdate:
    """One client's round on ``model`` (already holding the global weights)."""
    if len(data) == 0:
        raise ConfigError("local_round: expected a client with training data, got none")
    start = time.perf_counter()
    kept = method.spec.prepare(model, method)
    set_recompute(model, local.recompute)
    config = TrainConfig(epochs=local.epochs, batch_size=local.batch_size, lr=lr,
                         lr_end=lr, schedule="constant", momentum=local.momentum,
                         weight_decay=local.weight_decay, augment=local.augment,
                         seed=seed)
    results = list(train_epochs(model, data, config))
    nonzeros = method.spec.finish(model, method)
    last = results[-1]
    if not np.isfinite(last.loss):
        raise ConfigError(f"local training diverged (loss {last.loss}); lower the "
                          "learning rate")
    metrics = {"loss": last.loss, "accuracy": last.accuracy,
               "train_seconds": time.perf_counter() - start,
               "nonzeros": sum(nonzeros.values()),
               "act_keep": float(np.mean(list(kept.values()))) if kept else 1.0}
    tensors = model.state_dict()  # copies already: one more set was 42.6 MB on ResNet-18
    activation_policy.dense(model)  # leave no per-round state behind
    return ClientUpdate(tensors, len(data), metrics)
