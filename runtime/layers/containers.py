"""Containers (Sequential, BasicBlock) and the dotted state-dict names built from them.

A model is a tree of layers; ``state_dict()`` walks it and names every tensor
``child.grandchild.tensor`` exactly as torchvision does for the same architecture,
so weights move 1:1 between this engine, PyTorch and ONNX.
"""

from __future__ import annotations

import numpy as np

from ..arrays import as_f32
from ..errors import ShapeError
from .base import Layer, keeps_cache
from .batchnorm import BatchNorm2d
from .pointwise import ReLU
from .recompute import drop_caches, leaves, restore, snapshot
from .weighted import Conv2d


def _walk(layer: Layer, prefix: str, pick):
    """Yield (dotted name, array) from the leaf layers below ``layer``."""
    kids = layer.children()
    if not kids:
        for name, arr in pick(layer).items():
            yield prefix + name, arr
    for name, child in kids.items():
        yield from _walk(child, f"{prefix}{name}.", pick)


class Module(Layer):
    """A layer made of named children; its tensors are its leaves', by dotted name.

    ``params()``, ``grads()`` and ``buffers()`` return the arrays themselves (not
    copies), keyed ``child.grandchild.tensor``.
    """

    def params(self) -> dict[str, np.ndarray]:
        return dict(_walk(self, "", lambda layer: layer.params()))

    def grads(self) -> dict[str, np.ndarray]:
        return dict(_walk(self, "", lambda layer: layer.grads()))

    def buffers(self) -> dict[str, np.ndarray]:
        return dict(_walk(self, "", lambda layer: layer.buffers()))

    def named_layers(self) -> dict[str, Layer]:
        """Every layer in the tree by dotted name (this module is "")."""
        out = {"": self}

        def visit(layer, prefix):
            for name, child in layer.children().items():
                out[prefix + name] = child
                visit(child, f"{prefix}{name}.")
        visit(self, "")
        return out

    def zero_grad(self) -> None:
        # each leaf zeroes its own gradients: a layer on a static sparse pattern
        # only the entries it wrote (O(nnz))
        for layer in self.named_layers().values():
            if layer is not self and not layer.children():
                layer.zero_grad()

    def _tensors(self) -> dict[str, np.ndarray]:
        # per layer: parameters, then buffers -- torchvision's state_dict order
        return dict(_walk(self, "", lambda layer: {**layer.params(),
                                                   **layer.buffers()}))

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of parameters and buffers under torchvision's names.

        A Powerprop layer's ``weight`` is its parameter ``v``, not w = v|v|^(alpha-1).
        """
        return {name: arr.copy() for name, arr in self._tensors().items()}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy arrays into the model in place, checking every name and shape first.

        ``num_batches_tracked`` may be absent (older or converted files). With
        ``strict`` unknown names are an error. Nothing is written unless all checks pass.
        """
        own = self._tensors()
        missing = [k for k in own if k not in state
                   and not k.endswith("num_batches_tracked")]
        unknown = [k for k in state if k not in own]
        if missing or (strict and unknown):
            raise ShapeError(
                "load_state_dict: names do not match the model: "
                f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                f"unexpected {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        checked = {}
        for name, dst in own.items():
            if name not in state:
                continue
            src = np.asarray(state[name])
            if src.shape != dst.shape:
                raise ShapeError(f"load_state_dict: tensor '{name}': expected shape "
                                 f"{dst.shape}, got {src.shape}")
            if src.dtype.kind not in "fiub":
                raise ShapeError(f"load_state_dict: tensor '{name}': expected numbers, "
                                 f"got dtype {src.dtype}")
            if dst.dtype.kind == "f" and not np.all(np.isfinite(src)):
                raise ShapeError(f"load_state_dict: tensor '{name}' holds NaN or inf")
            checked[name] = src
        for name, src in checked.items():
            own[name][...] = src
        from ..inference import unfreeze  # a frozen inference copy is stale now

        unfreeze(self)


class Sequential(Module):
    """Children run in order; names are given ("conv1", "layer1", ...) or "0", "1", ..."""

    def __init__(self, layers):
        pairs = layers.items() if isinstance(layers, dict) else layers
        pairs = [(str(i), p) if isinstance(p, Layer) else p for i, p in enumerate(pairs)]
        self._children = dict(pairs)

    def children(self):
        return self._children

    def chains(self):
        return [list(self._children.values())]

    def __getitem__(self, name):
        return self._children[str(name)]

    def __iter__(self):
        return iter(self._children.values())

    def __len__(self):
        return len(self._children)

    def forward(self, x, train, grad=None):
        for layer in self._children.values():
            x = layer.forward(x, train, grad)
        return x

    def backward(self, grad_out):
        for layer in reversed(self._children.values()):
            grad_out = layer.backward(grad_out)
        return grad_out

    def __repr__(self):
        body = "\n".join(f"  ({n}): " + repr(c).replace("\n", "\n  ")
                         for n, c in self._children.items())
        return f"{type(self).__name__}(\n{body}\n)"


class BasicBlock(Module):
    """ResNet basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    The shortcut is identity, or a 1x1 strided conv plus BatchNorm (``downsample``)
    when the stride or the width changes, as in torchvision.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, *,
                 alpha: float = 1.0, rng: np.random.Generator | None = None):
        self.conv1 = Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False,
                            alpha=alpha, rng=rng)
        self.bn1 = BatchNorm2d(planes)
        self.relu1 = ReLU()
        self.conv2 = Conv2d(planes, planes, 3, padding=1, bias=False, alpha=alpha,
                            rng=rng)
        self.bn2 = BatchNorm2d(planes)
        self.relu2 = ReLU()
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = Sequential([
                Conv2d(in_planes, planes, 1, stride=stride, bias=False, alpha=alpha,
                       rng=rng),
                BatchNorm2d(planes)])

    def children(self):
        # torchvision's order; the ReLUs hold no tensors but belong to the tree
        # (cost accounting walks it)
        kids = {"conv1": self.conv1, "bn1": self.bn1, "relu1": self.relu1,
                "conv2": self.conv2, "bn2": self.bn2}
        if self.downsample is not None:
            kids["downsample"] = self.downsample
        kids["relu2"] = self.relu2
        return kids

    def chains(self):
        # not conv2, bn2, relu2: the shortcut is added between bn2 and relu2
        return [[self.conv1, self.bn1, self.relu1], [self.conv2, self.bn2]]

    #: whether the last forward ran the fused BatchNorm + ReLU (+ add) kernels
    _fused = False
    #: keep only the input and run the forward again in backward (recompute.py)
    recompute = False
    _replay = None  # (x, train, grad, state before the forward) while recomputing

    def forward(self, x, train, grad=None):
        x = as_f32(x, "BasicBlock.forward")
        if not (self.recompute and keeps_cache(train, grad)):
            self._replay = None
            self._set_cache(None, held=0)
            return self._forward(x, train, grad)
        inner = leaves(self)
        state = snapshot(inner)
        out = self._forward(x, train, grad)
        drop_caches(inner)
        self._replay = (x, train, grad, state)
        # the leaves keep their dense figures: a dense backward would hold those
        self._set_cache(None, held=x.nbytes, dense=0)
        return out

    def _forward(self, x, train, grad):
        self._fused = (self.bn1.fusable(self.relu1, train, grad)
                       and self.bn2.fusable(self.relu2, train, grad))
        if self._fused:
            # bn1+relu1 and bn2+add+relu2 in one pass each (and one pair of
            # passes back), keeping x per BatchNorm and relu2's mask, no relu1 mask
            out = self.bn1.forward_relu(self.conv1.forward(x, train, grad), train, grad,
                                        self.relu1)
            out = self.conv2.forward(out, train, grad)
            short = (x if self.downsample is None
                     else self.downsample.forward(x, train, grad))
            return self.bn2.forward_relu(out, train, grad, self.relu2, residual=short)
        out = self.relu1.forward(self.bn1.forward(self.conv1.forward(x, train, grad),
                                                  train, grad), train, grad)
        out = self.bn2.forward(self.conv2.forward(out, train, grad), train, grad)
        short = x if self.downsample is None else self.downsample.forward(x, train, grad)
        out += short
        return self.relu2.forward(out, train, grad, inplace=True)  # out is ours

    def backward(self, grad_out):
        if self._replay is not None:
            x, train, grad, state = self._replay
            self._replay = None
            restore(state)
            inner = leaves(self)
            self._forward(x, train, grad)
            for layer in inner:  # held only now, one block at a time: the
                layer.cost.held_bytes = 0  # forward's figure is the block's input
        if self._fused:
            g, g_res = self.bn2.backward_relu(grad_out)
            g_short = (g_res if self.downsample is None
                       else self.downsample.backward(g_res))
            g = self.conv2.backward(g)
            g = self.conv1.backward(self.bn1.backward_relu(g)[0])
        else:
            g = self.relu2.backward(grad_out)
            g_short = g if self.downsample is None else self.downsample.backward(g)
            g = self.conv2.backward(self.bn2.backward(g))
            g = self.conv1.backward(self.bn1.backward(self.relu1.backward(g)))
        g += g_short
        return g

    def __repr__(self):
        return (f"BasicBlock({self.conv1.in_channels}, {self.conv1.out_channels}, "
                f"stride={self.conv1.stride})")
