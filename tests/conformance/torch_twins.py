"""PyTorch twins of the engine's layers and models, for the conformance tests.

Import only after ``pytest.importorskip("torch")``. The twins use torchvision's
attribute names, so ``twin.load_state_dict(ours.state_dict(), strict=True)`` is
itself a check that names and shapes agree. Powerprop layers keep ``v`` under
``weight`` and compute w = v|v|^(alpha-1) inside forward, so autograd's
``weight.grad`` is dL/dv, the engine's ``grads()["weight"]``.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from sparsefedpp.runtime import (
    BasicBlock,
    BatchNorm2d,
    Conv2d,
    Flatten,
    GlobalAvgPool2d,
    Linear,
    MaxPool2d,
    ReLU,
)
from torch import nn


def powerprop(v: torch.Tensor, alpha: float) -> torch.Tensor:
    return v if alpha == 1.0 else v * v.abs() ** (alpha - 1.0)


class PowerpropConv2d(nn.Conv2d):
    def __init__(self, *args, alpha: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha = alpha

    def forward(self, x):
        return F.conv2d(x, powerprop(self.weight, self.alpha), self.bias, self.stride,
                        self.padding)


class PowerpropLinear(nn.Linear):
    def __init__(self, *args, alpha: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha = alpha

    def forward(self, x):
        return F.linear(x, powerprop(self.weight, self.alpha), self.bias)


class TorchBasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock (with ``alpha`` for Powerprop)."""

    def __init__(self, in_planes, planes, stride=1, alpha=1.0):
        super().__init__()
        self.conv1 = PowerpropConv2d(in_planes, planes, 3, stride, 1, bias=False,
                                     alpha=alpha)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = PowerpropConv2d(planes, planes, 3, 1, 1, bias=False, alpha=alpha)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                PowerpropConv2d(in_planes, planes, 1, stride, bias=False, alpha=alpha),
                nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class TorchResNet(nn.Module):
    """torchvision's ResNet layout in CIFAR form: 3x3 stem, no max-pool."""

    def __init__(self, blocks, planes, num_classes, in_channels, alpha):
        super().__init__()
        self.conv1 = PowerpropConv2d(in_channels, planes[0], 3, 1, 1, bias=False,
                                     alpha=alpha)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU()
        self.stages = []
        in_planes = planes[0]
        for i, (count, p) in enumerate(zip(blocks, planes, strict=True)):
            stage = []
            for b in range(count):
                stride = 2 if (i > 0 and b == 0) else 1
                stage.append(TorchBasicBlock(in_planes, p, stride, alpha))
                in_planes = p
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            self.stages.append(f"layer{i + 1}")
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = PowerpropLinear(in_planes, num_classes, alpha=alpha)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        for name in self.stages:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def torch_cnn(c1, c2, c3, num_classes, in_channels, alpha):
    """The engine's ``_cnn`` in runtime/models.py, with the same child names."""
    return nn.Sequential(OrderedDict([
        ("conv1", PowerpropConv2d(in_channels, c1, 3, padding=1, alpha=alpha)),
        ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", PowerpropConv2d(c1, c2, 3, padding=1, alpha=alpha)),
        ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
        ("conv3", PowerpropConv2d(c2, c3, 3, padding=1, alpha=alpha)),
        ("relu3", nn.ReLU()), ("avgpool", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("fc", PowerpropLinear(c3, num_classes, alpha=alpha)),
    ]))


def empty_twin(model) -> nn.Module:
    """A torch model of the same architecture as ``model`` (torch's own init).

    Widths are read from the engine's tensor shapes, not recomputed from ``width``.
    """
    state = model.state_dict()
    cfg = model.config
    if cfg["name"] == "cnn":
        widths = [state[f"conv{i}.weight"].shape[0] for i in (1, 2, 3)]
        return torch_cnn(*widths, cfg["num_classes"], cfg["in_channels"], cfg["alpha"])
    stages = sorted({k.split(".")[0] for k in state if k.startswith("layer")})
    blocks = [len({k.split(".")[1] for k in state if k.startswith(s + ".")})
              for s in stages]
    planes = [state[f"{s}.0.conv1.weight"].shape[0] for s in stages]
    return TorchResNet(blocks, planes, cfg["num_classes"], cfg["in_channels"],
                       cfg["alpha"])


def to_torch_state(state: dict) -> dict:
    return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}


def twin(model, dtype=torch.float64) -> nn.Module:
    """A torch copy of an engine model or layer, holding the same tensors."""
    module = empty_twin(model) if hasattr(model, "config") else layer_twin(model)
    if hasattr(model, "state_dict"):  # a Module: BasicBlock or a whole model
        state = model.state_dict()
    else:
        state = {**model.params(), **model.buffers()}
    module.load_state_dict(to_torch_state(state), strict=True)
    return module.to(dtype)


def layer_twin(layer) -> nn.Module:
    """The torch module for one engine layer (parameters still torch's init)."""
    if isinstance(layer, Conv2d):
        return PowerpropConv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                               layer.stride, layer.padding,
                               bias=layer.bias is not None, alpha=layer.alpha)
    if isinstance(layer, Linear):
        return PowerpropLinear(layer.in_features, layer.out_features,
                               bias=layer.bias is not None, alpha=layer.alpha)
    if isinstance(layer, BatchNorm2d):
        return nn.BatchNorm2d(layer.num_features, eps=layer.eps,
                              momentum=layer.momentum)
    if isinstance(layer, BasicBlock):
        return TorchBasicBlock(layer.conv1.in_channels, layer.conv1.out_channels,
                               layer.conv1.stride, layer.conv1.alpha)
    if isinstance(layer, MaxPool2d):
        return nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding)
    plain = {ReLU: nn.ReLU, GlobalAvgPool2d: lambda: nn.AdaptiveAvgPool2d(1),
             Flatten: nn.Flatten}
    return plain[type(layer)]()


def kink_margin(module: nn.Module, x: torch.Tensor) -> float:
    """How close ``module(x)`` comes to a kink: the smallest |ReLU input| and the
    smallest non-zero gap between the two largest values of a max-pool window.

    Where that is within float32 rounding, a float32 forward may land on the
    other side of the kink than float64, and its gradient then differs by a
    whole unit's contribution: a correct answer, but not a comparable one.
    """
    gaps = []

    def relu_hook(mod, inputs, output):
        gaps.append(inputs[0].abs().min().item())

    def pool_hook(mod, inputs, output):
        v = inputs[0]
        k, s, p = mod.kernel_size, mod.stride, mod.padding
        padded = F.pad(v, [p] * 4, value=-np.inf)
        windows = F.unfold(padded, k, stride=s).view(v.shape[0], v.shape[1], k * k, -1)
        top2 = windows.topk(2, dim=2).values
        gap = top2[:, :, 0] - top2[:, :, 1]
        # exact ties are ReLU zeros, exactly zero in float32 too: no ambiguity
        gaps.append(gap[gap > 0].min().item() if (gap > 0).any() else np.inf)

    handles = [m.register_forward_hook(relu_hook) for m in module.modules()
               if isinstance(m, nn.ReLU)]
    handles += [m.register_forward_hook(pool_hook) for m in module.modules()
                if isinstance(m, nn.MaxPool2d)]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    return min(gaps)


def rel_diff(ours: np.ndarray, ref: torch.Tensor) -> float:
    """max|ours - ref| / max|ref| (0 when both are all zeros)."""
    ref = ref.detach().cpu().double().numpy()
    scale = np.abs(ref).max() if ref.size else 0.0
    diff = np.abs(np.asarray(ours, dtype=np.float64) - ref).max() if ref.size else 0.0
    return float(diff / scale) if scale > 0 else float(diff)


def assert_matches(ours: dict, ref: dict, tol: float) -> None:
    """Every named array in ``ours`` is within ``tol`` (relative) of ``ref``."""
    assert ours.keys() == ref.keys()
    for name, arr in ours.items():
        assert arr.shape == tuple(ref[name].shape), name
    errors = {name: rel_diff(ours[name], ref[name]) for name in ours}
    bad = {name: f"{e:.2e}" for name, e in errors.items() if not e <= tol}
    assert not bad, f"relative difference above {tol}: {bad}"
