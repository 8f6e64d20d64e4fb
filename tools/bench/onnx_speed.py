"""Benchmark ONNX export: file sizes and inference latency, engine against onnxruntime.

Usage:  nice python tools/bench/onnx_speed.py [--models resnet8,resnet18] [--threads 2]
            [--reps 5] [--sparsity 0.99] [--scope global|layer] [--skip-sizes]
            [--skip-latency]

Sizes: the serialised ONNX model with dense initializers against sparse ones
(tools/onnx_export.py) at 0.9 / 0.99 / 0.999 global magnitude sparsity of a fresh
Powerprop (alpha 1.25) model.

Latency: one eval forward of a 32x32 RGB batch (1 and 32 images) at ``--sparsity``:
the engine with every conv/linear on its dense kernels, on its CSR kernels, and
onnxruntime on the dense-initializer file (intra-op threads = ``--threads``,
inter-op 1, no spinning), plus onnxruntime on the sparse-initializer file (it
densifies them at load, so this should equal the dense file). The five take
turns call by call (``timing.time_interleaved``), so a noisy neighbour slows
them alike: medians of ``--reps`` calls after one warm-up, and the ratio is
the median of frozen / onnxruntime over the turns. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy
from functools import partial

import numba
import numpy as np
from sparsefedpp.runtime import inference
from sparsefedpp.runtime.models import build
from sparsefedpp.runtime.sparsity import pruning
from sparsefedpp.tools.bench.timing import paired_ratio, time_interleaved
from sparsefedpp.tools.cmd_predict import ort_session
from sparsefedpp.tools.onnx_export import build_onnx

SPARSITIES = (0.9, 0.99, 0.999)


def _model(name: str, sparsity: float, scope: str):
    model = build(name, alpha=1.25, seed=0)
    if sparsity:
        pruning.prune(model, sparsity, scope=scope)
    return model


def sizes(names: list[str]) -> list[str]:
    rows = [("| model | sparsity | dense init (MB) | sparse init (MB) | ratio | "
             "sparse tensors | left dense |"), "|---|---|---|---|---|---|---|"]
    for name in names:
        for s in SPARSITIES:
            model = _model(name, s, "global")
            dense = len(build_onnx(model)[0].SerializeToString())
            proto, report = build_onnx(model, sparse_initializers=True)
            sparse = len(proto.SerializeToString())
            rows.append(f"| {name} | {s} | {dense / 1e6:.3f} | {sparse / 1e6:.3f} | "
                        f"{dense / sparse:.1f}x | {len(report.sparse)} | "
                        f"{len(report.dense_fallback)} |")
    return rows


def latency(names: list[str], sparsity: float, scope: str, threads: int,
            reps: int) -> list[str]:
    numba.set_num_threads(threads)
    rows = [("| model | batch | engine dense (ms) | engine CSR (ms) | engine CSR frozen "
             "(ms) | onnxruntime dense (ms) | onnxruntime sparse-init (ms) | CSR frozen / "
             "ort dense |"),
            "|---|---|---|---|---|---|---|---|"]
    for name in names:
        model = _model(name, sparsity, scope)
        dense = ort_session(build_onnx(model)[0].SerializeToString(), threads)
        sparse = ort_session(build_onnx(model, sparse_initializers=True)[0]
                             .SerializeToString(), threads)
        engines = {}
        for variant in ("dense", "csr", "frozen"):
            engines[variant] = copy.deepcopy(model)
            for layer in pruning.prunable_layers(engines[variant]).values():
                layer.kernel = "dense" if variant == "dense" else "csr"
        inference.freeze(engines["frozen"])  # CSR built once, BatchNorm/ReLU fused
        for batch in (1, 32):
            x = np.random.default_rng(batch).standard_normal(
                (batch, 3, 32, 32)).astype(np.float32)
            fns = {k: partial(m.forward, x, train=False) for k, m in engines.items()}
            fns["ort"] = partial(dense.run, None, {"input": x})
            fns["ort_sparse"] = partial(sparse.run, None, {"input": x})
            times = time_interleaved(fns, reps)
            ms = {k: float(np.median(v)) for k, v in times.items()}
            ratio = paired_ratio(times["frozen"], times["ort"])
            rows.append(f"| {name} {sparsity} ({scope}) | {batch} | {ms['dense']:.1f} | "
                        f"{ms['csr']:.1f} | {ms['frozen']:.1f} | {ms['ort']:.1f} | "
                        f"{ms['ort_sparse']:.1f} | {ratio:.2f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet8,resnet18")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--sparsity", type=float, default=0.99)
    p.add_argument("--scope", default="global", choices=pruning.SCOPES)
    p.add_argument("--skip-sizes", action="store_true")
    p.add_argument("--skip-latency", action="store_true")
    args = p.parse_args(argv)
    names = args.models.split(",")
    if not args.skip_sizes:
        print("\n".join(sizes(names)), flush=True)
        print()
    if not args.skip_latency:
        print("\n".join(latency(names, args.sparsity, args.scope, args.threads,
                                args.reps)), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
