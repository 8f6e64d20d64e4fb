"""Fit a local round into a device's memory budget by choosing the batch size.

The peak of a round is the process's RSS before training (interpreter, NumPy,
Numba and its kernels, the data in uint8, the model) plus what one train step
allocates, which grows with the batch. That growth tracks the activation bytes
a dense backward would keep: measured here for ResNet-8 (bench-memory and
tests/trainer/test_memory_budget.py) it was 0.75-1.07x of them at batch 8-64,
dense or at 99 % weight/activation sparsity alike (the forward still produces
dense activations; only what is held for backward is compressed). So the
estimate is ``rss_now + GROWTH * dense_held(B) + MARGIN`` and the largest batch
size (the announced one, then halving) whose estimate fits is used.

With recomputation (runtime/layers/recompute.py) a step holds the residual
blocks' inputs and, during backward, one block's activations at a time, so
``dense_held`` is replaced by those two together. Unlike a smaller batch it
does not change the training, so a device tries it before halving.
"""

from __future__ import annotations

import functools
import re

import numpy as np
from sparsefedpp.runtime import accounting, models
from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.runtime.layers import set_recompute

from .data import Dataset

GROWTH = 1.25           # step growth over the dense held bytes (measured <= 1.07)
MARGIN = 16 << 20       # encoding the update, allocator slack


def parse_size(text: str) -> int:
    """'256M', '1G', '300000k', '512MiB' or plain bytes -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)(?:i?[bB])?\s*", str(text))
    if not m:
        raise ConfigError(f"memory size: expected a number with an optional unit k, M "
                          f"or G (e.g. 256M), got {text!r}")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def current_rss() -> int:
    """This process's resident set in bytes (Linux /proc)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("VmRSS not in /proc/self/status")


def dense_held_per_example(spec: dict, image_shape: tuple,
                           recompute: bool = False) -> float:
    """Activation bytes a dense backward keeps per example (they depend on shapes
    only): one forward of a scratch model on two blank images, once per model.
    With ``recompute``: the blocks' inputs plus the largest block's activations."""
    return _held_per_example(spec["name"], spec["num_classes"], spec["width"],
                             spec["alpha"], spec["in_channels"], tuple(image_shape),
                             bool(recompute))


@functools.lru_cache(maxsize=8)
def _held_per_example(name, num_classes, width, alpha, in_channels, image_shape,
                      recompute):
    scratch = models.build(name, num_classes=num_classes, width=width, alpha=alpha,
                           in_channels=in_channels, init=False)
    if recompute and not set_recompute(scratch, True):
        return _held_per_example(name, num_classes, width, alpha, in_channels,
                                 image_shape, False)
    scratch.forward(np.zeros((2, *image_shape), dtype=np.float32), train=True)
    report = accounting.cost_report(scratch)
    if not recompute:
        return report.totals["dense_held_bytes"] / 2
    blocks = {r.name: 0 for r in report.rows if r.kind == "BasicBlock"}
    held = 0  # the blocks' inputs, and what every layer outside a block keeps
    for r in report.rows:
        block = next((b for b in blocks if r.name.startswith(b + ".")), None)
        if r.name in blocks:
            held += r.cost.held_bytes
        elif block is None:
            held += r.cost.dense_held_bytes
        else:
            blocks[block] += r.cost.dense_held_bytes
    return (held + max(blocks.values(), default=0)) / 2


def plan_batch_size(budget: int, batch_size: int, spec: dict, data: Dataset, *,
                    rss: int | None = None, recompute: bool = False) -> tuple[int, int]:
    """The largest of batch_size, batch_size/2, ..., 1 whose estimated peak fits
    ``budget`` bytes, and that estimate; ConfigError when even 1 does not fit."""
    rss = current_rss() if rss is None else rss
    per_example = dense_held_per_example(spec, data.images.shape[1:], recompute)
    b = batch_size
    while True:
        estimate = int(rss + GROWTH * per_example * b + MARGIN)
        if estimate <= budget:
            return b, estimate
        if b == 1:
            mb = 1 << 20
            raise ConfigError(
                f"memory budget: expected at least {estimate / mb:.0f} MB for a round "
                f"at batch size 1, got --max-memory {budget / mb:.0f} MB ({rss / mb:.0f}"
                f" MB are in use before training: interpreter, Numba kernels, data, "
                f"model); raise --max-memory, or use a smaller model or width")
        b = max(1, b // 2)
