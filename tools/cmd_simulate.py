"""``sparsefedpp simulate``: a whole federation on real data in one process.

One line per round (accuracy, loss, sparsity, bytes up/down, cumulative bytes,
time) and JSON-lines metrics: a ``start`` event with the full configuration, one
``round`` event per round, an ``end`` event with the summary. The global model
is checkpointed to OUT/model.npz after every round, and what ``--resume OUT``
needs to OUT/resume.npz (the global tensors bit for bit, the round, the
configuration, the cumulative bytes and seconds, and the length of the metrics
file at that round). A resumed run cuts the metrics file back to that length
(dropping a torn last line and any round after the checkpoint), writes a
``resume`` event and goes on; its rounds are bit-identical to an uninterrupted
run's (timings aside).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
from sparsefedpp.runtime import checkpoint, models
from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.runtime.wire.codec import ENCODINGS
from sparsefedpp.server.robust import AGGREGATORS
from sparsefedpp.trainer.methods import METHODS

from .flags import add_common
from .metrics import MetricsWriter, read_metrics
from .progress import say
from .simulate import ATTACKS, SimConfig, Simulation, config_dict

RESUME_FILE = "resume.npz"

FLAGS = {  # SimConfig field -> (flag, type, help)
    "method": ("--method", str, f"one of {', '.join(METHODS)}"),
    "sparsity": ("--sparsity", float, "target weight sparsity of the uploads"),
    "model": ("--model", str, f"one of {', '.join(models.NAMES)}"),
    "width": ("--width", float, "width multiplier"),
    "alpha": ("--alpha", float, ("Powerprop exponent (default: 1.25 for sparsefedpp, "
                                 "else 1)")),
    "data": ("--data", str, "dataset (as for train); default fashion-mnist"),
    "clients": ("--clients", int, "clients in the federation"),
    "per_round": ("--per-round", int, "clients sampled per round"),
    "rounds": ("--rounds", int, "rounds"),
    "lda_alpha": ("--lda-alpha", float, ("Dirichlet concentration of the label split "
                                         "(0.1 skewed, 1000 ~IID); --iid for IID")),
    "val_share": ("--val-share", float, "held-out validation share per client"),
    "epochs": ("--epochs", int, "local epochs per round"),
    "batch_size": ("--batch-size", int, "local batch size"),
    "lr": ("--lr", float, "learning rate of round 1"),
    "lr_end": ("--lr-end", float, "learning rate of the last round (exponential decay)"),
    "momentum": ("--momentum", float, "local SGD momentum"),
    "weight_decay": ("--weight-decay", float, "local SGD weight decay"),
    "mask_ratio": ("--mask-ratio", float, "ZeroFL: extra upload density"),
    "min_keep": ("--min-keep", float, "SparseFedPP: floor on the kept activations"),
    "layer_floor": ("--layer-floor", int, ("every pruning keeps at least this many "
                                           "weights per conv/linear layer, out of the "
                                           "global budget (0: off, the reference)")),
    "encoding": ("--encoding", str, f"wire encoding: {', '.join(ENCODINGS)}"),
    "min_clients": ("--min-clients", int, "fewest results a round aggregates"),
    "eval_every": ("--eval-every", int, "evaluate the global model every N rounds"),
    "train_limit": ("--limit", int, "use the first N training examples only"),
    "test_limit": ("--test-limit", int, "evaluate on the first N test examples only"),
    "workers": ("--workers", int, "client processes per round (default 1)"),
    "aggregator": ("--aggregator", str, f"one of {', '.join(AGGREGATORS)}"),
    "trim": ("--trim", float, "trimmed-mean: share of updates cut at each end"),
    "screen_median": ("--screen-median", float, ("reject an update whose change "
                                                 "exceeds this x the round's median "
                                                 "change; 0 off")),
    "screen_global": ("--screen-global", float, ("reject an update whose change "
                                                 "exceeds this x the global model's "
                                                 "norm; 0 off")),
    "max_examples": ("--max-examples", int, "largest num_examples an update may claim"),
    "attack": ("--attack", str, f"poison the attackers' uploads: {', '.join(ATTACKS)}"),
    "attackers": ("--attackers", int, "clients 0 .. N-1 are attackers"),
    "attack_scale": ("--attack-scale", float, ("the attack's factor (default: scale "
                                               "1e3, signflip 1, big 1e30)")),
}


def add_parser(sub) -> None:
    p = sub.add_parser("simulate", help="simulate a federation (SparseFedPP, ZeroFL, "
                       "Top-k, FedAvg) in one process",
                       description="Run a whole federation on real data: clients "
                       "train locally, updates cross the wire codec, the server "
                       "aggregates with FedAvg; a line per round and JSON-lines metrics.")
    p.add_argument("--config", default=None,
                   help="JSON file of settings (keys as in the metrics' start event); "
                   "flags override it")
    defaults = SimConfig()
    for name, (flag, typ, text) in FLAGS.items():
        p.add_argument(flag, dest=name, type=typ, default=None,
                       help=f"{text} (default {getattr(defaults, name)})")
    p.add_argument("--iid", action="store_true", help="IID split instead of Dirichlet")
    p.add_argument("--augment", action="store_true", help="random crop + flip locally")
    p.add_argument("--server-prune", action="store_true",
                   help="ours, not the reference's: re-prune the aggregate to the "
                   "method's sparsity every round (compounds the client masks)")
    p.add_argument("--no-screening", action="store_true",
                   help="no norm bound on the updates (--screen-median 0 "
                   "--screen-global 0): plain FedAvg, for comparison")
    p.add_argument("--eval-sparsities", type=float, nargs="*", default=None,
                   help="one-shot pruning levels evaluated after the last round "
                   "(default 0.9 0.95 0.99 0.995 0.999)")
    p.add_argument("--out", default="runs/simulate",
                   help="folder for metrics.jsonl and model.npz")
    p.add_argument("--resume", default=None, metavar="OUT",
                   help="continue the run in folder OUT from its last round (its "
                   "saved configuration; flags given must agree with it); a folder "
                   "without a finished round starts over")
    add_common(p)
    p.set_defaults(run=run, seed=None)  # None: the --config file's or the saved seed


def make_config(args, base: dict | None = None) -> SimConfig:
    """Defaults (or ``base``, a saved config dict), then the --config file, then
    explicit flags."""
    values = dict(base or {})
    if args.config:
        try:
            loaded = json.loads(Path(args.config).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError(f"--config {args.config}: expected a readable JSON "
                              f"object, got {err}") from err
        known = {f.name for f in fields(SimConfig)}
        if not isinstance(loaded, dict) or set(loaded) - known:
            unknown = sorted(set(loaded) - known) if isinstance(loaded, dict) else loaded
            raise ConfigError(f"--config {args.config}: expected an object with keys "
                              f"from {sorted(known)}, got unknown {unknown}")
        values.update(loaded)
    for name in FLAGS:
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.iid:
        values["lda_alpha"] = None
    if args.augment:
        values["augment"] = True
    if args.no_screening:
        values.update(screen_median=0.0, screen_global=0.0)
    if args.server_prune:
        values["server_prune"] = True
    if args.eval_sparsities is not None:
        values["eval_sparsities"] = tuple(args.eval_sparsities)
    if args.seed is not None:
        values["seed"] = args.seed
    if "eval_sparsities" in values:
        values["eval_sparsities"] = tuple(values["eval_sparsities"])
    return SimConfig(**values)


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _differences(saved: dict, now: dict) -> list[str]:
    return [f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}"
            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]


def _normal(config: SimConfig) -> dict:
    """config_dict as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(config_dict(config)))


def save_resume(path: Path, sim: Simulation, meta: dict) -> None:
    """Write what ``--resume`` needs atomically (NumPy .npz: the tensors exactly,
    ``meta`` as a JSON string; no pickle). Compressed: a pruned model is mostly
    zeros (ResNet-18 at 99 %: 45 MB plain, 0.7 MB compressed), so the resume
    files of long runs can be committed and carried to the next sitting."""
    arrays = {f"tensor.{k}": v for k, v in sim.state().items()}
    arrays["meta"] = np.array(json.dumps(meta))
    checkpoint.write_atomic(path, lambda f: np.savez_compressed(f, **arrays))


def load_resume(path: Path) -> tuple[dict, dict]:
    """(meta, tensors) of a resume file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            tensors = {k[len("tensor."):]: z[k] for k in z.files
                       if k.startswith("tensor.")}
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"simulate --resume: expected a readable {path}, got {err}; "
                          f"move it away to start over") from err
    return meta, tensors


def _has_end(path: Path, offset: int) -> bool:
    """Whether the metrics after byte ``offset`` hold a complete end event."""
    with open(path, "rb") as f:
        f.seek(offset)
        for line in f.read().splitlines(keepends=True):
            try:
                if line.endswith(b"\n") and json.loads(line).get("event") == "end":
                    return True
            except ValueError:
                continue
    return False


def _last_eval(path: Path) -> dict:
    rounds = [e for e in read_metrics(path) if e.get("event") == "round"]
    return rounds[-1].get("eval", {}) if rounds else {}


def _prepare(args) -> tuple[SimConfig, Path, Path, dict | None, dict | None]:
    """The config, out folder, metrics path and (resume meta, tensors) of a run;
    a resumed run's saved configuration is checked against the flags."""
    out = Path(args.resume or args.out)
    if args.resume and args.out != "runs/simulate" and Path(args.out) != out:
        raise ConfigError(f"simulate --resume {args.resume}: expected no other --out, "
                          f"got {args.out}")
    metrics_path = Path(args.metrics) if args.metrics else out / "metrics.jsonl"
    if not args.resume:
        return make_config(args), out, metrics_path, None, None
    if str(args.metrics) == "-":
        raise ConfigError("simulate --resume: expected a metrics file, got '-'")
    state = out / RESUME_FILE
    if not state.exists():  # no round finished yet: start over
        config = make_config(args)
        if metrics_path.exists():
            metrics_path.unlink()
        return config, out, metrics_path, None, None
    meta, tensors = load_resume(state)
    config = make_config(args, base=meta["config"])
    diff = _differences(meta["config"], _normal(config))
    if diff:
        raise ConfigError(f"simulate --resume {out}: expected the configuration the "
                          f"run started with, got {'; '.join(diff)}")
    size = metrics_path.stat().st_size if metrics_path.exists() else 0
    if size < meta["metrics_bytes"]:
        raise ConfigError(f"simulate --resume {out}: expected {metrics_path} of at "
                          f"least {meta['metrics_bytes']} bytes (round "
                          f"{meta['round']}), got {size}; move the folder away to "
                          f"start over")
    return config, out, metrics_path, meta, tensors


def run(args) -> int:
    config, out, metrics_path, saved, tensors = _prepare(args)
    out.mkdir(parents=True, exist_ok=True)
    if saved is not None and saved["round"] >= config.rounds and \
            _has_end(metrics_path, saved["metrics_bytes"]):
        say(f"{out}: the run already finished its {config.rounds} rounds",
            quiet=args.quiet)
        return 0
    if saved is not None:
        with open(metrics_path, "r+b") as f:  # drop a torn line, rounds after it
            f.truncate(saved["metrics_bytes"])
    start = time.perf_counter()
    sim = Simulation(config)
    first, before = 0, 0.0
    if saved is not None:
        first, before = saved["round"], saved["elapsed_seconds"]
        sim.restore(tensors, next_round=first, totals={
            "bytes_up": saved["cum_bytes_up"], "bytes_down": saved["cum_bytes_down"]})
    final = _last_eval(metrics_path) if first >= config.rounds else {}
    with MetricsWriter(metrics_path) as metrics:
        def on_event(event: str, **fields) -> None:
            """The loop's round event: the metrics line, then the checkpoints (the
            resume file records the metrics' length with this line)."""
            metrics.write(event, **fields)
            if event != "round":
                return
            checkpoint.save(out / "model.npz", sim.global_model(),
                            meta={"round": fields["round"], "method": config.method,
                                  "sparsity": config.sparsity})
            save_resume(out / RESUME_FILE, sim, {
                "round": fields["round"], "config": _normal(config),
                "cum_bytes_up": fields["cum_bytes_up"],
                "cum_bytes_down": fields["cum_bytes_down"],
                "elapsed_seconds": before + time.perf_counter() - start,
                "metrics_bytes": os.path.getsize(metrics_path)})

        sim.loop.emit = on_event
        if saved is None:
            metrics.write("start", command="simulate", config=config_dict(config),
                          train_examples=len(sim.train), test_examples=len(sim.test),
                          label_skew=sim.skew,
                          client_sizes=[len(p) for p in sim.parts])
        else:
            metrics.write("resume", command="simulate", round=first)
        say(f"simulate {config.method} @ sparsity {config.sparsity:g}: {config.model} "
            f"on {sim.train.name}, {config.clients} clients ({config.per_round}/round), "
            f"{config.rounds} rounds, label skew {sim.skew:.3f}"
            + (f"; resumed after round {first}" if first else ""), quiet=args.quiet)
        try:
            for rnd in range(first, config.rounds):
                rec = sim.run_round(rnd)
                final = rec.eval
                _say_round(rec, config.rounds, sim.loop.totals["bytes_up"],
                           quiet=args.quiet)
        finally:
            sim.close()
        total_up, total_down = (sim.loop.totals["bytes_up"],
                                sim.loop.totals["bytes_down"])
        metrics.write("end", elapsed_seconds=before + time.perf_counter() - start,
                      final=final, cum_bytes_up=total_up, cum_bytes_down=total_down)
    pruned = "  ".join(f"{k} {v:.4f}" for k, v in final.items()
                       if k.startswith("accuracy@"))
    say(f"final: accuracy {final.get('accuracy', float('nan')):.4f}  "
        f"pruned to S {final.get('accuracy_pruned', float('nan')):.4f}  {pruned}",
        quiet=args.quiet)
    return 0


def _say_round(rec, rounds: int, total_up: int, *, quiet: bool) -> None:
    acc = rec.eval.get("accuracy")
    shown = f"acc {acc:.4f}" if acc is not None else "acc   -   "
    pruned = rec.eval.get("accuracy_pruned")
    shown += f" (@S {pruned:.4f})" if pruned is not None else ""
    say(f"round {rec.round}/{rounds}  {shown}  loss {rec.train_loss:.4f}  sparsity "
        f"{rec.global_sparsity:.4f}  up {_mb(rec.bytes_up)}  down {_mb(rec.bytes_down)}"
        f"  cum up {_mb(total_up)}  {rec.seconds:.1f}s", quiet=quiet)
