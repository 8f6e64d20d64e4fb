"""``sparsefedpp bench-memory``: RSS of training ResNet-8 on a device, phase by phase,
beside PyTorch in its own process.

Each configuration (framework, batch size, sparsity) runs in a fresh
``bench_memory_worker`` process on a shard of 1000 uint8 CIFAR-sized images
(random pixels: memory does not depend on their values), which trains one
local round the way the device agent does. Target (issue 8): a peak under 200
MB for ResNet-8 training.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .cmd_train import add_common
from .metrics import MetricsWriter
from .progress import say

PHASES = ("interpreter", "numpy", "framework", "kernels", "data", "model", "first_step",
          "round")
TARGET_MB = 200.0


def add_parser(sub) -> None:
    p = sub.add_parser("bench-memory", help="RSS per phase of a device's ResNet-8 "
                       "training round, vs PyTorch",
                       description="Peak and per-phase RSS of one local round of "
                       "ResNet-8 (batch 16/32, dense and 99 %% sparse) in fresh "
                       "processes, with PyTorch's dense round beside it.")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.99])
    p.add_argument("--examples", type=int, default=1000)
    p.add_argument("--no-torch", action="store_true")
    add_common(p)
    p.set_defaults(run=run)


def write_shard(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    np.savez(path, x_train=rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
             y_train=rng.integers(0, 10, n), x_test=np.zeros((0, 3, 32, 32), np.uint8),
             y_test=np.zeros(0, np.int64), classes=np.array([str(i) for i in range(10)]))


def measure(framework: str, shard: Path, batch: int, sparsity: float) -> dict:
    cmd = [sys.executable, "-m", "sparsefedpp.tools.bench_memory_worker",
           "--framework", framework, "--data", str(shard), "--batch-size", str(batch),
           "--sparsity", str(sparsity)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if out.returncode != 0:
        tail = "\n".join(out.stderr.strip().splitlines()[-5:])
        return {"ok": False, "framework": framework, "batch_size": batch,
                "sparsity": sparsity, "error": f"exit {out.returncode}: {tail}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    head = ["framework", "batch", "sparsity", *PHASES, "peak"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['framework']} | {r['batch_size']} | {r['sparsity']:g} | "
                         f"error: {r['error'][:80]} |")
            continue
        ph = r["phases_mb"]
        lines.append("| " + " | ".join([r["framework"], str(r["batch_size"]),
                                         f"{r['sparsity']:g}"] +
                                        [f"{ph[p]:.0f}" for p in PHASES] +
                                        [f"**{r['peak_mb']:.0f}**"]) + " |")
    return "\n".join(lines)


def run(args) -> int:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, MetricsWriter(args.metrics) as metrics:
        shard = Path(tmp) / "shard.npz"
        write_shard(shard, args.examples, args.seed)
        configs = [("ours", b, s) for b in args.batch_sizes for s in args.sparsities]
        if not args.no_torch:
            configs += [("torch", b, 0.0) for b in args.batch_sizes]
        for fw, b, s in configs:
            say(f"bench-memory: {fw} batch {b} sparsity {s:g} ...", quiet=args.quiet)
            r = measure(fw, shard, b, s)
            rows.append(r)
            metrics.write("memory", **r)
    print(table(rows))
    ours = [r["peak_mb"] for r in rows if r["ok"] and r["framework"] == "ours"]
    torch = [r["peak_mb"] for r in rows if r["ok"] and r["framework"] == "torch"]
    if ours:
        print(f"\nours: largest peak {max(ours):.0f} MB (target < {TARGET_MB:.0f} MB: "
              f"{'met' if max(ours) < TARGET_MB else 'MISSED'})"
              + (f"; PyTorch {min(torch):.0f}-{max(torch):.0f} MB" if torch else ""))
    print("phases (MB of RSS after each): interpreter; numpy imported; numba (torch) "
          "imported; the engine and its kernels loaded; the shard loaded (uint8); "
          "ResNet-8 built; one train step; one local round over the shard; peak = "
          "VmHWM")
    return 0 if all(r["ok"] for r in rows) else 1
