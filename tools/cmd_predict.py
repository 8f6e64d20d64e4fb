"""``sparsefedpp predict``: classify a dataset split with the engine or onnxruntime.

The same checkpoint can run on the engine's dense kernels, its CSR kernels, or on
onnxruntime (exported in memory); an exported .onnx file runs on onnxruntime. The
accuracy and predictions of the runs can then be compared.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numba
import numpy as np
from sparsefedpp.runtime import checkpoint, inference
from sparsefedpp.runtime.errors import CheckpointError, ConfigError
from sparsefedpp.runtime.sparsity import pruning
from sparsefedpp.trainer.data import Dataset, batches, load_dataset

from .flags import add_common, onnx_exporter
from .metrics import MetricsWriter
from .progress import say

ENGINES = ("dense", "csr", "onnxruntime")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "predict", help="classify a dataset split with the engine or onnxruntime",
        description="Run a checkpoint on the engine (dense or CSR kernels) or on "
        "onnxruntime, or an exported .onnx file on onnxruntime; prints the accuracy "
        "(and with --json every prediction) so that engines can be compared.")
    p.add_argument("model", metavar="CHECKPOINT_OR_ONNX",
                   help="a model.npz checkpoint or a .onnx file written by export")
    p.add_argument("--data", required=True, help="the dataset (as for train)")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--limit", type=int, default=None,
                   help="classify the first N examples only")
    p.add_argument("--engine", choices=ENGINES, default=None,
                   help="default: dense for a checkpoint, onnxruntime for .onnx")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None,
                   help="compute threads (Numba / onnxruntime intra-op; default: "
                   "Numba's thread count)")
    p.add_argument("--json", action="store_true",
                   help="print accuracy and the predicted class of every image as JSON")
    p.add_argument("--save-logits", default=None, metavar="PATH.npy",
                   help="also save the logits (N, num_classes) float32")
    add_common(p)
    p.set_defaults(run=run)


@dataclass
class Predictor:
    """A model ready to classify: ``forward(x (N, C, H, W) f4) -> logits (N, K) f4``."""

    engine: str
    in_channels: int
    num_classes: int
    meta: dict
    forward: Callable[[np.ndarray], np.ndarray]


def ort_session(model, threads: int):
    """An onnxruntime CPU session with explicit thread counts and no spinning.

    ``model`` is a path or serialised bytes. Idle intra-op threads otherwise spin
    and keep small boards' cores near 100 % (DESIGN.md, "ONNX").
    """
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ConfigError(f"engine onnxruntime: expected the onnxruntime package, got "
                          f"ImportError ({err}); pip install onnxruntime") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    what = model if isinstance(model, (str, Path)) else "exported model"
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model),
                                    options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types
        raise CheckpointError(f"ONNX model {what}: expected a model onnxruntime can "
                              f"load, got {type(err).__name__}: {str(err)[:300]}") from None


def _session_predictor(session, meta: dict) -> Predictor:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or len(outputs[0].shape) != 2:
        raise CheckpointError(
            "ONNX model: expected one input (N, C, H, W) and logits (N, K), got "
            f"{[(i.name, i.shape) for i in inputs]} -> "
            f"{[(o.name, o.shape) for o in outputs]}")
    name = inputs[0].name
    channels, classes = inputs[0].shape[1], outputs[0].shape[1]
    if not (isinstance(channels, int) and isinstance(classes, int)):
        raise CheckpointError(f"ONNX model: expected fixed channel and class counts, "
                              f"got input {inputs[0].shape}, output {outputs[0].shape}")
    return Predictor("onnxruntime", channels, classes, meta,
                     lambda x: session.run(None, {name: x})[0])


def _onnx_meta(session) -> dict:
    """Checkpoint-style meta from an exported file's metadata_props."""
    props = session.get_modelmeta().custom_metadata_map
    meta = {}
    for key in ("mean", "std", "classes"):
        if key in props:
            try:
                meta[key] = json.loads(props[key])
            except json.JSONDecodeError:
                raise CheckpointError(f"ONNX metadata '{key}': expected a JSON list, "
                                      f"got {props[key][:80]!r}") from None
    return meta


def load_predictor(path, engine: str | None, threads: int) -> Predictor:
    """A checkpoint or .onnx file, ready to run on ``engine`` (None: its default)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"predict model {path}: expected a checkpoint or .onnx "
                              "file, got nothing there")
    if path.suffix.lower() == ".onnx":
        if engine not in (None, "onnxruntime"):
            raise ConfigError(f"predict --engine: expected onnxruntime for an .onnx "
                              f"file, got {engine}; pass the checkpoint to run the engine")
        session = ort_session(path, threads)
        return _session_predictor(session, _onnx_meta(session))
    model, meta = checkpoint.load(path)
    engine = engine or "dense"
    if engine == "onnxruntime":
        proto, _ = onnx_exporter().build_onnx(model, meta)
        return _session_predictor(ort_session(proto.SerializeToString(), threads), meta)
    for layer in pruning.prunable_layers(model).values():
        layer.kernel = engine  # "dense" or "csr": the layer's forward kernel
    inference.freeze(model)  # weights built once, BatchNorm folded into the convs
    return Predictor(engine, model.in_channels, model.num_classes, meta,
                     lambda x: model.forward(x, train=False))


def _prepare(data: Dataset, pred: Predictor) -> Dataset:
    """Check the dataset fits the model and use the model's normalisation if known."""
    if data.images.shape[1] != pred.in_channels or len(data.classes) != pred.num_classes:
        raise ConfigError(
            f"predict: expected a dataset with {pred.in_channels} channels and "
            f"{pred.num_classes} classes for this model, got {data.images.shape[1]} "
            f"and {len(data.classes)} ({data.name})")
    if "mean" not in pred.meta:
        return data
    mean, std = tuple(pred.meta["mean"]), tuple(pred.meta.get("std", ()))
    if len(mean) != pred.in_channels or len(std) != pred.in_channels:
        raise CheckpointError(f"model meta mean/std: expected {pred.in_channels} values "
                              f"each, got {len(mean)} and {len(std)}")
    return replace(data, mean=mean, std=std)  # normalise exactly as in training


def _threads(requested: int | None) -> int:
    most = numba.config.NUMBA_NUM_THREADS
    threads = numba.get_num_threads() if requested is None else requested
    if not 1 <= threads <= most:
        raise ConfigError(f"predict --threads: expected 1..{most} (NUMBA_NUM_THREADS), "
                          f"got {threads}")
    numba.set_num_threads(threads)
    return threads


def predict(pred: Predictor, data: Dataset, batch_size: int) -> tuple[np.ndarray, float]:
    """Logits (N, K) float32 of every image, and the seconds the forwards took."""
    logits = np.empty((len(data), pred.num_classes), np.float32)
    seconds, start = 0.0, 0
    for x, _ in batches(data, batch_size, seed=0, shuffle=False):
        t = time.perf_counter()
        logits[start:start + len(x)] = pred.forward(x)
        seconds += time.perf_counter() - t
        start += len(x)
    return logits, seconds


def run(args) -> int:
    threads = _threads(args.threads)
    pred = load_predictor(args.model, args.engine, threads)
    data = load_dataset(args.data, args.split)
    if args.limit is not None:
        if args.limit < 1:
            raise ConfigError(f"predict --limit: expected >= 1, got {args.limit}")
        data = data.subset(np.arange(min(args.limit, len(data))))
    data = _prepare(data, pred)
    logits, seconds = predict(pred, data, args.batch_size)
    labels = logits.argmax(axis=1)
    accuracy = float((labels == data.labels).mean())
    result = {"model": str(args.model), "engine": pred.engine, "threads": threads,
              "dataset": data.name, "split": args.split, "accuracy": accuracy,
              "num_examples": len(data), "seconds": round(seconds, 4)}
    if args.save_logits:
        os.makedirs(Path(args.save_logits).resolve().parent, exist_ok=True)
        np.save(args.save_logits, logits)
    with MetricsWriter(args.metrics) as metrics:
        metrics.write("predict", **result)
    if args.json:
        print(json.dumps({**result, "predictions": labels.tolist()}))
    else:
        say(f"{data.name} {args.split} on {pred.engine}: accuracy {accuracy:.4f} "
            f"({len(data)} images, {seconds:.2f} s)", quiet=args.quiet)
    return 0
