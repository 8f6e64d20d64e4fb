"""Layers with explicit forward and backward, one module per kind.

base (the interface and its cache bookkeeping), weighted (Conv2d, Linear: Powerprop
weights and the sparse machinery), powerprop (w = v|v|^(alpha-1)), pointwise (ReLU,
Flatten), batchnorm, pooling, containers (Sequential, BasicBlock and the dotted
state-dict names), recompute (a block's activations rebuilt in backward).
"""

from .base import Layer, keeps_cache
from .batchnorm import BatchNorm2d
from .containers import BasicBlock, Module, Sequential
from .pointwise import Flatten, ReLU
from .pooling import GlobalAvgPool2d, MaxPool2d
from .recompute import set_recompute
from .weighted import KERNELS, Conv2d, Linear, WeightedLayer

__all__ = ["KERNELS", "BasicBlock", "BatchNorm2d", "Conv2d", "Flatten",
           "GlobalAvgPool2d", "Layer", "Linear", "MaxPool2d", "Module", "ReLU",
           "Sequential", "WeightedLayer", "keeps_cache", "set_recompute"]
