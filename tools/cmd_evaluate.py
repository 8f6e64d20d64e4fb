"""``sparsefedpp evaluate``: test accuracy of a checkpoint on a dataset split."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
from sparsefedpp.runtime import checkpoint
from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.trainer.data import load_dataset
from sparsefedpp.trainer.local import evaluate

from .flags import add_common
from .metrics import MetricsWriter
from .progress import say


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy of a checkpoint on a dataset split")
    p.add_argument("checkpoint", help="a model.npz written by train")
    p.add_argument("--data", required=True, help="the dataset (as for train)")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate the first N examples only")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_common(p)
    p.set_defaults(run=run)


def run(args) -> int:
    model, meta = checkpoint.load(args.checkpoint)
    data = load_dataset(args.data, args.split)
    if args.limit is not None:
        data = data.subset(np.arange(min(args.limit, len(data))))
    if data.images.shape[1] != model.in_channels or len(data.classes) != model.num_classes:
        raise ConfigError(
            f"evaluate: expected a dataset with {model.in_channels} channels and "
            f"{model.num_classes} classes for this checkpoint, got "
            f"{data.images.shape[1]} and {len(data.classes)} ({data.name})")
    if "mean" in meta and tuple(meta["mean"]) != tuple(data.mean):
        # normalise exactly as in training, whatever split this is
        data = replace(data, mean=tuple(meta["mean"]), std=tuple(meta["std"]))
    scores = evaluate(model, data, args.batch_size)
    result = {"checkpoint": args.checkpoint, "dataset": data.name,
              "split": args.split, **scores}
    with MetricsWriter(args.metrics) as metrics:
        metrics.write("evaluate", **result)
    if args.json:
        print(json.dumps(result))
    else:
        say(f"{data.name} {args.split}: accuracy {scores['accuracy']:.4f}  "
            f"loss {scores['loss']:.4f}  ({scores['num_examples']} images)")
    return 0
