"""``sparsefedpp bench`` results: rows with ratios ours/PyTorch, targets, tables."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Target:
    """A target of the issue: on the ratio ours/torch (``<=``) or on ours (``<``)."""

    on: str  # "ratio" or "ours"
    limit: float
    text: str

    def verdict(self, ours: float | None, ratio: float | None) -> str:
        value = ratio if self.on == "ratio" else ours
        if value is None:
            return "n/a"
        met = value <= self.limit if self.on == "ratio" else value < self.limit
        return "met" if met else "missed"


TARGETS = {
    ("resnet8", "train_step_ms"): Target("ratio", 1.0, "<= 1.0x"),
    ("resnet8", "peak_rss_train_mb"): Target("ratio", 0.5, "<= 0.5x"),
    ("resnet8", "first_step_process_s"): Target("ours", 3.0, "< 3 s"),
}


def _median(key):
    return lambda r: float(np.median(r[key]))


def _p90(key):
    return lambda r: float(np.percentile(r[key], 90))


def _field(key):
    return lambda r: float(r[key]) if r.get(key) is not None else None


#: (metric, label, worker task, value from the worker record), per model
MODEL_METRICS = (
    ("train_step_ms", "train step (ms)", "speed", _median("train_ms")),
    ("train_step_p90_ms", "train step p90 (ms)", "speed", _p90("train_ms")),
    ("inference_ms", "inference (ms)", "speed", _median("infer_ms")),
    ("inference_p90_ms", "inference p90 (ms)", "speed", _p90("infer_ms")),
    ("peak_rss_train_mb", "peak RSS, train (MB)", "rss", _field("peak_rss_mb")),
    ("rss_after_import_mb", "RSS after import (MB)", "rss",
     _field("rss_after_import_mb")),
)
#: the same for the first-step workers (ResNet-8 only); wall_s is the parent's clock
FIRST_STEP_METRICS = (
    ("first_step_process_s", "first step, new process (s)", "first-step",
     _field("wall_s")),
    ("first_step_in_process_s", "first step, in-process (s)", "first-step",
     _field("in_process_s")),
)
FIRST_STEP_MODEL = "resnet8"


@dataclass(frozen=True)
class Row:
    """One line of the table; ``None`` means not measured (or the worker failed)."""

    model: str
    metric: str
    label: str
    ours: float | None
    torch: float | None
    ratio: float | None
    target: str | None
    verdict: str | None

    def record(self) -> dict:
        """The fields of a JSON-lines ``bench`` event."""
        out = asdict(self)
        del out["label"]
        return out


def make_row(model: str, metric: str, label: str, ours, torch) -> Row:
    ratio = ours / torch if ours is not None and torch else None
    target = TARGETS.get((model, metric))
    return Row(model, metric, label, ours, torch, ratio,
               target.text if target else None,
               target.verdict(ours, ratio) if target else None)


def build_rows(results: dict, models: tuple[str, ...]) -> list[Row]:
    """Rows from worker records keyed ``(framework, task, model)``.

    A missing record (not run, failed, or torch absent) gives ``None`` values.
    """
    def value(framework, task, model, get):
        record = results.get((framework, task, model))
        return get(record) if record is not None else None

    rows = []
    for model in models:
        for metric, label, task, get in MODEL_METRICS:
            rows.append(make_row(model, metric, label, value("ours", task, model, get),
                                 value("torch", task, model, get)))
    for metric, label, task, get in FIRST_STEP_METRICS:
        model = FIRST_STEP_MODEL
        rows.append(make_row(model, metric, label, value("ours", task, model, get),
                             value("torch", task, model, get)))
    return rows


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def _cells(row: Row) -> list[str]:
    ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
    return [row.model, row.label, _num(row.ours), _num(row.torch), ratio,
            row.target or "", row.verdict or ""]


HEADER = ["model", "metric", "ours", "torch", "ours/torch", "target", "verdict"]


def format_text(rows: list[Row]) -> str:
    """A fixed-width table, numbers right-aligned."""
    table = [HEADER] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    out = []
    for line in table:
        cells = [c.ljust(w) if i < 2 or i > 4 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def format_markdown(rows: list[Row]) -> str:
    """A GitHub markdown table (for the README)."""
    out = ["| " + " | ".join(HEADER) + " |",
           "|---|---|---:|---:|---:|---|---|"]
    for row in rows:
        out.append("| " + " | ".join(_cells(row)) + " |")
    return "\n".join(out)
