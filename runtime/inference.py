"""Freeze a model for inference: weights built once, BatchNorm folded into the conv.

An eval forward otherwise rebuilds each sparse layer's CSR from ``v`` and runs
every BatchNorm as its own pass over the activations; at 99 % sparsity those
two cost about as much as the convolutions themselves (ResNet-18, batch 32).
``freeze(model)`` builds each conv/linear weight once (dense or CSR, as its
``kernel`` picks), folds every eval-mode BatchNorm2d into the Conv2d right
before it (s = gamma / sqrt(running_var + eps): w' = s w, b' = s (b - mean) +
beta; zeros stay zeros, so the CSR keeps its pattern) and makes that
BatchNorm the identity. Training forwards raise until ``unfreeze(model)``;
``frozen(model)`` does both around a block.
"""

from __future__ import annotations

from contextlib import contextmanager
from itertools import pairwise

import numpy as np

from .batchnorm import BatchNorm2d
from .layers import Conv2d, Layer, _Weighted


def bn_scale_shift(bn: BatchNorm2d) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) in float64 with bn_eval(y) = s * y + t per channel."""
    scale = bn.weight.astype(np.float64) / np.sqrt(
        bn.running_var.astype(np.float64) + bn.eps)
    return scale, bn.bias.astype(np.float64) - bn.running_mean * scale


def conv_bn_pairs(model: Layer) -> list[tuple[Conv2d, BatchNorm2d]]:
    """Each Conv2d directly followed, among its parent's children in order, by a
    BatchNorm2d over its output channels (conv1/bn1, downsample.0/.1, ...)."""
    pairs = []

    def visit(layer: Layer) -> None:
        kids = list(layer.children().values())
        for a, b in pairwise(kids):
            if isinstance(a, Conv2d) and isinstance(b, BatchNorm2d) and \
                    b.num_features == a.out_channels:
                pairs.append((a, b))
        for kid in kids:
            visit(kid)

    visit(model)
    return pairs


def freeze(model: Layer, *, fold_bn: bool = True) -> int:
    """Prepare ``model`` for fast eval forwards; returns how many BatchNorms were
    folded. Call again after the weights change (it re-reads them)."""
    unfreeze(model)
    folded = 0
    paired = {}
    if fold_bn:
        for conv, bn in conv_bn_pairs(model):
            paired[id(conv)] = bn
    for layer in model.named_layers().values():
        if not isinstance(layer, _Weighted):
            continue
        bn = paired.get(id(layer))
        if bn is None:
            layer.freeze()
        else:
            layer.freeze(*bn_scale_shift(bn))
            bn.folded = True
            folded += 1
    return folded


def unfreeze(model: Layer) -> None:
    """Back to the trainable model (nothing of it was changed by ``freeze``)."""
    for layer in model.named_layers().values():
        if isinstance(layer, _Weighted):
            layer.unfreeze()
        elif isinstance(layer, BatchNorm2d):
            layer.folded = False


def is_frozen(model: Layer) -> bool:
    return any(getattr(layer, "frozen", False)
               for layer in model.named_layers().values())


@contextmanager
def frozen(model: Layer, *, fold_bn: bool = True):
    """``with frozen(model): model.forward(x, train=False)`` -- unfrozen afterwards
    (a model that was frozen already is used as it is and stays frozen)."""
    if is_frozen(model):
        yield model
        return
    freeze(model, fold_bn=fold_bn)
    try:
        yield model
    finally:
        unfreeze(model)
