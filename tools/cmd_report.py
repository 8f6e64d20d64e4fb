"""``sparsefedpp report RUNS...``: a markdown table (and PNG figures) of simulate runs.

Each RUN is a simulate output folder or its metrics.jsonl (a sweep folder: every
point in it). The table has one row per run: method (with its variant: server
pruning, layer floor), sparsity, seed, rounds, final accuracy of the global model
as is, accuracy of its copy pruned to S (the seed's metric), accuracy after
one-shot pruning, uplink bytes and wall time. Runs that differ only by seed are
also summarised as mean +- standard deviation. With matplotlib installed (the
``plot`` extra) and ``--plots DIR``: accuracy at S vs sparsity per method (the
seed paper's Fig. 1; error bars over seeds) and accuracy vs cumulative uplink
bytes.
"""

from __future__ import annotations

from pathlib import Path

from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.trainer.methods import is_dense

from .metrics import read_metrics


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="table and figures from simulate runs",
                       description="Summarise simulate runs as a markdown table; "
                       "with --plots, also PNG figures (needs matplotlib).")
    p.add_argument("runs", nargs="+", help="simulate output folders or metrics.jsonl "
                   "(or sweep folders)")
    p.add_argument("--plots", default=None, help="folder for PNG figures")
    p.set_defaults(run=run)


def load_run(path: str) -> dict:
    """The start config, round events and end event of one run."""
    p = Path(path)
    file = p / "metrics.jsonl" if p.is_dir() else p
    if not file.is_file():
        raise ConfigError(f"report {path}: expected a simulate folder or metrics.jsonl, "
                          "got no such file")
    try:
        events = read_metrics(file)
    except ValueError as err:
        raise ConfigError(f"report {file}: expected JSON lines, got {err}") from err
    start = next((e for e in events if e.get("event") == "start"
                  and e.get("command") == "simulate"), None)
    if start is None:
        raise ConfigError(f"report {file}: expected the metrics of a simulate run, got no "
                          "simulate start event")
    rounds = [e for e in events if e.get("event") == "round"]
    end = next((e for e in events if e.get("event") == "end"), None)
    return {"path": str(file), "config": start["config"], "rounds": rounds, "end": end}


def expand(paths: list[str]) -> list[str]:
    """A sweep folder (no metrics.jsonl of its own, point folders inside) stands
    for its points."""
    out = []
    for path in paths:
        p = Path(path)
        points = sorted(q.parent for q in p.glob("*/metrics.jsonl")) if p.is_dir() \
            and not (p / "metrics.jsonl").exists() else []
        if points:
            out.extend(str(q) for q in points)
        else:
            out.append(path)
    return out


def variant(c: dict) -> str:
    """What a run did beyond the reference ('' for the reference). Runs from before
    ``server_prune`` existed always re-pruned the aggregate."""
    parts = []
    if c.get("server_prune", True) and not is_dense(c["method"]):
        parts.append("server-prune")
    if c.get("layer_floor", 0):
        parts.append(f"floor {c['layer_floor']}")
    return ", ".join(parts)


def summarize(run: dict) -> dict:
    c = run["config"]
    evals = [r for r in run["rounds"] if r.get("eval")]
    final = run["end"]["final"] if run["end"] else (evals[-1]["eval"] if evals else {})
    last = run["rounds"][-1] if run["rounds"] else {}
    return {
        "method": c["method"], "variant": variant(c), "sparsity": c["sparsity"],
        "model": c["model"], "width": c["width"], "seed": c.get("seed", 0),
        "rounds": len(run["rounds"]), "of": c["rounds"],
        "lda_alpha": c["lda_alpha"], "accuracy": final.get("accuracy"),
        "accuracy_pruned": final.get("accuracy_pruned"),
        "pruned": {k.split("@")[1]: v for k, v in final.items()
                   if k.startswith("accuracy@")},
        "cum_up": last.get("cum_bytes_up", 0),
        "up_per_client": (last.get("bytes_up", 0) / max(1, len(last.get("clients", [])))),
        "seconds": run["end"]["elapsed_seconds"] if run["end"] else None,
        "finished": run["end"] is not None,
    }


def _label(r: dict) -> str:
    return r["method"] + (f" ({r['variant']})" if r["variant"] else "")


def _acc(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def at_s(r: dict):
    """The figure's accuracy: of the copy pruned to S (dense runs: as is)."""
    return r["accuracy"] if r["accuracy_pruned"] is None else r["accuracy_pruned"]


def table(rows: list[dict]) -> str:
    levels = sorted({k for r in rows for k in r["pruned"]}, key=float)
    head = ["method", "sparsity", "model", "seed", "rounds", "accuracy", "acc @S",
            *(f"acc @{k}" for k in levels), "upload/client", "total up", "wall"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (_label(r), r["sparsity"], r["seed"])):
        rounds = f"{r['rounds']}/{r['of']}" + ("" if r["finished"] else " (unfinished)")
        cells = [_label(r), f"{r['sparsity']:g}", f"{r['model']} x{r['width']:g}",
                 str(r["seed"]), rounds, _acc(r["accuracy"]),
                 _acc(r["accuracy_pruned"]),
                 *(f"{r['pruned'][k]:.4f}" if k in r["pruned"] else "-" for k in levels),
                 f"{r['up_per_client'] / 1e3:.1f} kB", f"{r['cum_up'] / 1e6:.2f} MB",
                 "-" if r["seconds"] is None else f"{r['seconds'] / 60:.1f} min"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Finished runs that differ only by seed, keyed by (label, sparsity, model,
    width, rounds)."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["finished"]:
            key = (_label(r), r["sparsity"], r["model"], r["width"], r["of"])
            out.setdefault(key, []).append(r)
    return out


def _mean_std(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 \
        if len(values) > 1 else 0.0
    return f"{mean:.4f} +- {std:.4f}"


def seed_table(rows: list[dict]) -> str:
    """Mean +- sample standard deviation over seeds ('' when no point has two)."""
    grouped = groups(rows)
    if not any(len(g) > 1 for g in grouped.values()):
        return ""
    head = ["method", "sparsity", "model", "rounds", "seeds", "accuracy", "acc @S"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (label, sparsity, model, width, rounds), g in sorted(grouped.items()):
        cells = [label, f"{sparsity:g}", f"{model} x{width:g}", str(rounds),
                 str(len(g)), _mean_std([r["accuracy"] for r in g]),
                 _mean_std([at_s(r) for r in g])]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plots(runs: list[dict], rows: list[dict], folder: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ConfigError("report --plots: expected matplotlib, got none; install the "
                          "plot extra: pip install -e '.[plot]'") from err
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    fig, ax = plt.subplots(figsize=(6, 4))
    # the sparsity levels evenly spaced (90, 95, 99, 99.9 crowd a linear axis)
    levels = sorted({r["sparsity"] for r in rows})
    by_label: dict[str, list] = {}
    for (label, sparsity, *_), g in sorted(groups(rows).items()):
        values = [at_s(r) for r in g if at_s(r) is not None]
        if values:
            mean = sum(values) / len(values)
            by_label.setdefault(label, []).append(
                (sparsity, mean, max(max(values) - mean, 0.0),
                 max(mean - min(values), 0.0)))  # equal seeds: rounding
    for label, pts in by_label.items():
        pts.sort()
        ax.errorbar([levels.index(s) for s, *_ in pts], [m for _, m, _, _ in pts],
                    yerr=[[lo for *_, lo in pts], [hi for _, _, hi, _ in pts]],
                    fmt="o-", capsize=3, label=label)
    ax.set_xticks(range(len(levels)), [f"{100 * s:g}" for s in levels])
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("test accuracy at S (pruned copy)")
    ax.set_title("accuracy vs sparsity (mean, min-max over seeds)")
    ax.legend()
    ax.grid(alpha=0.3)
    made.append(folder / "accuracy_vs_sparsity.png")
    fig.tight_layout()
    fig.savefig(made[-1], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    # one line per method and sparsity, the mean over its seeds at rounds that all
    # evaluated (a line per run is unreadable past a few runs)
    curves: dict[tuple, list[dict]] = {}
    for run, row in zip(runs, rows, strict=True):
        pts = {r["round"]: (r["cum_bytes_up"], r["eval"]["accuracy"])
               for r in run["rounds"] if r.get("eval", {}).get("accuracy") is not None}
        if pts:
            curves.setdefault((_label(row), row["sparsity"]), []).append(pts)
    colours = {label: f"C{i}" for i, label in
               enumerate(sorted({label for label, _ in curves}))}
    styles = ["-", "--", "-.", ":", (0, (1, 3))]
    for (label, sparsity), runs_pts in sorted(curves.items()):
        common = sorted(set.intersection(*(set(p) for p in runs_pts)))
        xs = [sum(p[k][0] for p in runs_pts) / len(runs_pts) / 1e6 for k in common]
        ys = [sum(p[k][1] for p in runs_pts) / len(runs_pts) for k in common]
        seeds = f", {len(runs_pts)} seeds" if len(runs_pts) > 1 else ""
        ax.plot(xs, ys, color=colours[label],
                linestyle=styles[levels.index(sparsity) % len(styles)],
                label=f"{label} {100 * sparsity:g} %{seeds}")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink (MB)")
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy vs cumulative uplink (mean over seeds)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    made.append(folder / "accuracy_vs_uplink.png")
    fig.tight_layout()
    fig.savefig(made[-1], dpi=120)
    plt.close(fig)
    return made


def run(args) -> int:
    runs = [load_run(p) for p in expand(args.runs)]
    rows = [summarize(r) for r in runs]
    print(table(rows))
    over_seeds = seed_table(rows)
    if over_seeds:
        print()
        print(over_seeds)
    if args.plots:
        for path in plots(runs, rows, Path(args.plots)):
            print(f"wrote {path}")
    return 0
