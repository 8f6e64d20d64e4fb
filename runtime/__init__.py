"""The training engine: layers, kernels, models, losses, optimizers, checkpoints."""

from .allocator import keep_freed_memory

keep_freed_memory()  # before the first large array: see allocator.py

from .errors import (
                     CheckpointError,
                     CodecError,
                     ConfigError,
                     DataError,
                     DTypeError,
                     ShapeError,
                     SparseFedError,
                     StateError,
                     TransportError,
)
from .layers import (
    BasicBlock,
    BatchNorm2d,
    Conv2d,
    Flatten,
    GlobalAvgPool2d,
    Layer,
    Linear,
    MaxPool2d,
    Module,
    ReLU,
    Sequential,
)
from .losses import softmax_cross_entropy
from .models import build
from .optim import SGD, lr_schedule

__all__ = [
                     "SGD",
                     "BasicBlock",
                     "BatchNorm2d",
                     "CheckpointError",
                     "CodecError",
                     "ConfigError",
                     "Conv2d",
                     "DTypeError",
                     "DataError",
                     "Flatten",
                     "GlobalAvgPool2d",
                     "Layer",
                     "Linear",
                     "MaxPool2d",
                     "Module",
                     "ReLU",
                     "Sequential",
                     "ShapeError",
                     "SparseFedError",
                     "StateError",
                     "TransportError",
                     "build",
                     "lr_schedule",
                     "softmax_cross_entropy",
]
