"""``sparsefedpp bench-mqtt``: load benchmark of an MQTT federation (tools/bench/mqtt_*.py).

Starts its own Mosquitto, N ``sparsefedpp client`` processes and one ``sparsefedpp
serve`` on this machine, runs R rounds with every device selected, and reports
round latency, bytes through the broker, CPU and peak RSS of the aggregator, the
broker and the devices, and the start-up time. docs/mqtt-load.md has figures.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from sparsefedpp.runtime import models

from .bench.mqtt_report import format_table
from .bench.mqtt_run import MqttBenchConfig, run_bench
from .flags import add_common
from .metrics import MetricsWriter
from .progress import say


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench-mqtt", help="load benchmark: broker, aggregator and N device processes",
        description="Start a Mosquitto broker on a free port, shard a dataset over N "
        "devices, run N 'sparsefedpp client' processes and one 'sparsefedpp serve' "
        "for R rounds (every device selected), and measure round latency, bytes "
        "through the broker ($SYS counters) and per round, CPU and peak RSS of the "
        "aggregator, broker and devices, and the start-up time.")
    p.add_argument("--devices", type=int, default=20,
                   help="device processes (default 20)")
    p.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    p.add_argument("--data", default=None,
                   help="dataset to shard and evaluate on (default fashion-mnist if "
                   "/usr/share/datasets/fashion-mnist exists; a CIFAR-10 folder works)")
    p.add_argument("--limit", type=int, default=64,
                   help="training examples per device (default 64; the partition "
                   "gets devices x limit, IID)")
    p.add_argument("--model", default="cnn", choices=models.NAMES)
    p.add_argument("--method", default="sparsefedpp")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--min-clients", type=int, default=None,
                   help="quorum per round (default 80%% of the devices)")
    p.add_argument("--test-limit", type=int, default=200,
                   help="test examples of the aggregator's evaluation (default 200)")
    p.add_argument("--round-timeout", type=float, default=600.0)
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="give up on the whole run after this many seconds")
    p.add_argument("--workdir", default=None,
                   help="folder for shards, logs and state (default: a temporary "
                   "folder, removed after a successful run)")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.add_argument("--format", default="text", choices=("text", "markdown"))
    add_common(p)
    p.set_defaults(run=run)


def run(args) -> int:
    cfg = MqttBenchConfig(devices=args.devices, rounds=args.rounds, data=args.data,
                          limit=args.limit, model=args.model, method=args.method,
                          sparsity=args.sparsity, min_clients=args.min_clients,
                          test_limit=args.test_limit, round_timeout=args.round_timeout,
                          timeout=args.timeout, seed=args.seed)
    temporary = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sfpp-bench-mqtt-"))
    with MetricsWriter(args.metrics) as metrics:
        metrics.write("start", command="bench-mqtt", workdir=str(workdir))
        try:
            result = run_bench(cfg, workdir, lambda m: say(m, quiet=args.quiet))
        except BaseException:
            say(f"bench-mqtt: logs kept in {workdir}", quiet=args.quiet)
            raise
        for r in result["rounds"]:
            metrics.write("round", **r)
        metrics.write("result", **{k: v for k, v in result.items() if k != "rounds"})
    if temporary:
        shutil.rmtree(workdir, ignore_errors=True)
        result["workdir"] = None
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    out = sys.stderr if args.metrics == "-" else sys.stdout
    table = format_table(result, markdown=args.format == "markdown")
    print(table, file=out, flush=True)
    return 1 if result["aggregator"]["exit_code"] != 0 else 0
