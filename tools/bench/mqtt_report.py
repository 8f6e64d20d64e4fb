"""What ``bench-mqtt`` reports: the figures of a finished run (round latency,
bytes through the broker, CPU and memory per process, where a round's time goes) and
their table."""

from __future__ import annotations

import math
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .mqtt_monitor import BYTES_RECEIVED, BYTES_SENT, MESSAGES_RECEIVED, MESSAGES_SENT
from .proc_sampler import step_at

if TYPE_CHECKING:
    from .mqtt_monitor import Monitor
    from .mqtt_run import MqttBenchConfig
    from .proc_sampler import ProcRecord, Sampler


def percentile(values, q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q % at or below it
    (with fewer than 100 / (100 - q) values, p95 is the maximum)."""
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)])



def _log_time(line: str) -> float | None:
    """The time.time() of a log line starting with logging's asctime, else None."""
    try:
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None



def _device_times(log: Path) -> dict[int, tuple[float | None, float | None]]:
    """round (1-based) -> (training started, update sent) from a device log."""
    out: dict[int, list] = {}
    for line in _read_lines(log):
        t = _log_time(line)
        if t is None:
            continue
        for marker, slot in ((": training on ", 0), (": update sent", 1)):
            pos = line.find(marker)
            if pos > 0 and " round " in line[:pos]:
                try:
                    rnd = int(line[:pos].rsplit(" round ", 1)[1])
                except ValueError:
                    continue
                out.setdefault(rnd, [None, None])
                if out[rnd][slot] is None:
                    out[rnd][slot] = t
    return {k: tuple(v) for k, v in out.items()}


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []



def summarize(cfg: MqttBenchConfig, data: str, t0: float, monitor: Monitor,
              sampler: Sampler, server: ProcRecord, device_recs: list[ProcRecord],
              broker_rec: ProcRecord, events: list[dict], rounds: list[dict]) -> dict:
    """The result of a finished run (see mqtt_run's docstring for each figure), from
    the samples, the monitor, the aggregator's events and the device logs. Needs the
    announcement of round 1 (``monitor.announced[(0, 0)]``) and one or more rounds."""
    first_announce = monitor.announced[(0, 0)]
    closed = rounds[-1]["time"]

    # --- round latency (round 1 without the wait for the devices)
    device_times = {r.name: _device_times(r.log) for r in device_recs}
    per_round = []
    for e in rounds:
        rnd = e["round"]
        start = e["time"] - e["seconds"]
        announced = min((t for (r, _a), t in monitor.announced.items() if r == rnd - 1),
                        default=None)
        latency = e["seconds"]
        if rnd == 1:
            latency -= max(0.0, first_announce - start)
        sent = [v[rnd][1] for v in device_times.values() if rnd in v and v[rnd][1]]
        train = [v[rnd][1] - v[rnd][0] for v in device_times.values()
                 if rnd in v and v[rnd][0] and v[rnd][1]]
        per_round.append({
            "round": rnd, "seconds": e["seconds"], "latency_s": latency,
            "selected": len(e["selected"]), "accepted": len(e["accepted"]),
            "rejected": len(e.get("rejected", [])),
            "bytes_up": e["bytes_up"], "bytes_down": e["bytes_down"],
            "announce_to_last_upload_s": (max(sent) - announced)
            if sent and announced else None,
            "last_upload_to_close_s": (e["time"] - max(sent)) if sent else None,
            "device_train_s_median": float(np.median(train)) if train else None,
            "device_train_s_max": max(train) if train else None,
            "accuracy": e.get("eval", {}).get("accuracy"),
        })
    latencies = [r["latency_s"] for r in per_round]

    # --- bytes through the broker
    broker = {}
    for key, topic in (("bytes_received", BYTES_RECEIVED), ("bytes_sent", BYTES_SENT),
                       ("messages_received", MESSAGES_RECEIVED),
                       ("messages_sent", MESSAGES_SENT)):
        before = monitor.counter(topic, before=first_announce)
        after = monitor.counter(topic, after=closed)
        if before is None or after is None:
            broker[key] = None
            continue
        broker[key] = after[1] - before[1]
        if key == "bytes_received":
            broker["window_s"] = after[0] - before[0]
        if key == "bytes_sent":
            own = monitor.own_bytes(after[0]) - monitor.own_bytes(before[0])
            broker["monitor_bytes"] = own
            broker[key] = after[1] - before[1] - own
    for key in ("bytes_received", "bytes_sent", "messages_received", "messages_sent"):
        value = broker.get(key)
        broker[f"{key}_per_round"] = value / cfg.rounds if value is not None else None
    broker.update(_proc_summary(broker_rec, first_announce, closed, cfg.rounds))

    aggregator = _proc_summary(server, first_announce, closed, cfg.rounds)
    aggregator["exit_code"] = server.proc.returncode
    dev = [_proc_summary(r, first_announce, closed, cfg.rounds) for r in device_recs]
    window = closed - first_announce
    devices_cpu_rounds = sum(d["cpu_s_in_rounds"] for d in dev)
    devices = {
        "peak_rss_mb_median": float(np.median([d["peak_rss_mb"] for d in dev])),
        "peak_rss_mb_max": max(d["peak_rss_mb"] for d in dev),
        "cpu_s_median": float(np.median([d["cpu_s"] for d in dev])),
        "cpu_s_in_rounds_total": devices_cpu_rounds,
        "cores_busy_in_rounds": devices_cpu_rounds / window if window > 0 else None,
        "exit_codes": sorted({r.proc.returncode for r in device_recs},
                             key=lambda c: (c is None, c or 0)),
    }
    ours = (devices_cpu_rounds + aggregator["cpu_s_in_rounds"]
            + broker["cpu_s_in_rounds"])
    machine_busy = (step_at(sampler.machine, closed)
                    - step_at(sampler.machine, first_announce))
    bench_cpu = (step_at(sampler.bench, closed)
                 - step_at(sampler.bench, first_announce))
    cores = {"machine_busy": machine_busy / window, "federation": ours / window,
             "bench_itself": bench_cpu / window,
             "others": (machine_busy - ours - bench_cpu) / window} if window > 0 else {}
    # the same during the start-up (spawn to round 1 announced)
    up = first_announce - t0
    recs = [server, broker_rec, *device_recs]
    # spawned at t0; the broker earlier, so its CPU before t0 is taken off
    ours_up = sum(r.cpu_at(first_announce) for r in recs) - broker_rec.cpu_at(t0)
    machine_up = (step_at(sampler.machine, first_announce)
                  - step_at(sampler.machine, t0))
    startup_cores = {"machine_busy": machine_up / up, "federation": ours_up / up}
    online = monitor.online
    all_online = max(online.values()) - t0 if len(online) >= cfg.devices else None
    app_up = sum(e["bytes_up"] for e in rounds)
    app_down = sum(e["bytes_down"] for e in rounds)
    end = next((e for e in events if e.get("event") == "end"), {})
    return {
        "config": {**asdict(cfg), "data": data, "min_clients": cfg.quorum,
                   "per_round": cfg.devices},
        "rounds": per_round,
        "latency_s": {"median": float(np.median(latencies)),
                      "p95": percentile(latencies, 95),
                      "p95_is_max": math.ceil(0.95 * len(latencies)) == len(latencies),
                      "min": min(latencies), "max": max(latencies)},
        "startup_s": {"devices_online": all_online,
                      "first_round": first_announce - t0},
        "rounds_window_s": window,
        "broker": broker,
        "app": {"bytes_up": app_up, "bytes_down": app_down,
                "bytes_up_per_round": app_up / cfg.rounds,
                "bytes_down_per_round": app_down / cfg.rounds,
                "totals": end.get("totals")},
        "aggregator": aggregator,
        "devices": devices,
        "cores_in_rounds": cores,
        "cores_in_startup": startup_cores,
        "final_accuracy": per_round[-1]["accuracy"],
    }


def _proc_summary(rec: ProcRecord, start: float, end: float, rounds: int) -> dict:
    in_rounds = rec.cpu_at(end) - rec.cpu_at(start)
    wall = rec.wall_s
    return {"cpu_s": rec.cpu_s, "wall_s": wall,
            "cpu_percent": 100 * rec.cpu_s / wall if wall > 0 else None,
            "cpu_s_in_rounds": in_rounds, "cpu_s_per_round": in_rounds / rounds,
            "cpu_percent_in_rounds": 100 * in_rounds / (end - start)
            if end > start else None,
            "peak_rss_mb": rec.peak_kb / 1024}



def _fmt(value, spec: str = ".1f", scale: float = 1.0, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value / scale:{spec}}{unit}"


def format_table(result: dict, markdown: bool = False) -> str:
    """Per-round rows, then one line per figure."""
    c = result["config"]
    head = (f"{c['devices']} devices, {c['rounds']} rounds, {c['model']} on "
            f"{c['data']}, "
            f"{c['limit']} examples/device, {c['method']} S={c['sparsity']:g}, "
            f"per_round {c['per_round']}, min_clients {c['min_clients']}, "
            f"{result['machine']['cpus']} CPUs, load average at start "
            f"{result['machine']['loadavg_start'][0]:.2f}")
    cols = ["round", "latency s", "aggregator s", "updates", "up kB", "down kB",
            "announce->last upload s", "last upload->close s",
            "device train s (med/max)",
            "accuracy"]
    rows = []
    for r in result["rounds"]:
        rows.append([str(r["round"]), _fmt(r["latency_s"], ".2f"),
                     _fmt(r["seconds"], ".2f"), f"{r['accepted']}/{r['selected']}",
                     _fmt(r["bytes_up"], ".1f", 1e3), _fmt(r["bytes_down"], ".1f", 1e3),
                     _fmt(r["announce_to_last_upload_s"], ".2f"),
                     _fmt(r["last_upload_to_close_s"], ".2f"),
                     (f"{_fmt(r['device_train_s_median'], '.2f')}/"
                      f"{_fmt(r['device_train_s_max'], '.2f')}"),
                     _fmt(r["accuracy"], ".3f")])
    lat, b, app = result["latency_s"], result["broker"], result["app"]
    agg, dev, st = result["aggregator"], result["devices"], result["startup_s"]
    p95 = "round latency p95" + (" (= max: < 20 rounds)" if lat["p95_is_max"] else "")
    figures = [
        ("startup: all devices online", _fmt(st["devices_online"], ".1f", unit=" s")),
        ("startup: round 1 announced", _fmt(st["first_round"], ".1f", unit=" s")),
        ("round latency median", _fmt(lat["median"], ".2f", unit=" s")),
        (p95, _fmt(lat["p95"], ".2f", unit=" s")),
        ("broker bytes received / round", _fmt(b["bytes_received_per_round"], ".1f",
                                                1e3, " kB")),
        ("broker bytes sent / round", _fmt(b["bytes_sent_per_round"], ".1f", 1e3,
                                           " kB")),
        ("broker messages received / sent per round",
         (f"{_fmt(b['messages_received_per_round'], '.0f')} / "
          f"{_fmt(b['messages_sent_per_round'], '.0f')}")),
        ("app bytes up / round (updates)", _fmt(app["bytes_up_per_round"], ".1f", 1e3,
                                                " kB")),
        ("app bytes down / round (model x selected)",
         _fmt(app["bytes_down_per_round"], ".1f", 1e3, " kB")),
        ("aggregator CPU % (whole life)", _fmt(agg["cpu_percent"], ".1f", unit=" %")),
        ("aggregator CPU s (whole life)", _fmt(agg["cpu_s"], ".2f", unit=" s")),
        ("aggregator CPU s / round (during rounds)",
         _fmt(agg["cpu_s_per_round"], ".2f", unit=" s")),
        ("aggregator peak RSS", _fmt(agg["peak_rss_mb"], ".0f", unit=" MB")),
        ("broker CPU % (whole life)", _fmt(b["cpu_percent"], ".1f", unit=" %")),
        ("broker CPU s / round (during rounds)", _fmt(b["cpu_s_per_round"], ".3f",
                                                      unit=" s")),
        ("broker peak RSS", _fmt(b["peak_rss_mb"], ".1f", unit=" MB")),
        ("device peak RSS median / max",
         (f"{_fmt(dev['peak_rss_mb_median'], '.0f')} / "
          f"{_fmt(dev['peak_rss_mb_max'], '.0f')} MB")),
        ("device CPU s median (whole life)", _fmt(dev["cpu_s_median"], ".2f",
                                                  unit=" s")),
        ("devices: cores busy during rounds", _fmt(dev["cores_busy_in_rounds"], ".2f")),
        ("machine: cores busy during rounds (all processes)",
         _fmt(result["cores_in_rounds"].get("machine_busy"), ".2f")),
        ("  of which other users' processes",
         _fmt(result["cores_in_rounds"].get("others"), ".2f")),
        ("run wall time", _fmt(result.get("wall_s"), ".1f", unit=" s")),
    ]
    if markdown:
        out = [f"- {head}", "", "| " + " | ".join(cols) + " |",
               "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        out += ["", "| figure | value |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in figures]
        return "\n".join(out)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(cols)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    width = max(len(k) for k, _ in figures)
    return "\n".join([head, "", fmt.format(*cols), *(fmt.format(*r) for r in rows), "",
                      *(f"{k:<{width}}  {v}" for k, v in figures)])

