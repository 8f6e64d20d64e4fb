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


def leaves(layer: Layer) -> list[Layer]:
    """The leaf layers below ``layer``, in the tree's order."""
    kids = layer.children()
    if not kids:
        return [layer]
    return [leaf for child in kids.values() for leaf in leaves(child)]


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


def drop_caches(layers: list[Layer]) -> int:
    """Forget what ``layers`` keep for backward; the bytes they held."""
    held = 0
    for layer in layers:
        held += layer.cost.held_bytes
        layer._cache = None
        layer.cost.held_bytes = 0
    return held


def set_recompute(model: Layer, on: bool = True) -> int:
    """Turn recomputation on (or off) in every residual block of ``model``;
    returns how many blocks it applies to (0: the model has none, e.g. cnn)."""
    count = 0
    for layer in _walk(model):
        if hasattr(layer, "recompute"):
            layer.recompute = bool(on)
            count += 1
    return count


def _walk(layer: Layer):
    yield layer
    for child in layer.children().values():
        yield from _walk(child)
