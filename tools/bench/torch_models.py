"""A PyTorch twin of ``runtime.models``' CIFAR ResNets, for ``sparsefedpp bench``.

Importing this module imports torch, so only the torch bench worker and the torch
tests import it (never the ``bench`` parent process nor an engine worker). The
architecture and the attribute names are torchvision's, so
``load_state_dict(our_model.state_dict(), strict=True)`` works and both
frameworks run identical weights.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

#: blocks per stage and base widths, as in ``runtime.models.build``
ARCHS = {"resnet8": ((1, 1, 1), (16, 32, 64)),
         "resnet18": ((2, 2, 2, 2), (64, 128, 256, 512))}


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); the shortcut is a 1x1
    strided conv + BatchNorm (``downsample``) when the stride or the width changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x if self.downsample is None else self.downsample(x)
        return self.relu(out + short)


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem conv (no bias) + BN + ReLU, no max-pool, stages of
    BasicBlocks (stride 2 at the start of every stage but the first), global
    average pool, fc. Input (N, in_channels, H, W) float32; output (N, num_classes)."""

    def __init__(self, blocks: tuple, widths: tuple, num_classes: int = 10,
                 in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        for i, (count, planes) in enumerate(zip(blocks, widths, strict=True)):
            stage = []
            for b in range(count):
                stride = 2 if (i > 0 and b == 0) else 1
                stage.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.num_stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build(name: str, num_classes: int = 10, width: float = 1.0,
          in_channels: int = 3) -> ResNet:
    """The torch ResNet matching ``runtime.models.build(name, ...)`` (same widths)."""
    if name not in ARCHS:
        raise ValueError(f"torch_models.build name: expected one of "
                         f"{', '.join(ARCHS)}, got {name!r}")
    blocks, widths = ARCHS[name]
    # the same rounding as runtime.models._scaled
    planes = tuple(max(1, round(w * width)) for w in widths)
    return ResNet(blocks, planes, num_classes, in_channels)


def from_state_dict(name: str, state: dict, **kwargs) -> ResNet:
    """Build ``name`` and load our engine's ``state_dict()`` into it (strict).

    Parameters
    ----------
    state : dotted torchvision names -> arrays (f4 tensors, int64 counters), e.g.
        ``model.state_dict()`` or the arrays of an ``np.savez`` of it.
    kwargs : num_classes, width, in_channels, as for ``build``.
    """
    model = build(name, **kwargs)
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    model.load_state_dict(tensors, strict=True)
    return model
