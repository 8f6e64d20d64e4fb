"""Recompute a residual block's activations in backward instead of holding them.

A 99 %-sparse ResNet-18 step at batch 32 holds ~100 MB for backward, three
quarters of it the BatchNorm inputs (the conv outputs, dense). With
recomputation a block keeps only its input during the forward pass and runs
its forward again just before its backward, so at any moment only one block's
activations are held (gradient checkpointing, as torch.utils.checkpoint). It
costs one more forward of every block.

The second forward must rebuild exactly what the first one kept, so the state
a training forward changes is put back first: BatchNorm's running statistics
(the second forward updates them again, to the same values) and the SWAT
activation sparsifiers' threshold and counters (a refresh in the first forward
is a refresh again). Gradients are then bit for bit those without recomputation
(tests/runtime/layers/test_recompute.py).
"""

from __future__ import annotations

import copy

from .base import Layer
from .batchnorm import BatchNorm2d
from .weighted import WeightedLayer


def leaves(block) -> list[Layer]:
    """The leaf layers of a block (a Module), in the tree's order."""
    return [layer for layer in block.named_layers().values() if not layer.children()]


def snapshot(layers: list[Layer]) -> list:
    """What a training forward of ``layers`` changes besides their caches."""
    saved = []
    for layer in layers:
        if isinstance(layer, BatchNorm2d):
            saved.append((layer, "bn", [b.copy() for b in layer.buffers().values()]))
        elif isinstance(layer, WeightedLayer) and layer.sparsifier is not None:
            saved.append((layer, "swat", copy.copy(layer.sparsifier.__dict__)))
    return saved


def restore(saved: list) -> None:
    """Put back what ``snapshot`` took (in place: the arrays stay the model's)."""
    for layer, kind, state in saved:
        if kind == "bn":
            for dst, src in zip(layer.buffers().values(), state, strict=True):
                dst[...] = src
        else:
            layer.sparsifier.__dict__.update(state)


def drop_caches(layers: list[Layer]) -> None:
    """Forget what ``layers`` keep for backward (and the bytes they say they hold)."""
    for layer in layers:
        layer._cache = None
        layer.cost.held_bytes = 0


def set_recompute(model, on: bool = True) -> int:
    """Turn recomputation on (or off) in every residual block of ``model`` (a
    Module); returns how many blocks it applies to (0: none, e.g. cnn)."""
    blocks = [layer for layer in model.named_layers().values()
              if hasattr(layer, "recompute")]
    for block in blocks:
        block.recompute = bool(on)
    return len(blocks)
