"""``sparsefedpp bench-sparse``: the sparse engine against its dense self and PyTorch.

For each model and each sparsity S (weights of every conv/linear layer pruned to
S, the top 1 - S of their input activations kept for backward, Powerprop alpha
1.25), one ``bench_worker sparse`` process measures the train step, inference
with the automatically chosen kernels and with the dense ones, the cost report of
a step (bytes held for backward, weight bytes) and the peak RSS. PyTorch's dense
train step of the same architecture, in its own process, is the reference. The
table gives the ratios the issue's targets are stated in.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from sparsefedpp.runtime.errors import ConfigError

from .bench_procs import run_worker, worker_env
from .cmd_train import add_common
from .metrics import MetricsWriter
from .progress import say

MODELS = ("resnet8", "resnet18")
SPARSITIES = (0.0, 0.9, 0.95, 0.99, 0.999)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench-sparse", help="sparse train step/inference/memory vs dense and PyTorch",
        description="Time the train step and inference of ResNet-8/18 at several "
        "weight/activation sparsities against our dense engine and PyTorch's dense "
        "step, and report bytes held for backward, weight bytes (CSR vs dense) and "
        "peak RSS.")
    p.add_argument("--models", nargs="+", default=list(MODELS), metavar="MODEL")
    p.add_argument("--sparsity", nargs="+", type=float, default=list(SPARSITIES),
                   metavar="S", help="sparsities to measure (default 0 .9 .95 .99 .999)")
    p.add_argument("--alpha", type=float, default=1.25,
                   help="Powerprop exponent of the sparse runs (default 1.25)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--format", default="text", choices=("text", "markdown"))
    add_common(p)
    p.set_defaults(run=run)


def _check(args) -> None:
    for name in args.models:
        if name not in MODELS:
            raise ConfigError(f"--models: expected {' or '.join(MODELS)}, got {name!r}")
    for s in args.sparsity:
        if not 0.0 <= s < 1.0:
            raise ConfigError(f"--sparsity: expected fractions in [0, 1), got {s}")
    for flag, value in (("--batch-size", args.batch_size), ("--repeats", args.repeats),
                        ("--threads", args.threads)):
        if value < 1:
            raise ConfigError(f"{flag}: expected an integer >= 1, got {value}")


def _median(values) -> float:
    return float(np.median(values))


def run(args) -> int:
    _check(args)
    env, _ = worker_env(args.threads, force=True)
    common = ["--batch-size", str(args.batch_size), "--warmup", str(args.warmup),
              "--repeats", str(args.repeats), "--threads", str(args.threads),
              "--seed", str(args.seed)]
    rows, failed = [], []
    start = time.perf_counter()
    with MetricsWriter(args.metrics) as metrics:
        metrics.write("start", command="bench-sparse", models=args.models,
                      sparsity=args.sparsity, alpha=args.alpha,
                      batch_size=args.batch_size, threads=args.threads)
        for model in args.models:
            torch_ms = None
            if not args.no_torch:
                run_ = run_worker(f"torch speed {model}",
                                  ["speed", "--framework", "torch", "--model", model,
                                   *common], env=env, timeout=args.timeout)
                if run_.ok:
                    torch_ms = _median(run_.result["train_ms"])
                    metrics.write("worker", worker=f"torch speed {model}", **run_.result)
                    say(f"bench-sparse: torch {model}: {torch_ms:.1f} ms", quiet=args.quiet)
                elif not run_.unavailable:
                    failed.append(run_)
            dense = None
            for s in args.sparsity:
                name = f"ours sparse {model} S={s:g}"
                run_ = run_worker(name, ["sparse", "--framework", "ours", "--model", model,
                                         "--sparsity", str(s), "--alpha",
                                         str(args.alpha if s > 0 else 1.0), *common],
                                  env=env, timeout=args.timeout)
                if not run_.ok:
                    failed.append(run_)
                    say(f"bench-sparse: {name}: FAILED", quiet=args.quiet)
                    continue
                r = run_.result
                metrics.write("worker", worker=name, **r)
                row = _row(model, s, r, torch_ms)
                if s == 0:
                    dense = row
                row["vs_dense"] = (row["train_ms"] / dense["train_ms"]) if dense else None
                rows.append(row)
                metrics.write("bench", **row)
                say(f"bench-sparse: {name}: train {row['train_ms']:.1f} ms",
                    quiet=args.quiet)
        metrics.write("end", elapsed_seconds=time.perf_counter() - start,
                      num_errors=len(failed))
    out = sys.stderr if args.metrics == "-" else sys.stdout
    print(format_table(rows, args), file=out, flush=True)
    for f in failed:
        print(f"error: worker '{f.name}' failed: {f.error}", file=sys.stderr)
    return 1 if failed else 0


def _row(model: str, s: float, r: dict, torch_ms: float | None) -> dict:
    c = r["cost"]
    train = _median(r["train_ms"])
    return {
        "model": model, "sparsity": s, "train_ms": train,
        "vs_torch": train / torch_ms if torch_ms else None, "torch_ms": torch_ms,
        "held_ratio": c["conv_linear_held_bytes"] / c["conv_linear_dense_held_bytes"],
        "held_all_ratio": c["held_bytes"] / c["dense_held_bytes"],
        "held_mb": c["held_bytes"] / 2**20,
        "weight_ratio": c["weight_csr_bytes"] / c["weight_dense_bytes"],
        "weight_csr_kb": c["weight_csr_bytes"] / 1024,
        "infer_ms": _median(r["infer_ms"]), "infer_dense_ms": _median(r["infer_dense_ms"]),
        "peak_rss_mb": r["peak_rss_mb"],
    }


def format_table(rows: list[dict], args) -> str:
    """Markdown or fixed-width text, one line per (model, sparsity)."""
    def x(v):
        return "-" if v is None else f"{v:.3f}x"

    head = ["model", "S", "train ms", "vs dense", "vs torch dense", "held conv/fc",
            "held all", "peak RSS MB", "weights CSR/dense", "infer ms",
            "infer dense-kernel ms", "infer ratio"]
    lines = []
    for r in rows:
        lines.append([r["model"], f"{r['sparsity']:g}", f"{r['train_ms']:.1f}",
                      x(r["vs_dense"]), x(r["vs_torch"]), x(r["held_ratio"]),
                      x(r["held_all_ratio"]), f"{r['peak_rss_mb']:.0f}",
                      x(r["weight_ratio"]), f"{r['infer_ms']:.1f}",
                      f"{r['infer_dense_ms']:.1f}",
                      x(r["infer_ms"] / r["infer_dense_ms"])])
    note = (f"batch {args.batch_size}, {args.threads} threads, median of {args.repeats} "
            f"steps; sparse runs: Powerprop alpha {args.alpha}, every conv/linear "
            "pruned to S, top 1-S activations kept (threshold refresh every 10); "
            "'held' = bytes kept for backward vs the dense engine; 'infer ratio' = "
            "automatic kernels / dense kernels on the same sparse model")
    torch_ms = {r["model"]: r["torch_ms"] for r in rows if r["torch_ms"]}
    note2 = "torch dense train step: " + ", ".join(
        f"{m} {v:.1f} ms" for m, v in torch_ms.items()) if torch_ms else "torch: not run"
    if args.format == "markdown":
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
        return "\n".join([f"- {note}", f"- {note2}", "", *out])
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h)
              for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([note, note2, "", fmt.format(*head),
                      *(fmt.format(*c) for c in lines)])
