"""``sparsefedpp serve``: the aggregator of an MQTT federation (server/mqtt_service.py).

The configuration is a TOML file with two tables: ``[federation]`` holds the FL
settings under the names of ``sparsefedpp simulate`` (method, sparsity, model,
rounds, per_round, min_clients, lr, ...; ``data`` is the aggregator's evaluation
data, which also fixes the classes and the normalisation), ``[deployment]`` the
service settings of ``ServiceConfig`` (devices, state_dir, round_timeout,
on_no_quorum, ...). docs/protocol.md has an example. As in the reference, the
aggregate is not pruned again (``server_prune = true`` does, ours); every
evaluated round records the global model's accuracy as is, its density and the
accuracy of its copy pruned to the method's sparsity (``accuracy_pruned``).
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import fields
from pathlib import Path

import numpy as np
from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.server.mqtt_service import Aggregator
from sparsefedpp.server.service_config import ServiceConfig
from sparsefedpp.trainer.data import load_dataset

from .flags import add_broker_flags, add_common, broker_settings, setup_logging
from .metrics import MetricsWriter
from .progress import say
from .simulate import (
    SimConfig,
    config_dict,
    device_round_config,
    model_stats,
    server_side,
)

SIMULATION_ONLY = ("clients", "lda_alpha", "val_share", "train_limit", "workers",
                   "attack", "attackers", "attack_scale")
NOT_IN_FINGERPRINT = ("rounds", "eval_every", "test_limit", "eval_sparsities", "data")


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the aggregator of an MQTT federation",
                       description="Announce rounds, publish the global model, collect "
                       "device updates until the deadline, aggregate once a quorum is "
                       "met, evaluate, checkpoint; resumes from its state folder.")
    p.add_argument("--config", required=True, help="federation TOML file")
    p.add_argument("--state", default=None,
                   help="state folder (default: [deployment] state_dir)")
    add_broker_flags(p, default_user="aggregator")
    add_common(p)
    p.set_defaults(run=run)


def load_config(path: str, state: str | None = None,
                seed: int | None = None) -> tuple[SimConfig, ServiceConfig]:
    """Parse and check the federation TOML file."""
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"--config {path}: expected a readable TOML file, got {e}"
                          ) from None
    unknown_tables = set(doc) - {"federation", "deployment"}
    if unknown_tables:
        raise ConfigError(f"--config {path}: expected tables [federation] and "
                          f"[deployment], got also {sorted(unknown_tables)}")
    fed, dep = dict(doc.get("federation", {})), dict(doc.get("deployment", {}))
    allowed = {f.name for f in fields(SimConfig)} - set(SIMULATION_ONLY)
    if set(fed) - allowed:
        raise ConfigError(f"--config {path} [federation]: unknown keys "
                          f"{sorted(set(fed) - allowed)}; expected some of "
                          f"{sorted(allowed)}")
    if seed is not None:
        fed.setdefault("seed", seed)
    if "eval_sparsities" in fed:
        fed["eval_sparsities"] = tuple(fed["eval_sparsities"])
    sim = SimConfig(**fed)
    dep_fields = {f.name for f in fields(ServiceConfig)}
    derived = {"rounds", "quorum", "eval_every", "encoding", "method"}
    if set(dep) - (dep_fields - derived):
        raise ConfigError(f"--config {path} [deployment]: unknown keys "
                          f"{sorted(set(dep) - (dep_fields - derived))}; expected some "
                          f"of {sorted(dep_fields - derived)}")
    if state is not None:
        dep["state_dir"] = state
    if "state_dir" not in dep:
        raise ConfigError(f"--config {path} [deployment]: expected state_dir (or "
                          f"--state), got none")
    dep["devices"] = tuple(str(d) for d in dep.get("devices", ()))
    service = ServiceConfig(**dep, rounds=sim.rounds, quorum=sim.min_clients,
                            eval_every=sim.eval_every, encoding=sim.encoding,
                            method=sim.method)
    if sim.per_round > len(service.devices):
        raise ConfigError(f"--config {path}: per_round {sim.per_round} exceeds the "
                          f"{len(service.devices)} registered devices")
    return sim, service


def config_toml(federation: dict, deployment: dict) -> str:
    """The federation TOML file that ``load_config`` reads (flat tables of strings,
    numbers, booleans and lists)."""
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a valid TOML basic string
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = ["[federation]", *(f"{k} = {value(v)}" for k, v in federation.items()),
             "", "[deployment]", *(f"{k} = {value(v)}" for k, v in deployment.items())]
    return "\n".join(lines) + "\n"


def build_aggregator(sim: SimConfig, service: ServiceConfig, broker, emit=None):
    test = load_dataset(sim.data, "test")
    if sim.test_limit is not None:
        test = test.subset(np.arange(min(sim.test_limit, len(test))))

    model, strategy, evaluate_tensors = server_side(sim, test)
    fingerprint = {k: v for k, v in config_dict(sim).items()
                   if k not in NOT_IN_FINGERPRINT and k not in SIMULATION_ONLY}
    agg = Aggregator(service, strategy, model.state_dict(), broker=broker,
                     round_config=lambda rnd: device_round_config(sim, rnd, test),
                     seed=sim.seed, fingerprint=fingerprint,
                     evaluate_fn=evaluate_tensors, model_stats=model_stats(model),
                     emit=emit)
    strategy.set_global(agg.tensors)  # a resumed federation screens against its model
    return agg


def run(args) -> int:
    setup_logging(args.quiet, args.debug)
    sim, service = load_config(args.config, args.state, args.seed)
    broker = broker_settings(args, "aggregator", str(service.mqtt_version))
    metrics_path = args.metrics or Path(service.state_dir) / "metrics.jsonl"
    with MetricsWriter(metrics_path) as metrics:
        def emit(event, **fields):
            metrics.write(event, **fields)
            if event == "round":
                acc = fields["eval"].get("accuracy")
                shown = f"acc {acc:.4f}" if acc is not None else "acc   -   "
                say(f"round {fields['round']}/{sim.rounds}  {shown}  "
                    f"{len(fields['accepted'])}/{len(fields['selected'])} updates  "
                    f"{len(fields['rejected'])} rejected  up "
                    f"{fields['bytes_up'] / 1e3:.1f} kB  {fields['seconds']:.1f}s",
                    quiet=args.quiet)

        agg = build_aggregator(sim, service, broker, emit)
        metrics.write("start", command="serve", config=config_dict(sim),
                      deployment={k: getattr(service, k) for k in
                                  ("devices", "round_timeout", "on_no_quorum",
                                   "state_dir")},
                      broker=broker.url, resume_round=agg.next_round)
        if agg.next_round >= sim.rounds:
            say(f"the federation in {service.state_dir} already ran {sim.rounds} rounds",
                quiet=args.quiet)
        agg.run()
        metrics.write("end", rounds=sim.rounds, totals=agg.totals)
    return 0
