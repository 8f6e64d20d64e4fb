"""Bytes on the wire per codec preset for pruned ResNet state dicts (runtime/wire/codec.py).

Usage:  python tools/bench/codec.py [--models resnet8,resnet18]
            [--sparsities 0,0.9,0.99,0.999] [--presets dense,csr32,...]
            [--bn init|trained] [--reps 1]

For each model and global sparsity (magnitude pruning, alpha=1.25, seed 0) it
encodes the whole state dict (BatchNorm and int64 buffers included) with every
preset and prints: bytes, the ratio to the "dense" preset (float32 values plus the
int64 buffers plus the header), and the best-of-``reps`` encode / decode times.
``floor`` is the size of the message holding only the tensors that always travel
dense (BatchNorm, biases, counters) under the same preset: no weight encoding can
beat dense / floor. ``--bn trained`` replaces the freshly initialised BatchNorm
tensors (weight 1, bias 0, mean 0, var 1: nearly free for zlib/lzma) with random
values of a trained net, which is what a real round sends.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from sparsefedpp.runtime import models
from sparsefedpp.runtime.sparsity import pruning
from sparsefedpp.runtime.wire import codec


def state(name: str, sparsity: float, bn: str) -> dict[str, np.ndarray]:
    """The pruned state dict of ``name`` (copies), BatchNorm as ``bn`` says."""
    model = models.build(name, alpha=1.25, seed=0)
    pruning.prune(model, sparsity)
    tensors = {k: np.array(v) for k, v in model.state_dict().items()}
    if bn == "trained":
        rng = np.random.default_rng(1)
        for key, arr in tensors.items():
            if arr.dtype == np.int64:
                arr[...] = 3910  # 20 epochs of CIFAR-10 at batch 256
            elif arr.ndim == 1:
                loc, scale = (1.0, 0.1) if key.endswith(".weight") else (0.0, 0.3)
                arr[:] = rng.normal(loc, scale, arr.shape)
                if key.endswith("running_var"):
                    arr[:] = np.abs(arr) + 0.05
    return tensors


def timed(fn, reps: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def bench(name: str, sparsity: float, presets: list[str], args) -> list[dict]:
    tensors = state(name, sparsity, args.bn)
    msg = codec.Message("update", 1, "bench", "sparsefedpp", tensors, 50000)
    dense_only = {k: v for k, v in tensors.items() if v.ndim < 2 or v.dtype == np.int64}
    floor_msg = codec.Message("update", 1, "bench", "sparsefedpp", dense_only, 50000)
    dense_bytes = codec.encoded_size(msg, "dense")
    rows = []
    for preset in presets:
        enc_s, data = timed(lambda p=preset: codec.encode(msg, p), args.reps)
        dec_s, back = timed(lambda d=data: codec.decode(d), args.reps)
        if "f16" not in preset:  # exact presets must give the same tensors back
            assert all(np.array_equal(back.tensors[k], v) for k, v in tensors.items())
        rows.append({"model": name, "sparsity": sparsity, "preset": preset,
                     "bytes": len(data), "ratio": dense_bytes / len(data),
                     "floor": codec.encoded_size(floor_msg, preset),
                     "encode_ms": 1e3 * enc_s, "decode_ms": 1e3 * dec_s})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet8,resnet18")
    parser.add_argument("--sparsities", default="0,0.9,0.99,0.999")
    parser.add_argument("--presets", default=",".join(codec.ENCODINGS))
    parser.add_argument("--bn", choices=("init", "trained"), default="init")
    parser.add_argument("--reps", type=int, default=1)
    args = parser.parse_args(argv)
    presets = args.presets.split(",")
    print(f"| model | sparsity | preset | bytes | x vs dense f32 | floor (x cap) "
          f"| encode ms | decode ms |   (BatchNorm: {args.bn})")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        for sparsity in map(float, args.sparsities.split(",")):
            rows = bench(name, sparsity, presets, args)
            dense = rows[0]["bytes"] / rows[0]["ratio"]
            for r in rows:
                print(f"| {r['model']} | {r['sparsity']:g} | {r['preset']} "
                      f"| {r['bytes']:,} | {r['ratio']:.1f} | {r['floor']:,} "
                      f"({dense / r['floor']:.0f}x) | {r['encode_ms']:.1f} "
                      f"| {r['decode_ms']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
