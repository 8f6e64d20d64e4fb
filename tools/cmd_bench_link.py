"""``sparsefedpp bench-link``: round time and bytes on the wire of an MQTT
federation whose devices sit behind thin links (tools/bench/link.py).

Each device runs in a network namespace of its own behind a veth pair shaped
with ``tbf`` to ``--rate`` both ways, and reaches the broker through a relay that
adds ``--rtt`` (and, with ``--loss``, iptables drops packets at random). The
aggregator and the broker stay in the root namespace on 127.0.0.1. For each
``METHOD:SPARSITY`` it runs ``bench-mqtt``'s federation (every device selected
every round) and reports the round time, what the devices spend training, the
bytes through the veths and the application's bytes, per round, and the round
time relative to the first configuration (dense FedAvg by default). Needs root.
docs/mqtt-load.md ("Thin links") has figures.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from sparsefedpp.runtime import models
from sparsefedpp.runtime.errors import ConfigError

from .bench.link import DeviceLinks, LinkSpec, parse_rate, parse_seconds, require_root
from .bench.mqtt_run import MqttBenchConfig, run_bench
from .flags import add_common
from .metrics import MetricsWriter
from .progress import say

DEFAULT_CONFIGS = ("fedavg:0", "sparsefedpp:0.9", "sparsefedpp:0.99",
                   "sparsefedpp:0.999")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench-link", help="round time over emulated thin links (root)",
        description="Run an MQTT federation with every device in its own network "
        "namespace behind a shaped veth (tbf) and a delay relay, per METHOD:SPARSITY, "
        "and report round time and bytes on the wire. Needs root.")
    p.add_argument("--rate", default="1mbit", help="link rate each way (default 1mbit)")
    p.add_argument("--rtt", default="100ms", help="round-trip delay (default 100ms)")
    p.add_argument("--loss", type=float, default=0.0,
                   help="fraction of packets dropped each way (default 0; iptables)")
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                   metavar="METHOD:SPARSITY",
                   help="federations to run, in order; the first is the reference of "
                   "the time ratio (default: " + " ".join(DEFAULT_CONFIGS) + ")")
    p.add_argument("--devices", type=int, default=5, help="devices (default 5)")
    p.add_argument("--rounds", type=int, default=6, help="rounds each (default 6)")
    p.add_argument("--model", default="cnn", choices=models.NAMES)
    p.add_argument("--data", default=None,
                   help="dataset (default fashion-mnist if installed)")
    p.add_argument("--limit", type=int, default=64,
                   help="training examples per device (default 64)")
    p.add_argument("--round-timeout", type=float, default=900.0)
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="give up on one federation after this many seconds")
    p.add_argument("--workdir", default=None,
                   help="keep shards and logs here (default: a temporary folder)")
    p.add_argument("--out", default=None, help="write the rows as JSON lines here")
    p.add_argument("--format", default="text", choices=("text", "markdown"))
    add_common(p)
    p.set_defaults(run=run)


def parse_config(text: str) -> tuple[str, float]:
    method, sep, sparsity = text.partition(":")
    try:
        value = float(sparsity) if sep else 0.0
    except ValueError:
        value = None
    if not method or value is None:
        raise ConfigError(f"bench-link configs: expected METHOD:SPARSITY such as "
                          f"sparsefedpp:0.99, got {text!r}")
    return method, value


def row_of(result: dict, method: str, sparsity: float, spec: LinkSpec) -> dict:
    """One table row from a run_bench result."""
    rounds = result["rounds"]
    n = len(rounds)
    link = result.get("link", {})
    transfer = [r["announce_to_last_upload_s"] for r in rounds
                if r["announce_to_last_upload_s"] is not None]
    return {
        "method": method, "sparsity": sparsity, "link": spec.describe(),
        "rate_bits": spec.rate_bits, "rtt_s": spec.rtt_s, "loss": spec.loss,
        "devices": result["config"]["devices"], "rounds": n,
        "round_s_median": result["latency_s"]["median"],
        "round_s_p95": result["latency_s"]["p95"],
        # round 1 downloads the dense initial model (no client has pruned it yet):
        # the rounds after it are the steady state of a sparse method
        "later_round_s_median": float(np.median(
            [r["latency_s"] for r in rounds[1:]] or [np.nan])),
        "later_app_down_bytes_per_round": float(np.mean(
            [r["bytes_down"] for r in rounds[1:]] or [np.nan])),
        "later_app_up_bytes_per_round": float(np.mean(
            [r["bytes_up"] for r in rounds[1:]] or [np.nan])),
        "announce_to_last_upload_s_median": float(np.median(transfer))
        if transfer else None,
        "train_and_upload_s_median": float(np.median(
            [r["device_train_s_median"] for r in rounds
             if r["device_train_s_median"] is not None] or [np.nan])),
        # everything that crossed the devices' veths over the run (TCP/IP headers,
        # retransmissions, MQTT framing and the start-up included), per round
        "wire_bytes_per_round": (link.get("device_tx_bytes", 0)
                                 + link.get("device_rx_bytes", 0)) / n,
        "wire_up_bytes_per_round": link.get("device_tx_bytes", 0) / n,
        "wire_down_bytes_per_round": link.get("device_rx_bytes", 0) / n,
        "app_up_bytes_per_round": result["app"]["bytes_up_per_round"],
        "app_down_bytes_per_round": result["app"]["bytes_down_per_round"],
        "final_accuracy": result["final_accuracy"],
    }


def format_rows(rows: list[dict], markdown: bool) -> str:
    ref = rows[0]["round_s_median"] if rows else None
    later_ref = rows[0]["later_round_s_median"] if rows else None
    head = ["method", "S", "link", "round s (median)", "p95", "x first",
            "rounds 2+ s (median)", "x first", "announce->last upload s",
            "device train+upload s", "wire MB/round (up+down)",
            "app MB/round up / down (rounds 2+)", "accuracy"]
    lines = []
    for r in rows:
        ratio = r["round_s_median"] / ref if ref else float("nan")
        later = r["later_round_s_median"] / later_ref if later_ref else float("nan")
        lines.append([
            r["method"], f"{r['sparsity']:g}", r["link"], f"{r['round_s_median']:.1f}",
            f"{r['round_s_p95']:.1f}", f"{ratio:.2f}",
            f"{r['later_round_s_median']:.1f}", f"{later:.2f}",
            "-" if r["announce_to_last_upload_s_median"] is None
            else f"{r['announce_to_last_upload_s_median']:.1f}",
            f"{r['train_and_upload_s_median']:.2f}",
            f"{r['wire_bytes_per_round'] / 1e6:.3f}",
            f"{r['later_app_up_bytes_per_round'] / 1e6:.3f} / "
            f"{r['later_app_down_bytes_per_round'] / 1e6:.3f}",
            "-" if r["final_accuracy"] is None else f"{r['final_accuracy']:.3f}"])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths))
                     for line in [head, *lines])


def run(args) -> int:
    require_root()
    spec = LinkSpec(parse_rate(args.rate), parse_seconds(args.rtt), args.loss)
    configs = [parse_config(c) for c in args.configs]
    rows = []
    with MetricsWriter(args.metrics) as metrics:
        metrics.write("start", command="bench-link", link=spec.describe(),
                      configs=args.configs)
        for k, (method, sparsity) in enumerate(configs, 1):
            cfg = MqttBenchConfig(devices=args.devices, rounds=args.rounds,
                                  data=args.data, limit=args.limit, model=args.model,
                                  method=method, sparsity=sparsity,
                                  min_clients=args.devices,
                                  round_timeout=args.round_timeout,
                                  timeout=args.timeout, seed=args.seed)
            say(f"bench-link [{k}/{len(configs)}] {method} @ {sparsity:g} over "
                f"{spec.describe()}, {args.devices} devices", quiet=args.quiet)
            work = Path(args.workdir) / f"{method}-{sparsity:g}" if args.workdir \
                else Path(tempfile.mkdtemp(prefix="sfpp-bench-link-"))
            try:
                result = run_bench(cfg, work, lambda m: say(m, quiet=args.quiet),
                                   place_devices=lambda devs, port: DeviceLinks(
                                       spec, devs, port))
            except BaseException:
                say(f"bench-link: logs kept in {work}", quiet=args.quiet)
                raise
            if not args.workdir:
                shutil.rmtree(work, ignore_errors=True)
            row = row_of(result, method, sparsity, spec)
            rows.append(row)
            metrics.write("config", **row)
            say(f"bench-link [{k}/{len(configs)}] round {row['round_s_median']:.1f} s "
                f"median, {row['wire_bytes_per_round'] / 1e6:.3f} MB/round on the wire",
                quiet=args.quiet)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    out = sys.stderr if args.metrics == "-" else sys.stdout
    print(format_rows(rows, args.format == "markdown"), file=out, flush=True)
    return 0
