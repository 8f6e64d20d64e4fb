"""A grid of simulate runs (methods x sparsities x seeds) that survives interruption.

Each point runs ``sparsefedpp simulate --resume POINT_DIR`` with the grid's common
flags, in this process, one after another: a finished point is skipped, an
unfinished one resumes from its last round (bit-identical to an uninterrupted
run), a new one starts. So a sweep can be stopped (Ctrl-C, a reboot) and run again
with the same command to go on. Dense FedAvg is one point per seed (sparsity 0).

After every point the sweep prints how many points and rounds are left and an
estimate of the time left (seconds per round measured so far: the point's own,
else the mean of the points of the same method and sparsity, else of all), and
rewrites OUT/summary.jsonl: one JSON object per point (method, sparsity, seed,
folder, status, rounds done, the final scalar metrics, uplink bytes, seconds).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sparsefedpp.runtime.checkpoint import write_atomic
from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.trainer.methods import METHODS, is_dense

from .progress import say

SUMMARY = "summary.jsonl"
# set by the sweep per point: the common flags may not hold them
OWN_FLAGS = ("--method", "--sparsity", "--seed", "--out", "--resume", "--metrics")


@dataclass(frozen=True)
class Point:
    method: str
    sparsity: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-s{self.sparsity:g}-seed{self.seed}"

    def flags(self) -> list[str]:
        return ["--method", self.method, "--sparsity", f"{self.sparsity!r}",
                "--seed", str(self.seed)]


def grid(methods: list[str], sparsities: list[float], seeds: list[int]) -> list[Point]:
    """The points, seed by seed (a first complete figure comes early); fedavg is
    dense, so it is one point per seed whatever the sparsities."""
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ConfigError(f"sweep methods: expected some of {', '.join(METHODS)}, got "
                          f"{methods}")
    if any(not 0 < s < 1 for s in sparsities):
        raise ConfigError(f"sweep sparsities: expected fractions in (0, 1), got "
                          f"{sparsities}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"sweep seeds: expected distinct seeds, got {seeds}")
    if any(not is_dense(m) for m in methods) and not sparsities:
        raise ConfigError("sweep sparsities: expected at least one for the sparse "
                          "methods, got none")
    points = []
    for seed in seeds:
        for m in methods:
            levels = [0.0] if is_dense(m) else sorted(set(sparsities))
            points.extend(Point(m, s, seed) for s in levels)
    return points


def check_common(common: list[str]) -> list[str]:
    """The flags every point gets; the per-point ones are refused."""
    own = [f for f in common if f.split("=")[0] in OWN_FLAGS]
    if own:
        raise ConfigError(f"sweep: expected common simulate flags without "
                          f"{', '.join(OWN_FLAGS)} (the sweep sets them), got {own}")
    return [f for f in common if f != "--quiet"]


# ---- the state of one point, from its folder ---------------------------------------


def point_state(folder: Path) -> dict:
    """rounds done, whether it finished, seconds per round, the end event."""
    rounds_done, seconds, end = 0, [], None
    resume = folder / "resume.npz"
    if resume.exists():
        try:
            with np.load(resume, allow_pickle=False) as z:
                rounds_done = int(json.loads(str(z["meta"]))["round"])
        except (OSError, ValueError, KeyError):
            rounds_done = 0
    metrics = folder / "metrics.jsonl"
    logged = []
    if metrics.exists():
        with open(metrics, encoding="utf-8") as f:
            for line in f:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue  # a torn last line
                kind = event.get("event")
                if kind == "round":
                    logged.append(event)
                elif kind == "end":
                    end = event
    if end is not None and logged:
        # A finished point needs no checkpoint (results/ keeps metrics only), so
        # its metrics say how many rounds it ran.
        rounds_done = max(rounds_done, max(int(e.get("round", 0)) for e in logged))
    seconds = [float(e.get("seconds", math.nan)) for e in logged
               if e.get("round", 0) <= rounds_done]
    rate = float(np.nanmean(seconds)) if seconds and not all(map(math.isnan, seconds)) \
        else None
    return {"rounds_done": rounds_done, "end": end, "rate": rate}


def estimate_left(points: list[Point], states: dict[str, dict], rounds: int) -> float:
    """Seconds left: every point's remaining rounds times its seconds per round."""
    rates = {p.name: states[p.name]["rate"] for p in points if states[p.name]["rate"]}
    if not rates:
        return math.nan
    overall = float(np.mean(list(rates.values())))
    left = 0.0
    for p in points:
        if states[p.name]["end"] is not None:
            continue
        alike = [rates[q.name] for q in points if q.name in rates
                 and (q.method, q.sparsity) == (p.method, p.sparsity)]
        rate = rates.get(p.name) or (float(np.mean(alike)) if alike else overall)
        left += (rounds - states[p.name]["rounds_done"]) * rate
    return left


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unknown"
    minutes = int(round(seconds / 60))
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes} min"


def summary_row(point: Point, folder: Path, state: dict, rounds: int,
                status: str) -> dict:
    end = state["end"] or {}
    final = {k: v for k, v in end.get("final", {}).items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"method": point.method, "sparsity": point.sparsity, "seed": point.seed,
            "folder": str(folder), "status": status,
            "rounds_done": state["rounds_done"], "rounds": rounds, "final": final,
            "cum_bytes_up": end.get("cum_bytes_up"),
            "elapsed_seconds": end.get("elapsed_seconds")}


def write_summary(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    write_atomic(path, lambda f: f.write(text))


def run_sweep(points: list[Point], common: list[str], out: Path, *, rounds: int,
              quiet: bool = False, simulate=None) -> int:
    """Run (or resume, or skip) every point; returns 0, 130 when interrupted, or 1
    when a point failed (the others still ran). ``simulate(argv) -> exit code``
    defaults to the CLI's ``main``."""
    if simulate is None:
        from .cli import main as simulate
    out.mkdir(parents=True, exist_ok=True)
    folders = {p.name: out / p.name for p in points}
    states = {p.name: point_state(folders[p.name]) for p in points}
    status = {p.name: ("finished" if states[p.name]["end"] is not None
                       and states[p.name]["rounds_done"] >= rounds
                       else "unfinished" if states[p.name]["rounds_done"] else "new")
              for p in points}
    counts = {s: list(status.values()).count(s)
              for s in ("finished", "unfinished", "new")}
    say(f"sweep {out}: {len(points)} points ({counts['finished']} finished, "
        f"{counts['unfinished']} unfinished, {counts['new']} new), {rounds} rounds "
        f"each; time left ~{_duration(estimate_left(points, states, rounds))}",
        quiet=quiet)
    code = 0
    for i, p in enumerate(points, 1):
        if status[p.name] == "finished":
            continue
        left = sum(status[q.name] != "finished" for q in points)
        say(f"[{i}/{len(points)}] {p.name}: "
            + (f"resuming after round {states[p.name]['rounds_done']}"
               if states[p.name]["rounds_done"] else "starting")
            + f" ({left} points left)", quiet=quiet)
        argv = ["simulate", "--resume", str(folders[p.name]), *common, *p.flags()]
        rc = simulate(argv + (["--quiet"] if quiet else []))
        states[p.name] = point_state(folders[p.name])
        if rc == 130:
            status[p.name] = "unfinished"
            code = 130
        elif rc != 0:
            status[p.name] = "failed"
            code = code or 1
        else:
            status[p.name] = "finished"
        write_summary(out / SUMMARY, [summary_row(q, folders[q.name], states[q.name],
                                                  rounds, status[q.name])
                                      for q in points])
        final = (states[p.name]["end"] or {}).get("final", {})
        acc, pruned = final.get("accuracy"), final.get("accuracy_pruned")
        shown = "" if acc is None else f"accuracy {acc:.4f}" + (
            "" if pruned is None else f" (pruned to S {pruned:.4f})") + "; "
        say(f"[{i}/{len(points)}] {p.name}: {status[p.name]}; {shown}"
            f"{sum(s != 'finished' for s in status.values())} points left, time left "
            f"~{_duration(estimate_left(points, states, rounds))}", quiet=quiet)
        if code == 130:
            say("sweep interrupted: run the same command again to go on", quiet=quiet)
            return code
    write_summary(out / SUMMARY, [summary_row(q, folders[q.name], states[q.name],
                                              rounds, status[q.name]) for q in points])
    return code
