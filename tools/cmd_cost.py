"""``sparsefedpp cost``: what one train step of a (pruned) model executes and holds.

Builds a model (or loads a checkpoint), optionally prunes it, applies an
activation-sparsity policy, runs one train step on a random batch and prints the
per-layer cost report: executed MACs (forward, grad_input, grad_weight), bytes
held for backward, and weight bytes dense vs CSR (runtime/accounting.py).
"""

from __future__ import annotations

import json

import numpy as np
from sparsefedpp.runtime import accounting, checkpoint, models, softmax_cross_entropy
from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.runtime.sparsity import activation_policy, pruning

from .flags import add_common

POLICIES = ("dense", "fixed", "weight-driven")


def add_parser(sub) -> None:
    p = sub.add_parser("cost", help="MACs, memory held for backward and weight bytes of a step",
                       description="Run one train step of a model at a given weight and "
                       "activation sparsity and print the per-layer cost report.")
    p.add_argument("--model", default="resnet8", choices=models.NAMES)
    p.add_argument("--checkpoint", default=None, help="a model.npz (instead of --model)")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=1.25)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sparsity", type=float, default=0.0,
                   help="magnitude-prune the weights to this sparsity first")
    p.add_argument("--scope", default="global", choices=pruning.SCOPES)
    p.add_argument("--policy", default="weight-driven", choices=POLICIES,
                   help="activation sparsity: weight-driven (SparseFedPP), fixed "
                   "(ZeroFL/SWAT-U, uses --act-sparsity) or dense")
    p.add_argument("--act-sparsity", type=float, default=0.9,
                   help="activation (and forward weight) sparsity of --policy fixed")
    p.add_argument("--min-keep", type=float, default=0.05,
                   help="floor on the kept activation fraction of --policy weight-driven")
    p.add_argument("--format", default="text", choices=("text", "json"))
    add_common(p)
    p.set_defaults(run=run)


def run(args) -> int:
    if args.checkpoint:
        model, _ = checkpoint.load(args.checkpoint)
    else:
        model = models.build(args.model, width=args.width, alpha=args.alpha,
                             in_channels=args.in_channels, seed=args.seed)
    if args.batch_size < 2 or args.image_size < 4:
        raise ConfigError(f"cost: expected --batch-size >= 2 and --image-size >= 4, got "
                          f"{args.batch_size} and {args.image_size}")
    if args.sparsity > 0:
        pruning.prune(model, args.sparsity, args.scope)
    if args.policy == "fixed":
        activation_policy.fixed(model, args.act_sparsity)
    elif args.policy == "weight-driven":
        activation_policy.weight_driven(model, min_keep=args.min_keep)
    else:
        activation_policy.dense(model)
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.batch_size, model.in_channels, args.image_size,
                             args.image_size), dtype=np.float32)
    y = rng.integers(0, model.num_classes, args.batch_size)
    model.zero_grad()
    _, grad = softmax_cross_entropy(model.forward(x, train=True), y)
    model.backward(grad)
    report = accounting.cost_report(model)
    if args.format == "json":
        print(json.dumps(report.to_dict()))
    else:
        print(f"{model.name} (width {model.width}, alpha {model.alpha}), batch "
              f"{args.batch_size}, {args.image_size}x{args.image_size}; weight sparsity "
              f"{pruning.global_sparsity(model):.4f}; policy {args.policy}")
        print(report.format())
    return 0
