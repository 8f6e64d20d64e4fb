"""``sparsefedpp partition``: one .npz of training data per device, split as the
simulation splits it, to try a deployment (or compare it with ``simulate``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sparsefedpp.runtime.checkpoint import write_atomic
from sparsefedpp.trainer.data import load_dataset

from .progress import say
from .simulate import client_parts


def add_parser(sub) -> None:
    p = sub.add_parser("partition", help="split a dataset into per-device .npz files",
                       description="Write OUT/client-<k>.npz for k = 0..N-1 with the "
                       "simulation's split (Dirichlet label skew or IID).")
    p.add_argument("--data", default="fashion-mnist", help="dataset (as for train)")
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--lda-alpha", type=float, default=1.0,
                   help="Dirichlet concentration (default 1.0)")
    p.add_argument("--iid", action="store_true", help="IID split")
    p.add_argument("--limit", type=int, default=None,
                   help="use the first N training examples only")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=run)


def run(args) -> int:
    train = load_dataset(args.data, "train")
    if args.limit is not None:
        train = train.subset(np.arange(min(args.limit, len(train))))
    parts = client_parts(train, args.clients, None if args.iid else args.lda_alpha,
                         seed=args.seed)
    out = Path(args.out)
    for k, idx in enumerate(parts):
        shard = train.subset(idx)
        arrays = {"x_train": shard.images, "y_train": shard.labels,
                  "x_test": shard.images[:0], "y_test": shard.labels[:0],
                  "classes": np.array(train.classes)}
        write_atomic(out / f"client-{k}.npz", lambda f, a=arrays: np.savez(f, **a))
    say(f"wrote {len(parts)} shards to {out} ({min(map(len, parts))} to "
        f"{max(map(len, parts))} examples each)", quiet=args.quiet)
    return 0
