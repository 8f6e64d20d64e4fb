"""Freeze a model for inference: weights built once, BatchNorm folded into the conv.

An eval forward otherwise rebuilds each sparse layer's CSR from ``v`` and runs
every BatchNorm as its own pass over the activations; at 99 % sparsity those
two cost about as much as the convolutions themselves (ResNet-18, batch 32).
``freeze(model)`` builds each conv/linear weight once (dense or CSR, as its
``kernel`` picks), folds every eval-mode BatchNorm2d into the Conv2d right
before it (s = gamma / sqrt(running_var + eps): w' = s w, b' = s (b - mean) +
beta; zeros stay zeros, so the CSR keeps its pattern) and makes that
BatchNorm the identity; a ReLU right after is fused into the conv's output the
same way. Training forwards raise until ``unfreeze(model)``;
``frozen(model)`` does both around a block.
"""

from __future__ import annotations

from contextlib import contextmanager
from itertools import pairwise

import numpy as np

from .layers import Conv2d, Layer, ReLU, WeightedLayer
from .layers.batchnorm import BatchNorm2d


def bn_scale_shift(bn: BatchNorm2d) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) in float64 with bn_eval(y) = s * y + t per channel."""
    scale = bn.weight.astype(np.float64) / np.sqrt(
        bn.running_var.astype(np.float64) + bn.eps)
    return scale, bn.bias.astype(np.float64) - bn.running_mean * scale


def _chains(model: Layer) -> list[list[Layer]]:
    """Every ``chains()`` run in the tree (layers applied one after the other)."""
    runs = list(model.chains())
    for kid in model.children().values():
        runs += _chains(kid)
    return runs


def conv_bn_pairs(model: Layer) -> list[tuple[Conv2d, BatchNorm2d]]:
    """Each Conv2d directly followed, in a chain of layers applied one after the
    other (``Layer.chains``), by a BatchNorm2d over its output channels (conv1/bn1,
    downsample.0/.1, ...)."""
    return [(a, b) for run in _chains(model) for a, b in pairwise(run)
            if isinstance(a, Conv2d) and isinstance(b, BatchNorm2d)
            and b.num_features == a.out_channels]


def conv_relus(model: Layer, folded: set[int]) -> list[tuple[Conv2d, ReLU]]:
    """Each Conv2d directly followed, in a chain (``Layer.chains``), by a ReLU, or
    by a BatchNorm2d whose id is in ``folded`` and then a ReLU (conv1, bn1, relu1
    of a BasicBlock; the stem's conv1, bn1, relu)."""
    found = []
    for run in _chains(model):
        for i, layer in enumerate(run):
            after = run[i + 1:i + 3]
            if after and isinstance(after[0], BatchNorm2d) and id(after[0]) in folded:
                after = after[1:]
            if isinstance(layer, Conv2d) and after and isinstance(after[0], ReLU):
                found.append((layer, after[0]))
    return found


def freeze(model: Layer, *, fold_bn: bool = True, fuse_relu: bool = True) -> int:
    """Prepare ``model`` for fast eval forwards; returns how many BatchNorms were
    folded. Call again after the weights change (it re-reads them).

    With ``fuse_relu`` a ReLU right after a conv (or after its folded BatchNorm)
    is applied by the conv as it writes its output, and the ReLU layer becomes the
    identity: one pass over the activations fewer (ResNet-18 at batch 1: 9 of 17).
    Both fusions follow ``Layer.chains()``: the runs of layers a module applies
    one after the other (a Sequential's children; a BasicBlock's conv1, bn1, relu1
    and conv2, bn2, not relu2, which comes after the shortcut's add).
    """
    unfreeze(model)
    paired = {}
    if fold_bn:
        for conv, bn in conv_bn_pairs(model):
            paired[id(conv)] = bn
    relus = {}
    if fuse_relu:
        folded_ids = {id(bn) for bn in paired.values()}
        relus = {id(conv): relu for conv, relu in conv_relus(model, folded_ids)}
    try:
        for layer in model.named_layers().values():
            if not isinstance(layer, WeightedLayer):
                continue
            bn, relu = paired.get(id(layer)), relus.get(id(layer))
            layer.freeze(*(bn_scale_shift(bn) if bn is not None else (None, None)),
                         relu=relu is not None)
            if bn is not None:
                bn.folded = True
            if relu is not None:
                relu.fused = True
    except BaseException:
        unfreeze(model)  # all or nothing: no conv applying a ReLU left unmarked
        raise
    return len(paired)


def unfreeze(model: Layer) -> None:
    """Back to the trainable model (nothing of it was changed by ``freeze``)."""
    for layer in model.named_layers().values():
        if isinstance(layer, WeightedLayer):
            layer.unfreeze()
        elif isinstance(layer, BatchNorm2d):
            layer.folded = False
        elif isinstance(layer, ReLU):
            layer.fused = False


def is_frozen(model: Layer) -> bool:
    return any(getattr(layer, "frozen", False)
               for layer in model.named_layers().values())


@contextmanager
def frozen(model: Layer, *, fold_bn: bool = True, fuse_relu: bool = True):
    """``with frozen(model): model.forward(x, train=False)`` -- unfrozen afterwards
    (a model that was frozen already is used as it is and stays frozen)."""
    if is_frozen(model):
        yield model
        return
    freeze(model, fold_bn=fold_bn, fuse_relu=fuse_relu)
    try:
        yield model
    finally:
        unfreeze(model)
