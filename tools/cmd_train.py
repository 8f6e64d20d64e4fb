"""``sparsefedpp train``: central (non-federated) training with per-epoch evaluation."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from sparsefedpp.runtime import checkpoint, models
from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.trainer.data import Dataset, load_dataset
from sparsefedpp.trainer.local import (
    TrainConfig,
    evaluate,
    make_optimizer,
    train_epochs,
)

from .flags import add_common
from .metrics import MetricsWriter
from .progress import ProgressBar, say


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model centrally on a dataset",
                       description="Train a model on one dataset, evaluating on its "
                       "test split after every epoch; writes a checkpoint and "
                       "JSON-lines metrics.")
    p.add_argument("--model", default="resnet8", choices=models.NAMES)
    p.add_argument("--data", required=True,
                   help="CIFAR-10 python folder, (Fashion-)MNIST IDX folder, .npz "
                   "file, or 'fashion-mnist' (Debian's dataset-fashion-mnist)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--lr-end", type=float, default=0.001)
    p.add_argument("--schedule", default="cosine",
                   choices=("constant", "step", "cosine", "exponential"))
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--no-augment", action="store_true",
                   help="no random crop + flip (they are on by default)")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier")
    p.add_argument("--alpha", type=float, default=1.0, help="Powerprop exponent")
    p.add_argument("--limit", type=int, default=None,
                   help="train on the first N examples only (quick runs)")
    p.add_argument("--test-limit", type=int, default=None,
                   help="evaluate on the first N test examples only")
    p.add_argument("--out", default="runs/train",
                   help="output folder for model.npz and metrics.jsonl")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/model.npz if it exists")
    add_common(p)
    p.set_defaults(run=run)


def _limit(data: Dataset, n: int | None) -> Dataset:
    if n is None:
        return data
    if n < 1:
        raise ConfigError(f"--limit: expected a positive count, got {n}")
    return data.subset(np.arange(min(n, len(data))))


def run(args) -> int:
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         lr_end=args.lr_end, schedule=args.schedule,
                         momentum=args.momentum, nesterov=args.nesterov,
                         weight_decay=args.weight_decay, augment=not args.no_augment,
                         seed=args.seed)
    train = _limit(load_dataset(args.data, "train"), args.limit)
    test = _limit(load_dataset(args.data, "test"), args.test_limit)
    out = Path(args.out)
    ckpt = out / "model.npz"
    model = models.build(args.model, num_classes=len(train.classes),
                         width=args.width, alpha=args.alpha,
                         in_channels=train.images.shape[1], seed=args.seed)
    opt = make_optimizer(model, config)
    start_epoch = 0
    if args.resume and ckpt.exists():
        _, meta = checkpoint.load(ckpt, model, opt)
        start_epoch = int(meta.get("epoch", 0))
        say(f"resumed from {ckpt} at epoch {start_epoch}", quiet=args.quiet)
    metrics_path = args.metrics if args.metrics is not None else out / "metrics.jsonl"
    say(f"{args.model} ({sum(v.size for v in model.params().values()):,} parameters)"
        f" on {train.name}: {len(train):,} train / {len(test):,} test images, "
        f"{config.epochs} epochs, batch {config.batch_size}", quiet=args.quiet)
    with MetricsWriter(metrics_path) as metrics:
        metrics.write("start", command="train", model=args.model, dataset=train.name,
                      num_train=len(train), num_test=len(test), **vars(config))
        start = time.perf_counter()
        for result in _epochs(model, train, config, opt, start_epoch, args.quiet):
            scores = evaluate(model, test)
            elapsed = time.perf_counter() - start
            say(f"epoch {result.epoch}/{config.epochs}  loss {result.loss:.4f}  "
                f"train acc {result.accuracy:.4f}  test loss {scores['loss']:.4f}  "
                f"test acc {scores['accuracy']:.4f}  lr {result.lr:.4g}  "
                f"{result.seconds:.1f}s", quiet=args.quiet)
            metrics.write("epoch", epoch=result.epoch, train_loss=result.loss,
                          train_accuracy=result.accuracy, test_loss=scores["loss"],
                          test_accuracy=scores["accuracy"], lr=result.lr,
                          epoch_seconds=result.seconds, elapsed_seconds=elapsed)
            checkpoint.save(ckpt, model, opt, meta=_meta(train, result.epoch, config))
        metrics.write("end", checkpoint=str(ckpt),
                      elapsed_seconds=time.perf_counter() - start)
    say(f"checkpoint: {ckpt}", quiet=args.quiet)
    return 0


def _epochs(model, train, config, opt, start_epoch, quiet):
    bar = ProgressBar("train", enabled=not quiet)
    try:
        yield from train_epochs(model, train, config, optimizer=opt,
                                start_epoch=start_epoch,
                                on_batch=lambda i, n, loss: bar.update(i, n, loss=loss))
    finally:
        bar.close()


def _meta(data: Dataset, epoch: int, config: TrainConfig) -> dict:
    return {"epoch": epoch, "dataset": data.name, "classes": list(data.classes),
            "mean": list(data.mean), "std": list(data.std), "method": "central",
            "train_config": vars(config)}
