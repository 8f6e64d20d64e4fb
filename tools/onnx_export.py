"""Build an ONNX inference graph from an engine model (eval mode, Powerprop w).

The graph is made by walking the model tree: a Sequential chains its children, a
BasicBlock adds its main branch to its shortcut, and every leaf layer maps to one
ONNX node (Conv, Gemm, BatchNormalization, Relu, MaxPool, GlobalAveragePool,
Flatten). Initializers keep the state-dict names (``layer1.0.conv1.weight``) but
hold the effective weights w = v|v|^(alpha-1), not the stored ``v``.

onnx is imported here and in cmd_export.py only (STYLE.md, "Layout").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.runtime.inference import bn_scale_shift
from sparsefedpp.runtime.layers import Conv2d, Flatten, Layer, Linear, ReLU
from sparsefedpp.runtime.layers.batchnorm import BatchNorm2d
from sparsefedpp.runtime.layers.containers import BasicBlock, Sequential
from sparsefedpp.runtime.layers.pooling import GlobalAvgPool2d, MaxPool2d
from sparsefedpp.runtime.sparsity import pruning

INPUT = "input"
OUTPUT = "logits"
OPSET_MIN = 13  # Gemm with an optional C, Flatten with negative axes
# A sparse initializer stores each nonzero as a float32 value plus an int64 flat
# index (ONNX requires int64 indices): 12 bytes against 4 per dense value.
SPARSE_BYTES_PER_NONZERO = 12
DENSE_BYTES_PER_VALUE = 4


@dataclass
class ExportReport:
    """What the builder wrote: sparse initializers and the weights left dense (why)."""

    sparse: list[str] = field(default_factory=list)
    dense_fallback: dict[str, str] = field(default_factory=dict)
    folded: list[str] = field(default_factory=list)


class _Builder:
    """Collects nodes and initializers while the model tree is walked."""

    def __init__(self, *, fold_bn: bool, sparse_initializers: bool):
        self.fold_bn = fold_bn
        self.sparse_initializers = sparse_initializers
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.sparse: list[onnx.SparseTensorProto] = []
        self.report = ExportReport()

    # ------------------------------------------------------------------ tensors
    def tensor(self, name: str, arr: np.ndarray) -> str:
        """A dense float32 initializer."""
        self.initializers.append(numpy_helper.from_array(
            np.ascontiguousarray(arr, dtype=np.float32), name))
        return name

    def weight(self, name: str, w: np.ndarray) -> str:
        """A conv/linear weight: sparse when asked for and smaller, else dense."""
        if not self.sparse_initializers:
            return self.tensor(name, w)
        flat = np.ascontiguousarray(w, dtype=np.float32).ravel()
        idx = np.flatnonzero(flat)
        if idx.size * SPARSE_BYTES_PER_NONZERO >= flat.size * DENSE_BYTES_PER_VALUE:
            self.report.dense_fallback[name] = (
                f"density {idx.size / flat.size:.3f}: {SPARSE_BYTES_PER_NONZERO} B per "
                f"nonzero would exceed {DENSE_BYTES_PER_VALUE} B per dense value")
            return self.tensor(name, w)
        values = numpy_helper.from_array(flat[idx], name)
        indices = numpy_helper.from_array(idx.astype(np.int64), name + ".indices")
        self.sparse.append(helper.make_sparse_tensor(values, indices, list(w.shape)))
        self.report.sparse.append(name)
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        """Append one node; its single output is named after the node."""
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    # ------------------------------------------------------------------ walking
    def emit(self, layer: Layer, x: str, name: str) -> str:
        """Emit ``layer`` (any node of the tree) reading tensor ``x``; returns its output."""
        if isinstance(layer, BasicBlock):
            return self.block(layer, x, name)
        if isinstance(layer, Sequential):
            return self.sequence(list(layer.children().items()), x, name)
        return self.leaf(layer, x, name)

    def sequence(self, items: list[tuple[str, Layer]], x: str, prefix: str) -> str:
        """Children in order; with fold_bn a Conv2d followed by BatchNorm2d is one Conv."""
        i = 0
        while i < len(items):
            name, layer = items[i]
            full = _join(prefix, name)
            nxt = items[i + 1][1] if i + 1 < len(items) else None
            if self.fold_bn and isinstance(layer, Conv2d) and isinstance(nxt, BatchNorm2d):
                x = self.conv(layer, x, full, bn=nxt)
                self.report.folded.append(_join(prefix, items[i + 1][0]))
                i += 2
                continue
            x = self.emit(layer, x, full)
            i += 1
        return x

    def block(self, block: BasicBlock, x: str, prefix: str) -> str:
        """relu2(main(x) + shortcut(x)): main is every child but downsample and relu2."""
        kids = block.children()
        main = [(n, c) for n, c in kids.items() if n not in ("downsample", "relu2")]
        out = self.sequence(main, x, prefix)
        short = x
        if "downsample" in kids:
            short = self.emit(kids["downsample"], x, _join(prefix, "downsample"))
        added = self.node("Add", [out, short], _join(prefix, "add"))
        return self.emit(kids["relu2"], added, _join(prefix, "relu2"))

    def leaf(self, layer: Layer, x: str, name: str) -> str:
        if isinstance(layer, Conv2d):
            return self.conv(layer, x, name)
        if isinstance(layer, Linear):
            inputs = [x, self.weight(f"{name}.weight", layer.effective_weight())]
            if layer.bias is not None:
                inputs.append(self.tensor(f"{name}.bias", layer.bias))
            return self.node("Gemm", inputs, name, transB=1)
        if isinstance(layer, BatchNorm2d):
            inputs = [x] + [self.tensor(f"{name}.{t}", getattr(layer, t)) for t in
                            ("weight", "bias", "running_mean", "running_var")]
            return self.node("BatchNormalization", inputs, name,
                             epsilon=float(layer.eps))
        if isinstance(layer, ReLU):
            return self.node("Relu", [x], name)
        if isinstance(layer, MaxPool2d):
            k, p = layer.kernel_size, layer.padding
            return self.node("MaxPool", [x], name, kernel_shape=[k, k],
                             strides=[layer.stride] * 2, pads=[p] * 4)
        if isinstance(layer, GlobalAvgPool2d):
            return self.node("GlobalAveragePool", [x], name)
        if isinstance(layer, Flatten):
            return self.node("Flatten", [x], name, axis=1)
        raise ConfigError(f"ONNX export of '{name}': expected Conv2d, Linear, "
                          "BatchNorm2d, ReLU, MaxPool2d, GlobalAvgPool2d, Flatten, "
                          f"Sequential or BasicBlock, got {type(layer).__name__}")

    def conv(self, layer: Conv2d, x: str, name: str, bn: BatchNorm2d | None = None) -> str:
        w, b = fold_conv_bn(layer, bn)
        inputs = [x, self.weight(f"{name}.weight", w)]
        if b is not None:
            inputs.append(self.tensor(f"{name}.bias", b))
        k, p = layer.kernel_size, layer.padding
        return self.node("Conv", inputs, name, kernel_shape=[k, k],
                         strides=[layer.stride] * 2, pads=[p] * 4)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def fold_conv_bn(conv: Conv2d, bn: BatchNorm2d | None):
    """Effective conv weight and bias, with an eval-mode BatchNorm folded in.

    Returns (w (O, C, kh, kw) f4, b (O,) f4 or None). With ``bn``, the same fold as
    the engine's frozen inference (``runtime.inference.bn_scale_shift``):
    w' = w * s[o], b' = b * s + t, computed in float64; zeros of w stay zero.
    """
    w = conv.effective_weight()
    if bn is None:
        return w, conv.bias
    scale, shift = bn_scale_shift(bn)
    bias = np.zeros(w.shape[0]) if conv.bias is None else conv.bias.astype(np.float64)
    folded_w = (w.astype(np.float64) * scale[:, None, None, None]).astype(np.float32)
    return folded_w, (bias * scale + shift).astype(np.float32)


def metadata(model, meta: dict, *, fold_bn: bool) -> dict[str, str]:
    """metadata_props: the build config, measured sparsity, and what the checkpoint
    meta knows (method, target sparsity, class names, normalisation); lists as JSON."""
    props = {"producer": "sparsefedpp", "model": model.name, "width": repr(model.width),
             "alpha": repr(model.alpha), "num_classes": str(model.num_classes),
             "in_channels": str(model.in_channels),
             "sparsity": f"{pruning.global_sparsity(model):.6f}",
             "fold_bn": str(bool(fold_bn)).lower(),
             "method": str(meta.get("method", "unknown"))}
    if "sparsity" in meta:
        props["target_sparsity"] = str(meta["sparsity"])
    for key in ("classes", "mean", "std"):
        if key in meta:
            props[key] = json.dumps(list(meta[key]))
    for key in ("dataset", "round", "epoch"):
        if key in meta:
            props[key] = str(meta[key])
    return props


def build_onnx(model, meta: dict | None = None, *, opset: int = 17,
               sparse_initializers: bool = False,
               fold_bn: bool = False) -> tuple[onnx.ModelProto, ExportReport]:
    """The inference graph of ``model`` in eval mode (running BatchNorm statistics).

    Parameters
    ----------
    model : runtime.models.Model
        Any tree of Sequential / BasicBlock / leaf layers with ``name``,
        ``in_channels``, ``num_classes``, ``width``, ``alpha``.
    meta : checkpoint metadata (method, sparsity, classes, mean, std); may be None.
    opset : ONNX default-domain opset, OPSET_MIN..onnx's newest.
    sparse_initializers : write conv/linear weights as SparseTensorProto where
        that is smaller than dense (see ``ExportReport.dense_fallback``).
    fold_bn : fold each BatchNorm2d into the Conv2d right before it.

    Returns
    -------
    (onnx.ModelProto, ExportReport). Input "input": float32 (batch, C, height,
    width); output "logits": float32 (batch, num_classes); batch, height and
    width are symbolic.
    """
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not (
            OPSET_MIN <= opset <= newest):
        raise ConfigError(f"ONNX opset: expected an integer in {OPSET_MIN}..{newest}, "
                          f"got {opset!r}")
    builder = _Builder(fold_bn=fold_bn, sparse_initializers=sparse_initializers)
    out = builder.emit(model, INPUT, "")
    if not builder.nodes:
        raise ConfigError(f"ONNX export of {model.name}: expected at least one layer, "
                          "got none")
    assert builder.nodes[-1].output[0] == out  # the walk appends in execution order
    builder.nodes[-1].output[0] = OUTPUT  # the final node (fc) writes "logits"
    graph = helper.make_graph(
        builder.nodes, model.name,
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT,
                                       ["batch", model.in_channels, "height", "width"])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT,
                                       ["batch", model.num_classes])],
        initializer=builder.initializers, sparse_initializer=builder.sparse)
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="sparsefedpp",
                              ir_version=helper.find_min_ir_version_for(opsets))
    helper.set_model_props(proto, metadata(model, meta or {}, fold_bn=fold_bn))
    return proto, builder.report


def check(proto: onnx.ModelProto) -> None:
    """onnx.checker on the model; full shape inference only without sparse
    initializers (onnx types those as sparse_tensor, which Conv/Gemm inference
    rejects even though onnxruntime densifies and runs them).

    Raises ConfigError with the checker's message.
    """
    try:
        onnx.checker.check_model(proto, full_check=not proto.graph.sparse_initializer)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ConfigError(f"ONNX export: expected a graph onnx.checker accepts, got "
                          f"{type(err).__name__}: {err}") from None
