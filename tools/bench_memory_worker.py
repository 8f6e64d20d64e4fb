"""One ``sparsefedpp bench-memory`` measurement in a fresh process; prints one JSON line.

``python -m sparsefedpp.tools.bench_memory_worker --framework ours|torch --data
SHARD.npz --batch-size B [--sparsity S]`` trains ResNet-8 on a device's shard the
way a device does (uint8 images, converted per batch) and records the RSS after
each phase: the numeric library, the framework (for ours: numba), the kernels
(ours: Numba's compiled code loaded), the data, the model, the first step and a
whole local round; the peak (VmHWM) closes the record. Only the standard
library is imported at the top, so the first phase is the bare interpreter.
"""

from __future__ import annotations

import argparse
import json
import sys

from .bench_worker import proc_status_mb  # standard library only at its top


def rss_mb(key: str = "VmRSS") -> float:
    mb = proc_status_mb(key)
    return float("nan") if mb is None else round(mb, 1)


def ours(args, phases: dict) -> None:
    import numba  # noqa: F401
    phases["framework"] = rss_mb()
    from sparsefedpp.runtime import models
    from sparsefedpp.trainer.client import LocalConfig, MethodConfig, local_round
    from sparsefedpp.trainer.data import load_npz
    phases["kernels"] = rss_mb()
    import numpy as np

    data = load_npz(args.data)
    phases["data"] = rss_mb()
    model = models.build("resnet8", num_classes=len(data.classes), alpha=1.25, seed=0)
    phases["model"] = rss_mb()
    method = MethodConfig("sparsefedpp", args.sparsity) if args.sparsity else \
        MethodConfig("fedavg")
    local = LocalConfig(batch_size=args.batch_size)
    local_round(model, data.subset(np.arange(args.batch_size)), method, local,
                lr=0.05, seed=0)
    phases["first_step"] = rss_mb()
    local_round(model, data, method, local, lr=0.05, seed=0)
    phases["round"] = rss_mb()


def torch_side(args, phases: dict) -> None:
    import torch

    torch.set_num_threads(2)
    phases["framework"] = rss_mb()
    phases["kernels"] = phases["framework"]
    import numpy as np

    from . import bench_torch

    with np.load(args.data) as f:
        images, labels = f["x_train"], f["y_train"].astype(np.int64)
    phases["data"] = rss_mb()
    torch.manual_seed(0)
    model = bench_torch.build("resnet8")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=1e-3)
    phases["model"] = rss_mb()
    mean = images.mean(axis=(0, 2, 3), keepdims=True) / 255.0
    std = images.std(axis=(0, 2, 3), keepdims=True) / 255.0

    def step(idx):
        x = ((images[idx].astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)),
                                                 torch.from_numpy(labels[idx]))
        loss.backward()
        opt.step()

    model.train()
    step(np.arange(args.batch_size))
    phases["first_step"] = rss_mb()
    order = np.random.default_rng(0).permutation(len(labels))
    for i in range(0, len(order), args.batch_size):
        step(order[i:i + args.batch_size])
    phases["round"] = rss_mb()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsefedpp.tools.bench_memory_worker")
    p.add_argument("--framework", required=True, choices=("ours", "torch"))
    p.add_argument("--data", required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sparsity", type=float, default=0.0)
    args = p.parse_args(argv)
    phases = {"interpreter": rss_mb()}
    import numpy  # noqa: F401
    phases["numpy"] = rss_mb()
    (ours if args.framework == "ours" else torch_side)(args, phases)
    record = {"ok": True, "framework": args.framework, "batch_size": args.batch_size,
              "sparsity": args.sparsity, "phases_mb": phases, "peak_mb": rss_mb("VmHWM")}
    sys.stdout.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
