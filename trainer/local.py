"""The local training loop: epochs of SGD over a dataset, and evaluation.

Used by central training (``sparsefedpp train``) and, in later issues, by each
federated client. It yields one record per epoch so callers decide what to print.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from sparsefedpp.runtime import inference
from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.runtime.losses import softmax_cross_entropy
from sparsefedpp.runtime.optim import SGD, lr_schedule

from .data import Dataset, batches


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of local SGD training (defaults: the CIFAR reference setup)."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.1
    lr_end: float = 0.001
    schedule: str = "cosine"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    augment: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"TrainConfig: expected epochs >= 1 and batch_size >= 1, "
                              f"got {self.epochs} and {self.batch_size}")


@dataclass(frozen=True)
class EpochResult:
    epoch: int
    loss: float
    accuracy: float
    lr: float
    seconds: float
    num_examples: int


def make_optimizer(model, config: TrainConfig) -> SGD:
    return SGD(model.params(), model.grads(), config.lr, momentum=config.momentum,
               weight_decay=config.weight_decay, nesterov=config.nesterov)


def train_epochs(model, data: Dataset, config: TrainConfig, *,
                 optimizer: SGD | None = None, start_epoch: int = 0,
                 on_batch: Callable[[int, int, float], None] | None = None
                 ) -> Iterator[EpochResult]:
    """Train ``model`` on ``data`` for epochs start_epoch+1 .. config.epochs.

    The learning rate follows ``config.schedule`` per step over the whole run.
    ``on_batch(step_in_epoch, steps_per_epoch, loss)`` is called after each step
    (progress bars). Yields an EpochResult after each epoch.
    """
    opt = optimizer or make_optimizer(model, config)
    steps_per_epoch = -(-len(data) // config.batch_size)
    schedule = lr_schedule(config.schedule, config.lr, config.epochs * steps_per_epoch,
                           lr_end=config.lr_end,
                           step_size=max(1, config.epochs * steps_per_epoch // 3))
    for epoch in range(start_epoch, config.epochs):
        start = time.perf_counter()
        total_loss = 0.0
        correct = 0
        seen = 0
        stream = batches(data, config.batch_size, seed=config.seed * 100_003 + epoch,
                         augment=config.augment)
        for i, (x, y) in enumerate(stream):
            opt.lr = schedule(epoch * steps_per_epoch + i)
            model.zero_grad()
            logits = model.forward(x, train=True)
            loss, grad = softmax_cross_entropy(logits, y)
            model.backward(grad, input_grad=False)
            opt.step()
            total_loss += loss * len(y)
            correct += int((logits.argmax(axis=1) == y).sum())
            seen += len(y)
            if on_batch is not None:
                on_batch(i + 1, steps_per_epoch, loss)
        yield EpochResult(epoch + 1, total_loss / seen, correct / seen, opt.lr,
                          time.perf_counter() - start, seen)


def evaluate(model, data: Dataset, batch_size: int = 256) -> dict[str, float]:
    """Loss and accuracy of ``model`` in eval mode (running BatchNorm statistics)."""
    total_loss = 0.0
    correct = 0
    with inference.frozen(model):  # weights built once, BatchNorm folded
        for x, y in batches(data, batch_size, seed=0, shuffle=False):
            logits = model.forward(x, train=False)
            loss, _ = softmax_cross_entropy(logits, y)
            total_loss += loss * len(y)
            correct += int((logits.argmax(axis=1) == y).sum())
    n = len(data)
    return {"loss": total_loss / n, "accuracy": correct / n, "num_examples": n}
