"""``sparsefedpp report RUNS...``: a markdown table (and PNG figures) of simulate runs.

Each RUN is a simulate output folder or its metrics.jsonl. The table has one row
per run: method, sparsity, rounds, final accuracy, accuracy after one-shot
pruning, uplink bytes and wall time. With matplotlib installed (the ``plot``
extra) and ``--plots DIR``: accuracy vs sparsity per method (the seed paper's
Fig. 1) and accuracy vs cumulative uplink bytes.
"""

from __future__ import annotations

from pathlib import Path

from sparsefedpp.runtime.errors import ConfigError

from .metrics import read_metrics


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="table and figures from simulate runs",
                       description="Summarise simulate runs as a markdown table; "
                       "with --plots, also PNG figures (needs matplotlib).")
    p.add_argument("runs", nargs="+", help="simulate output folders or metrics.jsonl")
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


def summarize(run: dict) -> dict:
    c = run["config"]
    evals = [r for r in run["rounds"] if r.get("eval")]
    final = run["end"]["final"] if run["end"] else (evals[-1]["eval"] if evals else {})
    last = run["rounds"][-1] if run["rounds"] else {}
    return {
        "method": c["method"], "sparsity": c["sparsity"], "model": c["model"],
        "width": c["width"], "rounds": len(run["rounds"]), "of": c["rounds"],
        "lda_alpha": c["lda_alpha"], "accuracy": final.get("accuracy"),
        "pruned": {k.split("@")[1]: v for k, v in final.items()
                   if k.startswith("accuracy@")},
        "cum_up": last.get("cum_bytes_up", 0),
        "up_per_client": (last.get("bytes_up", 0) / max(1, len(last.get("clients", [])))),
        "seconds": run["end"]["elapsed_seconds"] if run["end"] else None,
        "finished": run["end"] is not None,
    }


def table(rows: list[dict]) -> str:
    levels = sorted({k for r in rows for k in r["pruned"]}, key=float)
    head = ["method", "sparsity", "model", "rounds", "accuracy",
            *(f"acc @{k}" for k in levels), "upload/client", "total up", "wall"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r["method"], r["sparsity"])):
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        rounds = f"{r['rounds']}/{r['of']}" + ("" if r["finished"] else " (unfinished)")
        cells = [r["method"], f"{r['sparsity']:g}", f"{r['model']} x{r['width']:g}",
                 rounds, acc,
                 *(f"{r['pruned'][k]:.4f}" if k in r["pruned"] else "-" for k in levels),
                 f"{r['up_per_client'] / 1e3:.1f} kB", f"{r['cum_up'] / 1e6:.2f} MB",
                 "-" if r["seconds"] is None else f"{r['seconds'] / 60:.1f} min"]
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
    for method in sorted({r["method"] for r in rows}):
        pts = sorted((r["sparsity"], r["accuracy"]) for r in rows
                     if r["method"] == method and r["accuracy"] is not None)
        if pts:
            ax.plot([levels.index(s) for s, _ in pts], [a for _, a in pts], "o-",
                    label=method)
    ax.set_xticks(range(len(levels)), [f"{100 * s:g}" for s in levels])
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy vs sparsity")
    ax.legend()
    ax.grid(alpha=0.3)
    made.append(folder / "accuracy_vs_sparsity.png")
    fig.tight_layout()
    fig.savefig(made[-1], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for run, row in zip(runs, rows, strict=True):
        pts = [(r["cum_bytes_up"], r["eval"]["accuracy"]) for r in run["rounds"]
               if r.get("eval", {}).get("accuracy") is not None]
        if pts:
            ax.plot([b / 1e6 for b, _ in pts], [a for _, a in pts], ".-",
                    label=f"{row['method']} {row['sparsity']:g}")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink (MB)")
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy vs uplink bytes")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    made.append(folder / "accuracy_vs_uplink.png")
    fig.tight_layout()
    fig.savefig(made[-1], dpi=120)
    plt.close(fig)
    return made


def run(args) -> int:
    runs = [load_run(p) for p in args.runs]
    rows = [summarize(r) for r in runs]
    print(table(rows))
    if args.plots:
        for path in plots(runs, rows, Path(args.plots)):
            print(f"wrote {path}")
    return 0
