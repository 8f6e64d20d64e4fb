"""Where a train step's time goes, by kind of work: conv/linear kernels (forward,
grad input, grad weight), weight preparation, compressing the kept activations,
MAC accounting, BatchNorm, ReLU, BatchNorm+ReLU fused (the blocks' and the
stem's), pooling, the rest of each layer's Python, the residual adds and
dispatch of the blocks, the loss and SGD.

    python tools/bench/profile_step.py --model resnet18 --sparsity 0.99 --steps 10

Every leaf layer's forward/backward and the kernel entry points that
``runtime.layers`` calls are wrapped with a timer; a layer's own time is its total
minus the kernels timed inside it. Medians over the steps (after two warm-up
steps). The sparse settings are those of ``sparsefedpp bench-sparse`` (every
conv/linear pruned to S, top 1-S activations kept, Powerprop alpha 1.25). The
timers cost a few microseconds per call, so the step here is a little slower
than in ``bench-sparse``.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import time

import numpy as np
from sparsefedpp.runtime import SGD, models, softmax_cross_entropy
from sparsefedpp.runtime.kernels import (
    conv,
    csr_build,
    csr_conv,
    csr_linear,
    sparse_grad,
)
from sparsefedpp.runtime.layers import powerprop
from sparsefedpp.runtime.layers.batchnorm import BatchNorm2d
from sparsefedpp.runtime.sparsity import activation_policy, pruning, static_pattern
from sparsefedpp.runtime.sparsity.activations import (
    ActivationSparsifier,
    SparseActivations,
)

FUSED = "BatchNorm+ReLU(+residual add) fused"
#: (owner, attribute) -> kind: the kernels and helpers conv/linear layers call,
#: and the fused BatchNorm paths the blocks call
KERNELS = {
    (conv, "conv2d_forward"): "conv/linear forward kernel",
    (csr_conv, "csr_conv2d_forward"): "conv/linear forward kernel",
    (csr_linear, "csr_linear_forward"): "conv/linear forward kernel",
    (conv, "conv2d_grad_input"): "conv/linear grad input kernel",
    (csr_conv, "csr_conv2d_grad_input"): "conv/linear grad input kernel",
    (csr_linear, "csr_linear_grad_input"): "conv/linear grad input kernel",
    (conv, "conv2d_grad_weight"): "conv/linear grad weight kernel",
    (sparse_grad, "conv2d_grad_weight_sparse_count"): "conv/linear grad weight kernel",
    (sparse_grad, "linear_grad_weight_sparse"): "conv/linear grad weight kernel",
    (static_pattern, "conv_grad"): "conv/linear grad weight kernel",
    (static_pattern, "linear_grad"): "conv/linear grad weight kernel",
    (static_pattern.StaticPattern, "values"): "weight prep (Powerprop, CSR)",
    (powerprop, "effective_weight"): "weight prep (Powerprop, CSR)",
    (csr_build, "csr_of_weight"): "weight prep (Powerprop, CSR)",
    (csr_build, "weight_row_nnz"): "weight prep (Powerprop, CSR)",
    (ActivationSparsifier, "compress"): "top-k/compress kept activations",
    (SparseActivations, "indices"): "top-k/compress kept activations",
    (SparseActivations, "to_dense"): "top-k/compress kept activations",
    (csr_conv, "csr_conv2d_macs"): "MAC accounting",
    # BasicBlock and the stem run BatchNorm + ReLU (+ the residual add) fused
    (BatchNorm2d, "forward_relu"): FUSED,
    (BatchNorm2d, "backward_relu"): FUSED,
}
LAYER_KINDS = {"Conv2d": "conv/linear layer Python (checks, dw/dv, grad +=)",
               "Linear": "conv/linear layer Python (checks, dw/dv, grad +=)",
               "BatchNorm2d": "BatchNorm", "ReLU": "ReLU",
               "GlobalAvgPool2d": "pooling", "MaxPool2d": "pooling",
               "Flatten": "flatten"}
BLOCKS = "blocks: residual add, dispatch"


class Timers:
    """Seconds per (kind, phase) of the current step; ``inner`` tracks kernel time
    spent inside the layer call that is running, so layers report only their own."""

    def __init__(self):
        self.times: dict[tuple[str, str], float] = collections.defaultdict(float)
        self.phase = "forward"
        self.inner = [0.0]
        self.in_kernel = False

    def wrap_kernel(self, owner, attr: str, kind: str) -> None:
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self.in_kernel:  # called by another timed entry point: counted there
                return fn(*args, **kwargs)
            self.in_kernel = True
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.in_kernel = False
                dt = time.perf_counter() - t
                self.times[(kind, self.phase)] += dt
                self.inner[-1] += dt

        setattr(owner, attr, timed)

    def wrap_layer(self, layer, kind: str) -> None:
        fwd, bwd = layer.forward, layer.backward

        def call(fn, phase, *args, **kwargs):
            self.phase = phase
            self.inner.append(0.0)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t
                inner = self.inner.pop()
                self.times[(kind, phase)] += dt - inner
                self.inner[-1] += dt

        layer.forward = functools.partial(call, fwd, "forward")
        layer.backward = functools.partial(call, bwd, "backward")


def profile(model_name: str, sparsity: float, batch_size: int, steps: int,
            width: float = 1.0) -> dict:
    """Median ms per (kind, phase) and of the whole step."""
    alpha = 1.25 if sparsity > 0 else 1.0
    model = models.build(model_name, alpha=alpha, width=width, seed=0)
    if sparsity > 0:
        pruning.prune(model, sparsity, "layer")
        activation_policy.fixed(model, sparsity, first_layer_dense=False,
                                weights=False)
    opt = SGD(model.params(), model.grads(), 0.01, momentum=0.9, weight_decay=5e-4)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch_size, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, 10, batch_size)
    timers = Timers()
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr in KERNELS]
    try:
        for (owner, attr), kind in KERNELS.items():
            timers.wrap_kernel(owner, attr, kind)
        for layer in model.named_layers().values():
            if not layer.children():
                timers.wrap_layer(layer, LAYER_KINDS.get(type(layer).__name__,
                                                         type(layer).__name__))
        per_step = collections.defaultdict(list)
        totals = []
        for step in range(steps + 2):
            timers.times.clear()
            timers.inner = [0.0]
            t0 = time.perf_counter()
            model.zero_grad()
            t1 = time.perf_counter()
            timers.phase = "forward"
            logits = model.forward(x, train=True)
            t2 = time.perf_counter()
            _loss, g = softmax_cross_entropy(logits, y)
            t3 = time.perf_counter()
            forward_layers = timers.inner[0]
            timers.inner = [0.0]
            model.backward(g, input_grad=False)
            t4 = time.perf_counter()
            backward_layers = timers.inner[0]
            opt.step()
            t5 = time.perf_counter()
            if step < 2:  # warm-up
                continue
            times = dict(timers.times)
            times[("zero_grad", "")] = t1 - t0
            times[("loss", "")] = t3 - t2
            times[("SGD step", "")] = t5 - t4
            times[(BLOCKS, "forward")] = (t2 - t1) - forward_layers
            times[(BLOCKS, "backward")] = (t4 - t3) - backward_layers
            for key, v in times.items():
                per_step[key].append(v)
            totals.append(t5 - t0)
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)
    ms = {key: float(np.median(v) * 1e3) for key, v in per_step.items()}
    return {"model": model_name, "sparsity": sparsity, "batch_size": batch_size,
            "width": width, "steps": steps, "step_ms": float(np.median(totals) * 1e3),
            "kinds": [{"kind": k, "phase": p, "ms": v} for (k, p), v in
                      sorted(ms.items(), key=lambda kv: -kv[1])]}


def format_table(result: dict, fmt: str = "text") -> str:
    step = result["step_ms"]
    head = (f"{result['model']} batch {result['batch_size']}, sparsity "
            f"{result['sparsity']}: step median {step:.1f} ms over {result['steps']} "
            "steps (medians per kind need not add up to it)")
    rows = [(k["kind"], k["phase"], k["ms"], k["ms"] / step) for k in result["kinds"]]
    if fmt == "markdown":
        out = ["| kind | phase | ms | share |", "|---|---|---:|---:|"]
        out += [f"| {k} | {p} | {v:.2f} | {s:.1%} |" for k, p, v, s in rows]
        return "\n".join([head, "", *out])
    return "\n".join([head, *(f"  {k:<52}{p:<9}{v:9.2f} ms {s:6.1%}"
                              for k, p, v, s in rows)])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet8")
    p.add_argument("--sparsity", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--format", default="text", choices=("text", "markdown", "json"))
    args = p.parse_args(argv)
    result = profile(args.model, args.sparsity, args.batch_size, args.steps, args.width)
    print(json.dumps(result) if args.format == "json" else
          format_table(result, args.format))


if __name__ == "__main__":
    main()
