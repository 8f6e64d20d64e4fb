"""``sparsefedpp bench-memory``: one local round of a device, phase by phase, beside
PyTorch in its own process.

Each configuration (framework, model, sparsity) runs in a fresh
``tools/bench/memory_worker.py`` process that trains one local round on a real shard
(default: the first 500 images of Fashion-MNIST; ``--data`` a CIFAR-10 folder or
anything ``sparsefedpp train --data`` takes) through the client's own code path
(``trainer.local_round.local_round``) on the global model as a device receives it
(encoded, decoded into a model built without random initialisation), and reports
where the megabytes go: RSS after the imports, the kernels, the data, the weights,
the first step and the round, the peak (VmHWM), the bytes of weights, gradients,
optimizer state and of what is held for backward, the round time, and how many
kernels were compiled in the round (``--fresh-cache`` first runs ``sparsefedpp
warmup`` in a new NUMBA_CACHE_DIR, so this checks that the warm-up compiles every
kernel a round needs). Targets (issue 15): ResNet-18 at 99 % <= 250 MB, ResNet-8 at
99 % <= 165 MB, dense ResNet-18 <= 0.6x PyTorch's peak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from sparsefedpp.runtime.errors import ConfigError, DataError

from .bench.memory_worker import PHASES
from .bench.report import MEMORY_TARGETS
from .flags import add_common
from .metrics import MetricsWriter
from .progress import say

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
#: (model, sparsity) of the default runs: the ResNet-18 client of the README, and
#: ResNet-8 at 99 %
RUNS = ("resnet18:0", "resnet18:0.9", "resnet18:0.99", "resnet18:0.999",
        "resnet8:0.99")
MODELS = ("resnet8", "resnet18")


def add_parser(sub) -> None:
    p = sub.add_parser("bench-memory", help="RSS per phase and time of one local "
                       "training round of a device, vs PyTorch",
                       description="Peak and per-phase RSS and the time of one local "
                       "round (the client's code path) on a real shard, in fresh "
                       "processes, with PyTorch's dense round beside it.")
    p.add_argument("--runs", nargs="+", default=list(RUNS), metavar="MODEL:S",
                   help=f"model:sparsity pairs (default {' '.join(RUNS)})")
    p.add_argument("--data", default=None,
                   help="a CIFAR-10 python folder, IDX folder or .npz (default: "
                   f"Fashion-MNIST from {FASHION_MNIST})")
    p.add_argument("--examples", type=int, default=500, help="shard size (default 500)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--width", type=float, default=1.0,
                   help="channel multiplier (default 1; smoke tests)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--fresh-cache", action="store_true",
                   help="run `sparsefedpp warmup` in a new NUMBA_CACHE_DIR first and "
                   "measure every round with that cache (warm-start check)")
    p.add_argument("--recompute", action="store_true",
                   help="also measure every run of ours with `client --recompute` "
                   "(block activations rebuilt in backward)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--format", default="text", choices=("text", "markdown"))
    add_common(p)
    p.set_defaults(run=run)


def parse_runs(items: list[str]) -> list[tuple[str, float]]:
    runs = []
    for item in items:
        model, _, s = item.partition(":")
        try:
            sparsity = float(s or 0)
        except ValueError:
            sparsity = -1.0
        if model not in MODELS or not 0.0 <= sparsity < 1.0:
            raise ConfigError(f"--runs: expected MODEL:S with MODEL in "
                              f"{', '.join(MODELS)} and S in [0, 1), got {item!r}")
        runs.append((model, sparsity))
    return list(dict.fromkeys(runs))


def load_data(spec: str | None):
    """The dataset the shard is cut from; a clear DataError without one."""
    from sparsefedpp.trainer.data import load_dataset

    if spec is None:
        if not Path(FASHION_MNIST).is_dir():
            raise DataError(f"bench-memory: no data: pass --data with a CIFAR-10 "
                            f"folder (e.g. cifar-10-batches-py) or install Fashion-MNIST "
                            f"(apt-get install dataset-fashion-mnist, {FASHION_MNIST})")
        spec = FASHION_MNIST
    return load_dataset(spec)


def write_shard(path: Path, data, n: int, seed: int) -> None:
    """The first-come n images of a seeded permutation, as a device's .npz shard."""
    if len(data) < n:
        raise ConfigError(f"--examples: the data has {len(data)} images, asked {n}")
    idx = np.sort(np.random.default_rng(seed).permutation(len(data))[:n])
    shape = (0, *data.images.shape[1:])
    np.savez(path, x_train=np.asarray(data.images[idx]), y_train=data.labels[idx],
             x_test=np.zeros(shape, np.uint8), y_test=np.zeros(0, np.int64),
             classes=np.array(data.classes))


def write_global_model(path: Path, model: str, sparsity: float, width: float,
                       num_classes: int, in_channels: int) -> None:
    """The global model a device receives, encoded as the aggregator sends it:
    seeded Powerprop weights (alpha 1.25) pruned globally to ``sparsity``. Built
    here, so the worker measures a client's round: no random initialisation,
    decode, load (trainer/device_agent.py)."""
    from sparsefedpp.runtime import models
    from sparsefedpp.runtime.sparsity import pruning
    from sparsefedpp.runtime.wire import codec

    net = models.build(model, num_classes=num_classes, width=width,
                       in_channels=in_channels, alpha=1.25, seed=0)
    if sparsity:
        pruning.prune(net, sparsity, "global")
    method = "sparsefedpp" if sparsity else "fedavg"
    path.write_bytes(codec.encode(codec.Message("model", 0, "aggregator", method,
                                                net.state_dict())))


def measure(framework: str, model: str, sparsity: float, args, shard: Path,
            env: dict, global_model: Path | None = None,
            recompute: bool = False) -> dict:
    cmd = [sys.executable, "-m", "sparsefedpp.tools.bench.memory_worker",
           "--framework", framework, "--data", str(shard), "--model", model,
           "--width", str(args.width), "--batch-size", str(args.batch_size),
           "--sparsity", str(sparsity), "--threads", str(args.threads)]
    if global_model is not None:
        cmd += ["--global-model", str(global_model)]
    if recompute:
        cmd.append("--recompute")
    base = {"ok": False, "framework": framework, "model": model, "sparsity": sparsity,
            "batch_size": args.batch_size, "recompute": recompute}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                             check=False, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timed out after {args.timeout:g} s"}
    if out.returncode != 0:
        tail = "\n".join(out.stderr.strip().splitlines()[-5:])
        return {**base, "error": f"exit {out.returncode}: {tail}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def warmup(env: dict, timeout: float) -> dict:
    """``sparsefedpp warmup --json`` in the workers' environment."""
    cmd = [sys.executable, "-m", "sparsefedpp.tools.cli", "warmup", "--json", "--quiet"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                         check=False, env=env, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise ConfigError(f"bench-memory: sparsefedpp warmup failed: {out.stderr[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def verdicts(rows: list[dict]) -> None:
    """Target and verdict of each ok row (MEMORY_TARGETS; the ratio is to PyTorch's
    peak on the same model)."""
    torch = {r["model"]: r["peak_mb"] for r in rows
             if r["ok"] and r["framework"] == "torch"}
    for r in rows:
        r["target"] = r["verdict"] = r["vs_torch"] = None
        if not r["ok"] or r["framework"] != "ours":
            continue
        r["vs_torch"] = r["peak_mb"] / torch[r["model"]] if r["model"] in torch else None
        target = MEMORY_TARGETS.get((r["model"], r["sparsity"]))
        if target is not None and r.get("width", 1.0) == 1.0:
            r["target"] = target.text
            r["verdict"] = target.verdict(r["peak_mb"], r["vs_torch"])


HEAD = ["framework", "model", "S", *PHASES, "peak", "vs torch", "target", "verdict",
        "round s", "first step s", "start to 1st step s", "compiled", "weights",
        "grads", "grads resident", "optimizer", "held"]


def _cells(r: dict) -> list[str]:
    def num(v, fmt="{:.0f}"):
        return "-" if v is None else fmt.format(v)

    ph = r["phases_mb"]
    name = r["framework"] + ("+recompute" if r.get("recompute") else "")
    return [name, r["model"], f"{r['sparsity']:g}",
            *(num(ph.get(p)) for p in PHASES), num(r["peak_mb"]),
            num(r["vs_torch"], "{:.2f}x"), r["target"] or "", r["verdict"] or "",
            num(r.get("round_s"), "{:.1f}"), num(r.get("first_step_s"), "{:.2f}"),
            num(r.get("first_step_process_s"), "{:.2f}"), num(r.get("compiled"), "{}"),
            num(r.get("weights_mb"), "{:.1f}"), num(r.get("grads_mb"), "{:.1f}"),
            num(r.get("grads_resident_mb"), "{:.1f}"),
            num(r.get("optimizer_mb"), "{:.1f}"), num(r.get("held_mb"), "{:.1f}")]


def table(rows: list[dict], fmt: str = "markdown") -> str:
    ok = [r for r in rows if r["ok"]]
    lines = [_cells(r) for r in ok]
    errors = [f"{r['framework']} {r['model']} S={r['sparsity']:g}: error: {r['error']}"
              for r in rows if not r["ok"]]
    if fmt == "markdown":
        out = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
        out += ["| " + " | ".join(c) + " |" for c in lines]
        return "\n".join(out + [f"- {e}" for e in errors])
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h)
              for i, h in enumerate(HEAD)]
    line = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([line.format(*HEAD), *(line.format(*c) for c in lines), *errors])


LEGEND = ("MB of RSS after each phase: interpreter; numpy imported; numba (torch) "
          "imported; the package and its kernels loaded (Numba cache); the shard "
          "(uint8); the model built (ours: pruned to S); one step (a local round of "
          "one batch); a whole local round; peak = VmHWM. weights/grads/optimizer/"
          "held = MB of parameter, gradient and optimizer-state arrays and of the "
          "activations held for backward (one step); grads resident = what the "
          "gradients occupy after the step (lazily-zero pages never written cost "
          "nothing); compiled = kernel signatures "
          "compiled in the worker (0: the cache was warm); start to 1st step = "
          "process start to the end of the first step")


def run(args) -> int:
    runs = parse_runs(args.runs)
    if args.examples < 1 or args.batch_size < 1:
        raise ConfigError("--examples and --batch-size: expected integers >= 1, got "
                          f"{args.examples} and {args.batch_size}")
    data = load_data(args.data)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sparsefedpp-mem-") as tmp, \
            MetricsWriter(args.metrics) as metrics:
        shard = Path(tmp) / "shard.npz"
        write_shard(shard, data, args.examples, args.seed)
        num_classes, in_channels = len(data.classes), data.images.shape[1]
        del data
        env = dict(os.environ)
        for key in ("OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS", "OMP_NUM_THREADS"):
            env[key] = str(args.threads)
        metrics.write("start", command="bench-memory", runs=args.runs,
                      data=args.data or FASHION_MNIST, examples=args.examples,
                      batch_size=args.batch_size, width=args.width,
                      fresh_cache=args.fresh_cache, loadavg=os.getloadavg())
        notes = []
        if args.fresh_cache:
            env["NUMBA_CACHE_DIR"] = str(Path(tmp) / "numba-cache")
            say("bench-memory: sparsefedpp warmup in a new NUMBA_CACHE_DIR ...",
                quiet=args.quiet)
            w = warmup(env, args.timeout)
            metrics.write("warmup", **w)
            notes.append(f"fresh cache: warmup compiled {w['compiled']} of "
                         f"{w['signatures']} kernel signatures in "
                         f"{w['total_seconds']:.1f} s")
        configs = [("ours", m, s, False) for m, s in runs]
        if args.recompute:
            configs += [("ours", m, s, True) for m, s in runs]
        if not args.no_torch:
            configs += [("torch", m, 0.0, False)
                        for m in dict.fromkeys(m for m, _ in runs)]
        for fw, model, s, re in configs:
            say(f"bench-memory: {fw}{'+recompute' if re else ''} {model} sparsity "
                f"{s:g} ...", quiet=args.quiet)
            wire = None
            if fw == "ours":
                wire = Path(tmp) / f"global-{model}-{s:g}.bin"
                write_global_model(wire, model, s, args.width, num_classes,
                                   in_channels)
            rows.append(measure(fw, model, s, args, shard, env, wire, re))
        verdicts(rows)
        for r in rows:
            metrics.write("memory", **r)
    compiled = [r for r in rows if r["ok"] and r.get("compiled")]
    if compiled:
        notes.append("kernels compiled inside a round (the warm-up misses them): "
                     + ", ".join(f"{r['model']} S={r['sparsity']:g}: {r['compiled']}"
                                 for r in compiled))
    out = sys.stderr if args.metrics == "-" else sys.stdout
    head = (f"bench-memory: one local round, {args.examples} images of "
            f"{args.data or FASHION_MNIST}, batch {args.batch_size}, {args.threads} "
            "threads")
    if args.format == "markdown":
        text = "\n".join([f"- {head}", f"- {LEGEND}", *(f"- {n}" for n in notes), "",
                          table(rows, "markdown")])
    else:
        text = "\n".join([head, LEGEND, *notes, "", table(rows, "text")])
    print(text, file=out, flush=True)
    return 0 if all(r["ok"] for r in rows) and not compiled else 1
