"""One ``sparsefedpp bench-memory`` measurement in a fresh process; prints one JSON line.

``python -m sparsefedpp.tools.bench.memory_worker --framework ours|torch --data
SHARD.npz --model resnet18 --batch-size B [--sparsity S]`` trains one local round
on a device's shard the way a device does: ours through
``trainer.local_round.local_round`` (the device agent's and simulate's code path) on a
model whose weights are already pruned to S (a client receives the sparse global
model: with ``--global-model FILE``, the encoded model message the parent wrote,
decoded and loaded into a model built without random initialisation, as the
device agent does), torch through the same plain SGD loop over the same uint8
batches. It
records the RSS after each phase: the numeric library, the framework (ours:
numba), the package with its kernels (loaded from Numba's cache), the data, the
model weights, the first step (activations), a whole round; then the peak
(VmHWM), the bytes of weights, gradients and optimizer state, the bytes held for
backward, the round time, the seconds from process start to the end of the
first step, and how many kernel signatures were compiled in this process (0 with
a warm cache). Only the standard library is imported at the top, so the first
phase is the bare interpreter.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from sparsefedpp.tools.bench.worker import (
    proc_status_mb,  # standard library only at its top
)

PHASES = ("interpreter", "numpy", "framework", "kernels", "data", "weights",
          "first_step", "round")
#: local SGD of a round (trainer.local_round.LocalConfig's reference, batch from the flag)
LR, WEIGHT_DECAY = 0.05, 1e-3


def rss_mb(key: str = "VmRSS") -> float:
    mb = proc_status_mb(key)
    return float("nan") if mb is None else round(mb, 1)


def _mb(arrays) -> float:
    return round(sum(a.nbytes for a in arrays) / 2**20, 2)


def optimizer_bytes(model, momentum: float) -> int:
    """Bytes of SGD's momentum buffers in a round: none without momentum; with it,
    one value per pattern entry for a weight that trains on its static CSR
    pattern (runtime/optim.py keeps those buffers as values at the pattern) and a
    dense buffer for every other parameter."""
    if not momentum:
        return 0
    from sparsefedpp.runtime.sparsity import static_pattern

    nbytes = 0
    for p in model.params().values():
        layer = static_pattern.owner_of(p)  # after a step: the layers on a pattern
        pat = layer.pattern_for_step() if layer is not None else None
        nbytes += pat.flat.size * 4 if pat is not None else p.nbytes
    return nbytes


def grads_resident_mb(model) -> float:
    """MB the gradients occupy after a step: the weights' backed pages and pending
    values (a lazily-zero dense array costs only what was written), the rest whole."""
    from sparsefedpp.runtime.layers import WeightedLayer

    nbytes = 0
    for layer in model.named_layers().values():
        if isinstance(layer, WeightedLayer):
            nbytes += layer.grad_resident_bytes()
            nbytes += 0 if layer.grad_bias is None else layer.grad_bias.nbytes
        elif not layer.children():
            nbytes += sum(g.nbytes for g in layer.grads().values())
    return round(nbytes / 2**20, 2)


def ours(args, phases: dict, out: dict) -> None:
    import numba  # noqa: F401
    phases["framework"] = rss_mb()
    from sparsefedpp.runtime import accounting, models
    from sparsefedpp.runtime.sparsity import pruning
    from sparsefedpp.tools.kernel_cache import process_age, report
    from sparsefedpp.trainer.data import load_npz
    from sparsefedpp.trainer.local_round import LocalConfig, local_round
    from sparsefedpp.trainer.methods import MethodConfig
    phases["kernels"] = rss_mb()
    import numpy as np

    data = load_npz(args.data)
    phases["data"] = rss_mb()
    spec = dict(num_classes=len(data.classes), width=args.width,
                in_channels=data.images.shape[1], alpha=1.25)
    if args.global_model:
        # the device agent's path (trainer/device_agent.py): no random init, the
        # weights come from the decoded global model
        from sparsefedpp.runtime.wire import codec

        model = models.build(args.model, **spec, init=False)
        with open(args.global_model, "rb") as f:
            msg = codec.decode(f.read(), like={**model.params(), **model.buffers()},
                               exact=True)
        model.load_state_dict(msg.tensors)
        del msg
    else:
        model = models.build(args.model, **spec, seed=0)
        if args.sparsity:
            pruning.prune(model, args.sparsity, "global")
    phases["weights"] = rss_mb()
    method = MethodConfig("sparsefedpp", args.sparsity) if args.sparsity else \
        MethodConfig("fedavg")
    local = LocalConfig(batch_size=args.batch_size, recompute=args.recompute)
    out.update(weights_mb=_mb(model.params().values()),
               grads_mb=_mb(model.grads().values()),
               momentum=local.momentum,
               weight_sparsity=pruning.global_sparsity(model))
    start = time.perf_counter()
    local_round(model, data.subset(np.arange(min(args.batch_size, len(data)))),
                method, local, lr=LR, seed=0)
    out["first_step_s"] = time.perf_counter() - start
    out["first_step_process_s"] = process_age()
    out["held_mb"] = round(accounting.cost_report(model).totals["held_bytes"] / 2**20, 2)
    out["optimizer_mb"] = round(optimizer_bytes(model, local.momentum) / 2**20, 2)
    out["grads_resident_mb"] = grads_resident_mb(model)
    phases["first_step"] = rss_mb()
    update = local_round(model, data, method, local, lr=LR, seed=0)
    out["round_s"] = update.metrics["train_seconds"]
    out["round_loss"] = update.metrics["loss"]
    phases["round"] = rss_mb()
    cache = report()
    out.update(compiled=cache.compiled, loaded_from_cache=cache.loaded,
               cache_dir=cache.cache_dir)


def torch_side(args, phases: dict, out: dict) -> None:
    import torch

    torch.set_num_threads(args.threads)
    phases["framework"] = rss_mb()
    phases["kernels"] = phases["framework"]
    import numpy as np
    from sparsefedpp.tools.bench import torch_models as bench_torch

    with np.load(args.data) as f:
        images, labels = f["x_train"], f["y_train"].astype(np.int64)
    phases["data"] = rss_mb()
    torch.manual_seed(0)
    model = bench_torch.build(args.model, width=args.width,
                              in_channels=images.shape[1])
    opt = torch.optim.SGD(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    phases["weights"] = rss_mb()
    out.update(weights_mb=_mb(p.detach().numpy() for p in model.parameters()),
               grads_mb=None, optimizer_mb=0.0, momentum=0.0)
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
    start = time.perf_counter()
    step(np.arange(min(args.batch_size, len(labels))))
    out["first_step_s"] = time.perf_counter() - start
    phases["first_step"] = rss_mb()
    start = time.perf_counter()
    order = np.random.default_rng(0).permutation(len(labels))
    for i in range(0, len(order), args.batch_size):
        step(order[i:i + args.batch_size])
    out["round_s"] = time.perf_counter() - start
    phases["round"] = rss_mb()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsefedpp.tools.bench.memory_worker")
    p.add_argument("--framework", required=True, choices=("ours", "torch"))
    p.add_argument("--data", required=True, help="the shard (.npz)")
    p.add_argument("--model", default="resnet8", choices=("resnet8", "resnet18"))
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sparsity", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--global-model", default=None, metavar="FILE",
                   help="ours: the encoded global model (a codec 'model' message) to "
                   "load, as a device does; without it the model is built with its "
                   "random initialisation and pruned here")
    p.add_argument("--recompute", action="store_true",
                   help="ours: recompute block activations in backward (client "
                   "--recompute)")
    args = p.parse_args(argv)
    phases = {"interpreter": rss_mb()}
    import numpy  # noqa: F401
    phases["numpy"] = rss_mb()
    out: dict = {}
    (ours if args.framework == "ours" else torch_side)(args, phases, out)
    record = {"ok": True, "framework": args.framework, "model": args.model,
              "width": args.width, "batch_size": args.batch_size,
              "sparsity": args.sparsity, "recompute": args.recompute,
              "phases_mb": phases,
              "peak_mb": rss_mb("VmHWM"), **out}
    sys.stdout.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
