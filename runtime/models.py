"""The model zoo: a small CNN, ResNet-8 and ResNet-18 (CIFAR form), with a width multiplier.

``build(name, ...)`` is the public entry point (DESIGN.md, "Public surface").
"""

from __future__ import annotations

import numpy as np

from .arrays import as_f32, check_ndim
from .errors import ConfigError, ShapeError, StateError
from .layers import (
    BasicBlock,
    BatchNorm2d,
    Conv2d,
    Flatten,
    GlobalAvgPool2d,
    Linear,
    MaxPool2d,
    ReLU,
    Sequential,
)
from .layers.powerprop import NO_INIT

NAMES = ("cnn", "resnet8", "resnet18")


class Model(Sequential):
    """A Sequential that remembers how it was built (for checkpoints and export).

    ``forward(x, train)`` takes float32 NCHW and returns logits (N, num_classes);
    ``backward(grad_logits)`` returns dL/dx and leaves parameter gradients in
    ``grads()``, keyed like ``state_dict()``.
    """

    def __init__(self, layers, *, name: str, num_classes: int, width: float,
                 alpha: float, in_channels: int):
        super().__init__(layers)
        self.name, self.num_classes, self.width = name, num_classes, width
        self.alpha, self.in_channels = alpha, in_channels
        self._batch = None

    @property
    def config(self) -> dict:
        """The arguments of build() that recreate this architecture."""
        return {"name": self.name, "num_classes": self.num_classes,
                "width": self.width, "alpha": self.alpha,
                "in_channels": self.in_channels}

    def forward(self, x, train, grad=None):
        x = as_f32(x, f"{self.name}.forward")
        check_ndim(x, 4, f"{self.name}.forward", f"(N, {self.in_channels}, H, W)")
        if x.shape[1] != self.in_channels:
            raise ShapeError(f"{self.name}.forward: expected x of shape "
                             f"(N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        out = self._forward_layers(x, train, grad)
        self._batch = out.shape if (train if grad is None else grad) else None
        return out

    #: indices of the children whose BatchNorm ran fused with the ReLU after it
    _fused_at: frozenset = frozenset()

    def _forward_layers(self, x, train, grad):
        # Sequential's loop, but a BatchNorm followed by a ReLU (the stem) runs
        # both in one pass when it keeps a cache (BatchNorm2d.forward_relu)
        kids = list(self.children().values())
        fused = set()
        i = 0
        while i < len(kids):
            layer = kids[i]
            after = kids[i + 1] if i + 1 < len(kids) else None
            if (isinstance(layer, BatchNorm2d) and isinstance(after, ReLU)
                    and layer.fusable(after, train, grad)):
                x = layer.forward_relu(x, train, grad, after)
                fused.add(i)
                i += 2
            else:
                x = layer.forward(x, train, grad)
                i += 1
        self._fused_at = frozenset(fused)
        return x

    def _backward_layers(self, g, input_grad: bool = True):
        kids = list(self.children().values())
        i = len(kids) - 1
        while i >= 0:
            if i - 1 in self._fused_at:
                g = kids[i - 1].backward_relu(g)[0]
                i -= 2
            elif i == 0 and not input_grad and isinstance(kids[0], Conv2d):
                g = kids[0].backward(g, input_grad=False)
                i -= 1
            else:
                g = kids[i].backward(g)
                i -= 1
        return g

    def backward(self, grad_out, *, input_grad: bool = True):
        """``input_grad=False``: training does not need dL/dx (the image's
        gradient); the first conv then skips it and this returns None."""
        if self._batch is None:
            raise StateError(f"{self.name}.backward: expected a forward(x, train=True)"
                             " first, got none")
        g = as_f32(grad_out, f"{self.name}.backward")
        if g.shape != self._batch:
            raise ShapeError(f"{self.name}.backward: expected grad_logits of shape "
                             f"{self._batch}, got {tuple(g.shape)}")
        self._batch = None
        return self._backward_layers(g, input_grad)

    def prunable(self) -> dict[str, np.ndarray]:
        """The conv and linear weights (the tensors that magnitude pruning ranks)."""
        return {f"{name}.weight": layer.weight
                for name, layer in self.named_layers().items()
                if isinstance(layer, (Conv2d, Linear))}


def _scaled(base: int, width: float) -> int:
    return max(1, round(base * width))


def _resnet(blocks: tuple, widths: tuple, num_classes, width, alpha, in_channels,
            rng):
    planes = [_scaled(w, width) for w in widths]
    layers = [("conv1", Conv2d(in_channels, planes[0], 3, padding=1, bias=False,
                               alpha=alpha, rng=rng)),
              ("bn1", BatchNorm2d(planes[0])), ("relu", ReLU())]
    in_planes = planes[0]
    for i, (count, p) in enumerate(zip(blocks, planes, strict=True)):
        stage = []
        for b in range(count):
            stride = 2 if (i > 0 and b == 0) else 1
            stage.append(BasicBlock(in_planes, p, stride, alpha=alpha, rng=rng))
            in_planes = p
        layers.append((f"layer{i + 1}", Sequential(stage)))
    layers += [("avgpool", GlobalAvgPool2d()), ("flatten", Flatten()),
               ("fc", Linear(in_planes, num_classes, alpha=alpha, rng=rng))]
    return layers


def _cnn(num_classes, width, alpha, in_channels, rng):
    c1, c2, c3 = (_scaled(w, width) for w in (32, 64, 128))
    return [
        ("conv1", Conv2d(in_channels, c1, 3, padding=1, alpha=alpha, rng=rng)),
        ("relu1", ReLU()), ("pool1", MaxPool2d(2)),
        ("conv2", Conv2d(c1, c2, 3, padding=1, alpha=alpha, rng=rng)),
        ("relu2", ReLU()), ("pool2", MaxPool2d(2)),
        ("conv3", Conv2d(c2, c3, 3, padding=1, alpha=alpha, rng=rng)),
        ("relu3", ReLU()), ("avgpool", GlobalAvgPool2d()), ("flatten", Flatten()),
        ("fc", Linear(c3, num_classes, alpha=alpha, rng=rng)),
    ]


def build(name: str, num_classes: int = 10, width: float = 1.0, alpha: float = 1.0,
          in_channels: int = 3, *, seed: int | None = None,
          init: bool = True) -> Model:
    """Build a model by name: "cnn", "resnet8" or "resnet18".

    Parameters
    ----------
    num_classes : outputs of the final Linear layer.
    width : multiplier on every layer's channel count (ResNet-8: 16/32/64,
        ResNet-18: 64/128/256/512, CNN: 32/64/128).
    alpha : Powerprop exponent of every conv/linear layer (1 = plain layers).
    in_channels : 3 for CIFAR-10, 1 for (Fashion-)MNIST.
    seed : seeds the weight initialisation (None: fresh entropy).
    init : False builds every weight and bias as zeros without drawing a random
        number: for a client, whose weights come from the wire (``load_state_dict``
        next). The random initialisation of ResNet-18 takes ~0.7 s and its float64
        temporaries stay mapped in the process (runtime/allocator.py). BatchNorm
        starts as usual (weight 1, bias 0, running mean 0 and variance 1).

    The CNN ends in global average pooling, so it takes any image size >= 4x4.
    """
    if name not in NAMES:
        raise ConfigError(f"model name: expected one of {', '.join(NAMES)}, got {name!r}")
    for what, val in (("num_classes", num_classes), ("in_channels", in_channels)):
        if int(val) != val or val < 1:
            raise ConfigError(f"build {what}: expected an integer >= 1, got {val!r}")
    if not np.isfinite(width) or width <= 0:
        raise ConfigError(f"build width: expected a positive number, got {width!r}")
    if not isinstance(init, bool):
        raise ConfigError(f"build init: expected True (random weights) or False "
                          f"(zeros, to load a state dict into), got {init!r}")
    rng = np.random.default_rng(seed) if init else NO_INIT
    args = (int(num_classes), float(width), float(alpha), int(in_channels), rng)
    if name == "cnn":
        layers = _cnn(*args)
    elif name == "resnet8":
        layers = _resnet((1, 1, 1), (16, 32, 64), *args)
    else:
        layers = _resnet((2, 2, 2, 2), (64, 128, 256, 512), *args)
    return Model(layers, name=name, num_classes=int(num_classes), width=float(width),
                 alpha=float(alpha), in_channels=int(in_channels))
