"""Where a train step's time goes: per-layer-type forward/backward milliseconds.

    python tools/profile_step.py --model resnet8 --sparsity 0.99 --steps 20

Wraps every leaf layer's forward/backward with a timer (medians over the steps,
summed per layer type), plus the loss and the SGD update. The sparse settings are
those of ``sparsefedpp bench-sparse`` (every conv/linear pruned to S, top 1-S
activations kept, Powerprop alpha 1.25).
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np
from sparsefedpp.runtime import (
    SGD,
    activation_policy,
    models,
    pruning,
    softmax_cross_entropy,
)


def _wrap(layer, name, times):
    fwd, bwd = layer.forward, layer.backward

    def forward(x, train, grad=None, **kwargs):  # kwargs: ReLU's inplace
        t = time.perf_counter()
        y = fwd(x, train, grad, **kwargs)
        times[(name, "forward")] += time.perf_counter() - t
        return y

    def backward(g):
        t = time.perf_counter()
        out = bwd(g)
        times[(name, "backward")] += time.perf_counter() - t
        return out

    layer.forward, layer.backward = forward, backward


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet8")
    p.add_argument("--sparsity", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    alpha = 1.25 if args.sparsity > 0 else 1.0
    model = models.build(args.model, alpha=alpha, seed=0)
    if args.sparsity > 0:
        pruning.prune(model, args.sparsity, "layer")
        activation_policy.fixed(model, args.sparsity, first_layer_dense=False,
                                weights=False)
    opt = SGD(model.params(), model.grads(), 0.01, momentum=0.9, weight_decay=5e-4)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch_size, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, 10, args.batch_size)
    times = collections.defaultdict(float)
    for layer in model.named_layers().values():
        if not layer.children():
            _wrap(layer, type(layer).__name__, times)
    per_step = collections.defaultdict(list)
    totals = []
    for step in range(args.steps + 2):
        times.clear()
        t0 = time.perf_counter()
        model.zero_grad()
        t = time.perf_counter()
        _loss, g = softmax_cross_entropy(model.forward(x, train=True), y)
        fwd_end = time.perf_counter()
        model.backward(g)
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        if step < 2:  # warm-up
            continue
        times[("SGD", "step")] = t2 - t1
        times[("zero_grad", "")] = t - t0
        times[("loss", "")] = fwd_end - t - sum(v for (n, k), v in times.items()
                                                 if k == "forward")
        for key, v in times.items():
            per_step[key].append(v)
        totals.append(t2 - t0)
    print(f"{args.model} batch {args.batch_size}, sparsity {args.sparsity}: step "
          f"median {np.median(totals) * 1e3:.1f} ms over {args.steps} steps")
    for key in sorted(per_step, key=lambda k: -np.median(per_step[k])):
        print(f"  {key[0]:<16}{key[1]:<9}{np.median(per_step[key]) * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
