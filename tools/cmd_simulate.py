"""``sparsefedpp simulate``: a whole federation on real data in one process.

One line per round (accuracy, loss, sparsity, bytes up/down, cumulative bytes,
time) and JSON-lines metrics: a ``start`` event with the full configuration, one
``round`` event per round, an ``end`` event with the summary. The global model
is checkpointed to OUT/model.npz after every round.
"""

from __future__ import annotations

import json
import time
from dataclasses import fields
from pathlib import Path

from sparsefedpp.runtime import checkpoint, models
from sparsefedpp.runtime.codec import ENCODINGS
from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.server.robust import AGGREGATORS
from sparsefedpp.trainer.client import METHODS

from .cmd_train import add_common
from .metrics import MetricsWriter
from .progress import say
from .simulate import ATTACKS, SimConfig, Simulation, config_dict

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
    p.add_argument("--no-screening", action="store_true",
                   help="no norm bound on the updates (--screen-median 0 "
                   "--screen-global 0): plain FedAvg, for comparison")
    p.add_argument("--eval-sparsities", type=float, nargs="*", default=None,
                   help="one-shot pruning levels evaluated after the last round "
                   "(default 0.9 0.95 0.99 0.995 0.999)")
    p.add_argument("--out", default="runs/simulate",
                   help="folder for metrics.jsonl and model.npz")
    add_common(p)
    p.set_defaults(run=run)


def make_config(args) -> SimConfig:
    """Defaults, then the --config file, then explicit flags."""
    values = {}
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
    if args.eval_sparsities is not None:
        values["eval_sparsities"] = tuple(args.eval_sparsities)
    values["seed"] = args.seed
    if "eval_sparsities" in values:
        values["eval_sparsities"] = tuple(values["eval_sparsities"])
    return SimConfig(**values)


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def run(args) -> int:
    config = make_config(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = args.metrics or out / "metrics.jsonl"
    start = time.perf_counter()
    sim = Simulation(config)
    total_up = total_down = 0
    with MetricsWriter(metrics_path) as metrics:
        metrics.write("start", command="simulate", config=config_dict(config),
                      train_examples=len(sim.train), test_examples=len(sim.test),
                      label_skew=sim.skew,
                      client_sizes=[len(p) for p in sim.parts])
        say(f"simulate {config.method} @ sparsity {config.sparsity:g}: {config.model} on "
            f"{sim.train.name}, {config.clients} clients ({config.per_round}/round), "
            f"{config.rounds} rounds, label skew {sim.skew:.3f}", quiet=args.quiet)
        try:
            for rnd in range(config.rounds):
                rec = sim.run_round(rnd)
                total_up += rec.bytes_up
                total_down += rec.bytes_down
                metrics.write("round", **vars(rec), cum_bytes_up=total_up,
                              cum_bytes_down=total_down)
                checkpoint.save(out / "model.npz", sim.global_model(),
                                meta={"round": rec.round, "method": config.method,
                                      "sparsity": config.sparsity})
                acc = rec.eval.get("accuracy")
                shown = f"acc {acc:.4f}" if acc is not None else "acc   -   "
                say(f"round {rec.round}/{config.rounds}  {shown}  loss "
                    f"{rec.train_loss:.4f}  sparsity {rec.global_sparsity:.4f}  up "
                    f"{_mb(rec.bytes_up)}  down {_mb(rec.bytes_down)}  cum up "
                    f"{_mb(total_up)}  {rec.seconds:.1f}s", quiet=args.quiet)
        finally:
            sim.close()
        final = rec.eval
        metrics.write("end", elapsed_seconds=time.perf_counter() - start,
                      final=final, cum_bytes_up=total_up, cum_bytes_down=total_down)
    pruned = "  ".join(f"{k} {v:.4f}" for k, v in final.items() if k.startswith("accuracy@"))
    say(f"final: accuracy {final.get('accuracy', float('nan')):.4f}  {pruned}",
        quiet=args.quiet)
    return 0
