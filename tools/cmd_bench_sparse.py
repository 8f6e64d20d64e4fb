"""``sparsefedpp bench-sparse``: train ms against density, ours beside PyTorch's dense step.

For each model, one persistent ``bench/worker.py sparse --serve`` process per
sparsity S (weights of every conv/linear layer pruned to S, the top 1 - S of their
input activations kept for backward, Powerprop alpha 1.25) and one persistent
PyTorch worker of the same architecture (dense) take turns of ``--block`` steps,
so every ratio is the median over turns of ours(S) / torch dense in the same
turn, with its spread. The table also gives each point's multiply-add share
(executed / dense MACs of one step, from ``runtime.accounting``), its time share
(our step at S over our dense step, paired in the same way) and how far the time is from
the MACs (time share / MAC share: 1 means the time follows the MACs), bytes
held for backward, weight bytes (CSR vs dense), inference with the automatic
kernels against the dense ones (in turns in the same worker) and peak RSS.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from sparsefedpp.runtime.errors import ConfigError

from .bench.procs import ServingWorker, WorkerFailed, worker_env
from .bench.report import SPARSE_TARGETS, format_ratio, paired_stats
from .flags import add_common
from .metrics import MetricsWriter
from .progress import say
from .bench.timing import take_turns, turn_ratios

MODELS = ("resnet8", "resnet18")
SPARSITIES = (0.0, 0.5, 0.9, 0.95, 0.99, 0.995, 0.999)
MAC_KEYS = ("macs_forward", "macs_grad_input", "macs_grad_weight")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench-sparse", help="sparse train step/inference/memory vs dense and PyTorch",
        description="Time the train step of ResNet-8/18 at several weight/activation "
        "sparsities in turns with PyTorch's dense step, beside each point's "
        "multiply-add share, and report inference (automatic vs dense kernels), "
        "bytes held for backward, weight bytes (CSR vs dense) and peak RSS.")
    p.add_argument("--models", nargs="+", default=list(MODELS), metavar="MODEL")
    p.add_argument("--sparsity", nargs="+", type=float, default=list(SPARSITIES),
                   metavar="S", help="sparsities to measure (default "
                   f"{' '.join(f'{s:g}' for s in SPARSITIES)})")
    p.add_argument("--alpha", type=float, default=1.25,
                   help="Powerprop exponent of the sparse runs (default 1.25)")
    p.add_argument("--width", type=float, default=1.0,
                   help="channel multiplier of both frameworks (default 1; smoke tests)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10,
                   help="timed steps per point and framework (default 10)")
    p.add_argument("--block", type=int, default=5,
                   help="steps per turn of each framework (default 5)")
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
                        ("--block", args.block), ("--threads", args.threads)):
        if value < 1:
            raise ConfigError(f"{flag}: expected an integer >= 1, got {value}")
    if not args.width > 0:
        raise ConfigError(f"--width: expected a multiplier > 0, got {args.width}")
    if args.warmup < 0:
        raise ConfigError(f"--warmup: expected an integer >= 0, got {args.warmup}")


def _median(values) -> float:
    return float(np.median(values))


def mac_share(cost: dict) -> float:
    """Executed over dense multiply-adds of one train step (forward, grad input,
    grad weight), from ``accounting.cost_report(model).totals``."""
    dense = sum(cost[f"dense_{k}"] for k in MAC_KEYS)
    return sum(cost[k] for k in MAC_KEYS) / dense if dense else float("nan")


class Run:
    """The workers of one ``bench-sparse`` run; failures are kept, not raised."""

    def __init__(self, args, metrics: MetricsWriter):
        self.args, self.metrics = args, metrics
        self.env, _ = worker_env(args.threads, force=True)
        self.common = ["--batch-size", str(args.batch_size), "--warmup",
                       str(args.warmup), "--repeats", str(args.repeats), "--threads",
                       str(args.threads), "--seed", str(args.seed), "--width",
                       str(args.width)]
        self.failed: list = []
        self.with_torch = not args.no_torch
        self.notes: list[str] = [] if self.with_torch else ["--no-torch: ours only"]

    def start(self, name: str, argv: list[str]) -> ServingWorker | None:
        worker = ServingWorker(name, argv, env=self.env, timeout=self.args.timeout)
        try:
            worker.ready()
        except WorkerFailed as err:
            self.fail(err)
            return None
        return worker

    def fail(self, err: WorkerFailed) -> None:
        if err.run.unavailable:
            self.with_torch = False
            self.notes.append(f"{err.run.unavailable}; ours only")
        else:
            self.failed.append(err.run)
            self.metrics.write("error", worker=err.run.name, message=err.run.error)
        say(f"bench-sparse: {err.run.name}: FAILED", quiet=self.args.quiet)

    def model(self, model: str) -> list[dict]:
        """All points of a model in turns: torch dense and ours at every S are
        persistent workers, each turn goes round all of them (order rotating), so
        ours(S) / torch and ours(S) / ours(0) are both paired within a turn."""
        a = self.args
        workers: dict[str, ServingWorker] = {}
        if self.with_torch:
            torch = self.start(f"torch speed {model}",
                               ["speed", "--framework", "torch", "--model", model,
                                *self.common])
            if torch is not None:
                workers["torch"] = torch
        points = {}
        for s in a.sparsity:
            name = f"ours sparse {model} S={s:g}"
            ours = self.start(name, ["sparse", "--framework", "ours", "--model", model,
                                     "--sparsity", str(s), "--alpha",
                                     str(a.alpha if s > 0 else 1.0), *self.common])
            if ours is not None:
                workers[name] = points[s] = ours
        rows: list[dict] = []
        train: dict = {}
        try:
            if points:
                say(f"bench-sparse: {model}: {len(workers)} workers take turns",
                    quiet=a.quiet)
                train = take_turns(lambda name, n: workers[name].request("train", n),
                                   list(workers), a.repeats, block=a.block)
            for s, ours in points.items():
                infer = take_turns(lambda op, n, w=ours: w.request(op, n),
                                   ["infer", "infer_dense"], a.repeats, block=a.block)
                record = ours.close()
                self.metrics.write("worker", worker=ours.name, **record)
                turns = {"ours": train[ours.name]}
                if "torch" in train:
                    turns["torch"] = train["torch"]
                rows.append(make_row(model, s, record, turns, infer))
            if "torch" in workers:
                self.metrics.write("worker", worker=workers["torch"].name,
                                   **workers["torch"].close())
        except WorkerFailed as err:
            self.fail(err)
            rows = []
        finally:
            for worker in workers.values():
                worker.kill()
        dense = points.get(0.0)
        add_shares(rows, train[dense.name] if dense is not None and rows else None,
                   {s: train[w.name] for s, w in points.items()} if rows else {})
        for row in rows:
            say(f"bench-sparse: {model} S={row['sparsity']:g}: train "
                f"{row['train_ms']:.1f} ms"
                + (f", {row['vs_torch']:.3f}x torch" if row["vs_torch"] else ""),
                quiet=a.quiet)
            self.metrics.write("bench", **row)
        return rows


def make_row(model: str, s: float, record: dict, train: dict, infer: dict) -> dict:
    """A table row from the worker's final record and the per-turn times."""
    c = record["cost"]
    ours = train["ours"]
    row = {"model": model, "sparsity": s,
           "train_ms": _median([t for ts in ours for t in ts]),
           "torch_ms": None, "vs_torch": None}
    if "torch" in train:
        stats = paired_stats(ours, train["torch"])
        row["torch_ms"] = _median([t for ts in train["torch"] for t in ts])
        row["vs_torch"] = stats.pop("ratio")
        row.update({f"vs_torch_{k[6:]}" if k.startswith("ratio_") else k: v
                    for k, v in stats.items()})
    else:
        row["ours_turns_ms"] = ours
    target = SPARSE_TARGETS.get((model, s))
    row["target"] = target.text if target else None
    row["verdict"] = target.verdict(row["train_ms"], row["vs_torch"]) if target else None
    infer_stats = paired_stats(infer["infer"], infer["infer_dense"])
    row.update({
        "mac_share": mac_share(c),
        "held_ratio": c["conv_linear_held_bytes"] / c["conv_linear_dense_held_bytes"],
        "held_all_ratio": c["held_bytes"] / c["dense_held_bytes"],
        "held_mb": c["held_bytes"] / 2**20,
        "weight_ratio": c["weight_csr_bytes"] / c["weight_dense_bytes"],
        "weight_csr_kb": c["weight_csr_bytes"] / 1024,
        "infer_ms": _median([t for ts in infer["infer"] for t in ts]),
        "infer_dense_ms": _median([t for ts in infer["infer_dense"] for t in ts]),
        "infer_ratio": infer_stats["ratio"],
        "infer_turns_ms": infer["infer"], "infer_dense_turns_ms": infer["infer_dense"],
        "peak_rss_mb": record["peak_rss_mb"], "cost": c,
    })
    return row


def add_shares(rows: list[dict], dense_turns: list | None, turns: dict) -> None:
    """time_share = our step at S / our dense step (median over turns of the
    per-turn ratio: both ran in every turn) and time_vs_mac = time_share /
    mac_share; None without an S = 0 point."""
    for r in rows:
        r["time_share"] = r["time_vs_mac"] = None
        if dense_turns is None:
            continue
        r["time_share"] = float(np.median(turn_ratios(turns[r["sparsity"]],
                                                      dense_turns)))
        if r["mac_share"] > 0:
            r["time_vs_mac"] = r["time_share"] / r["mac_share"]


def run(args) -> int:
    _check(args)
    rows = []
    start = time.perf_counter()
    with MetricsWriter(args.metrics) as metrics:
        metrics.write("start", command="bench-sparse", models=args.models,
                      sparsity=args.sparsity, alpha=args.alpha,
                      batch_size=args.batch_size, threads=args.threads,
                      repeats=args.repeats, block=args.block, width=args.width,
                      loadavg=os.getloadavg())
        session = Run(args, metrics)
        for model in args.models:
            rows += session.model(model)
        metrics.write("end", elapsed_seconds=time.perf_counter() - start,
                      num_errors=len(session.failed), loadavg=os.getloadavg())
    session.notes.append("load average (1, 5, 15 min) at the end: " + ", ".join(
        f"{v:.2f}" for v in os.getloadavg()) + f" on {os.cpu_count()} CPUs")
    out = sys.stderr if args.metrics == "-" else sys.stdout
    print(format_table(rows, args, session.notes), file=out, flush=True)
    for f in session.failed:
        print(f"error: worker '{f.name}' failed: {f.error}", file=sys.stderr)
    return 1 if session.failed else 0


HEAD = ["model", "S", "train ms", "torch dense ms", "vs torch [min-max]", "target",
        "verdict", "MAC share", "time share", "time/MAC", "held conv/fc", "weights CSR",
        "peak RSS MB", "infer ms", "infer dense-kernel ms", "infer ratio"]


def _cells(r: dict) -> list[str]:
    def x(v, digits=3):
        return "-" if v is None else f"{v:.{digits}f}x"

    spread = {"ratio_min": r["vs_torch_min"], "ratio_max": r["vs_torch_max"]} \
        if "vs_torch_min" in r else {}
    return [r["model"], f"{r['sparsity']:g}", f"{r['train_ms']:.1f}",
            "-" if r["torch_ms"] is None else f"{r['torch_ms']:.1f}",
            format_ratio(r["vs_torch"], spread), r["target"] or "", r["verdict"] or "",
            f"{r['mac_share']:.4f}", x(r["time_share"], 3).rstrip("x"),
            x(r["time_vs_mac"], 1), x(r["held_ratio"]), x(r["weight_ratio"]),
            f"{r['peak_rss_mb']:.0f}", f"{r['infer_ms']:.1f}",
            f"{r['infer_dense_ms']:.1f}", x(r["infer_ratio"])]


def format_table(rows: list[dict], args, notes: list[str] = ()) -> str:
    """Markdown or fixed-width text, one line per (model, sparsity), notes first."""
    lines = [_cells(r) for r in rows]
    head = [f"batch {args.batch_size}, {args.threads} threads, {args.repeats} steps "
            f"per point in turns of {args.block} with PyTorch's dense step; 'vs torch' "
            "= median over turns of ours(S)/torch [min-max]; sparse runs: Powerprop "
            f"alpha {args.alpha}, every conv/linear pruned to S, top 1-S activations "
            "kept (threshold refresh every 10)",
            "MAC share = executed/dense multiply-adds of a step; time share = our step "
            "at S / our dense step; time/MAC = time share / MAC share (1.0x: time "
            "follows MACs); 'held' = bytes kept for backward vs dense; 'infer ratio' "
            "= automatic / dense kernels on the same sparse model (paired)", *notes]
    if args.format == "markdown":
        out = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
        return "\n".join([*(f"- {h}" for h in head), "", *out])
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h)
              for i, h in enumerate(HEAD)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([*head, "", fmt.format(*HEAD), *(fmt.format(*c) for c in lines)])
