"""The numbers behind the codec's decode limits (runtime/wire/codec.py, issue 14).

Usage:  python tools/bench/codec_limits.py ratios [--models cnn,resnet8,resnet18]
            [--sparsities 0,0.9,0.99,0.999] [--train-steps 3]
        python tools/bench/codec_limits.py bombs

``ratios``: for every preset of ``codec.ENCODINGS``, every model and global
sparsity (magnitude pruning, alpha=1.25, seed 0) and three states of the net --
fresh (BatchNorm weight 1, bias 0, mean 0, var 1: nearly free for zlib/xz),
``sim`` (the BatchNorm and counters of a trained net, as tools/bench/codec.py
--bn trained) and ``trained`` (``--train-steps`` real SGD steps on random images,
batch 8, so BatchNorm statistics and weights really move) -- it prints the raw
body, the stored body, raw / stored (what ``max_ratio`` bounds), the worst
running ratio while inflating in the decoder's pieces, and the wire size against
``codec.max_encoded_size``. The worst preset line is printed last. Two custom
encodings that no preset offers (dense layout, then zlib or xz) are printed for
comparison: a pruned net laid out dense is mostly zeros and compresses far more.

``bombs``: time and peak memory (tracemalloc, and the process's peak RSS) of
decoding the issue's bomb (78 KB of xz declaring 2**27 float32 elements) and of
bombs whose table matches the model, without ``like`` and with a ResNet-8 and a
ResNet-18 spec. Each case runs in a fresh process so the RSS figures are its own.
"""

from __future__ import annotations

import argparse
import json
import lzma
import resource
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib

import numpy as np
from sparsefedpp.runtime import models
from sparsefedpp.runtime.errors import CodecError
from sparsefedpp.runtime.sparsity import pruning
from sparsefedpp.runtime.wire import codec

PIECE_IN = codec.INFLATE_INPUT_PIECE
# not presets (a device sends a preset named by the round), for comparison only
CUSTOM = {"dense-zlib": codec.Encoding(sparse="dense", compress="zlib"),
          "dense-lzma": codec.Encoding(sparse="dense", compress="lzma")}


# ------------------------------------------------------------------ ratios
def state(name: str, sparsity: float, kind: str, steps: int) -> dict[str, np.ndarray]:
    model = models.build(name, alpha=1.25, seed=0)
    if kind == "trained":
        from sparsefedpp.runtime.losses import softmax_cross_entropy
        from sparsefedpp.runtime.optim import SGD
        rng = np.random.default_rng(0)
        opt = SGD(model.params(), model.grads(), 0.05, momentum=0.9, weight_decay=5e-4)
        for _ in range(steps):
            x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
            y = rng.integers(0, 10, 8)
            model.zero_grad()
            _, grad = softmax_cross_entropy(model.forward(x, train=True), y)
            model.backward(grad)
            opt.step()
    pruning.prune(model, sparsity)
    tensors = {k: np.array(v) for k, v in model.state_dict().items()}
    if kind == "sim":
        rng = np.random.default_rng(1)
        for key, arr in tensors.items():
            if arr.dtype == np.int64:
                arr[...] = 3910
            elif arr.ndim == 1:
                loc, scale = (1.0, 0.1) if key.endswith(".weight") else (0.0, 0.3)
                arr[:] = rng.normal(loc, scale, arr.shape)
                if key.endswith("running_var"):
                    arr[:] = np.abs(arr) + 0.05
    return tensors


def worst_running_ratio(stream: bytes, code: int) -> float:
    """max over the decoder's input pieces of output so far / input fed so far."""
    dec = zlib.decompressobj() if code == 1 else lzma.LZMADecompressor()
    out = fed = 0
    worst = 0.0
    for start in range(0, len(stream), PIECE_IN):
        piece = stream[start:start + PIECE_IN]
        fed += len(piece)
        out += len(dec.decompress(piece))
        worst = max(worst, out / fed)
    return worst


def ratios(args) -> int:
    print("| model | sparsity | state | preset | wire bytes | raw body | stored body "
          "| raw/stored | worst running | wire / max_encoded_size(preset) |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|")
    worst = (0.0, "")
    for name in args.models.split(","):
        for sparsity in map(float, args.sparsities.split(",")):
            for kind in ("fresh", "sim", "trained"):
                tensors = state(name, sparsity, kind, args.train_steps)
                spec = codec.model_spec(tensors)
                msg = codec.Message("update", 1, "bench", "sparsefedpp", tensors, 50000,
                                    {"loss": 2.302585, "accuracy": 0.1})
                for preset in [*codec.ENCODINGS, *CUSTOM]:
                    data = codec.encode(msg, CUSTOM.get(preset, preset))
                    code, raw, stored = codec._body_sizes(data)
                    ratio = raw / stored
                    running = worst_running_ratio(
                        data[len(data) - 4 - stored:len(data) - 4], code) if code else 1.0
                    bound = codec.max_encoded_size(spec, CUSTOM.get(preset, preset))
                    assert len(data) <= bound <= codec.max_encoded_size(spec)
                    line = (f"| {name} | {sparsity:g} | {kind} | {preset} | {len(data):,} "
                            f"| {raw:,} | {stored:,} | {ratio:.2f} | {running:.2f} "
                            f"| {len(data) / bound:.3f} |")
                    print(line, flush=True)
                    if preset not in CUSTOM:
                        worst = max(worst, (max(ratio, running), line))
    print(f"\nworst preset: {worst[1]}")
    return 0


# ------------------------------------------------------------------ bombs
def frame(entries: list[bytes], code: int, stream: bytes) -> bytes:
    out = struct.pack("<4sHBBIQ", b"SFPP", 1, 0, 1, 0, 10) + b"\x04dev1\x04topk"
    out += struct.pack("<I", 2) + b"{}" + struct.pack("<I", len(entries))
    out += b"".join(entries) + struct.pack("<BQ", code, len(stream)) + stream
    return out + struct.pack("<I", zlib.crc32(out))


def dense_entry(name: str, dtype: np.dtype, shape: tuple) -> bytes:
    raw = name.encode()
    size = int(np.prod(shape, dtype=np.int64))
    dcode, vcode, item = (1, 1, 4) if dtype == np.float32 else (2, 3, 8)
    return (bytes([len(raw)]) + raw + struct.pack("<BB", dcode, len(shape))
            + struct.pack(f"<{len(shape)}I", *shape)
            + struct.pack("<BBBBIQ", 0, 0, 0, vcode, size, size * item))


def zeros_stream(n: int, code: int) -> bytes:
    """A stream inflating to n zero bytes, compressed in 64 MiB steps."""
    step = bytes(min(n, 64 << 20))
    if code == 1:
        enc = zlib.compressobj(9)
    else:
        enc = lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE)
    parts, left = [], n
    while left:
        parts.append(enc.compress(step[:min(left, len(step))]))
        left -= min(left, len(step))
    return b"".join(parts) + enc.flush()


def bomb(case: str) -> bytes:
    """The bombs of the report; ``issue-*`` is issue 14's (one 2**27 tensor)."""
    code = 1 if case.endswith("zlib") else 2
    if case.startswith("issue"):
        n = 2**27
        stream = zeros_stream(4 * n, code)  # xz: 78 KB; zlib: ~500 KB, cut to 78 KB
        stream = stream[:78_000] if code == 1 else stream
        return frame([dense_entry("x", np.float32, (n,))], code, stream)
    name = case.split("-")[1]  # matched-resnet18-xz: the model's own table, dense
    spec = codec.model_spec(models.build(name, seed=0).state_dict())
    entries = [dense_entry(k, dt, shp) for k, (dt, shp) in spec.items()]
    raw = sum(int(np.prod(shp, dtype=np.int64)) * dt.itemsize for dt, shp in spec.values())
    return frame(entries, code, zeros_stream(raw, code))


def one_bomb(case: str, like_name: str) -> dict:
    data = bomb(case)
    like = None if like_name == "none" else codec.model_spec(
        models.build(like_name, seed=0).state_dict())
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    start = time.perf_counter()
    try:
        codec.decode(data, like=like, exact=like is not None)
        result = "accepted"
    except CodecError as err:
        result = f"CodecError: {err}"
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"case": case, "like": like_name, "bytes": len(data), "ms": 1e3 * elapsed,
            "peak_mb": peak / 2**20, "rss_mb": (rss0 / 1024, rss1 / 1024),
            "result": result}


def bombs(args) -> int:
    print("| bomb | bytes | like | decode ms | tracemalloc peak MB | peak RSS MB "
          "| result |")
    print("|---|---:|---|---:|---:|---|---|")
    for case in ("issue-xz", "issue-zlib", "matched-resnet8-xz", "matched-resnet18-xz",
                 "matched-resnet18-zlib"):
        for like in ("none", "resnet8", "resnet18"):
            out = subprocess.run([sys.executable, __file__, "one-bomb", case, like],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out)
            print(f"| {case} | {r['bytes']:,} | {like} | {r['ms']:.1f} "
                  f"| {r['peak_mb']:.2f} | {r['rss_mb'][0]:.0f} -> {r['rss_mb'][1]:.0f} "
                  f"| {r['result'][:110]} |", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ratios")
    p.add_argument("--models", default="cnn,resnet8,resnet18")
    p.add_argument("--sparsities", default="0,0.9,0.99,0.999")
    p.add_argument("--train-steps", type=int, default=3)
    sub.add_parser("bombs")
    p = sub.add_parser("one-bomb")
    p.add_argument("case")
    p.add_argument("like")
    args = parser.parse_args(argv)
    if args.cmd == "one-bomb":
        print(json.dumps(one_bomb(args.case, args.like)))
        return 0
    return ratios(args) if args.cmd == "ratios" else bombs(args)


if __name__ == "__main__":
    sys.exit(main())
