"""``sparsefedpp bench`` results: rows with ratios ours/PyTorch, targets, tables.

Time ratios are paired: the median over turns of median(ours) / median(torch) in
the same turn (``bench.timing``), with the spread over the turns; the rows keep
the raw per-turn times so a tool can recompute any statistic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .timing import ratio_spread, turn_ratios


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
        strict = self.text.startswith("<") and not self.text.startswith("<=")
        met = value < self.limit if strict else value <= self.limit
        return "met" if met else "missed"


#: issue 15 (dense steps no slower than PyTorch, dense ResNet-18 memory, warm
#: start); ResNet-8's memory ratio is issue 8's
TARGETS = {
    ("resnet8", "train_step_ms"): Target("ratio", 1.0, "<= 1.0x"),
    ("resnet18", "train_step_ms"): Target("ratio", 1.0, "<= 1.0x"),
    ("resnet8", "inference_ms"): Target("ratio", 1.0, "<= 1.0x"),
    ("resnet18", "inference_ms"): Target("ratio", 1.0, "<= 1.0x"),
    ("resnet8", "peak_rss_train_mb"): Target("ratio", 0.5, "<= 0.5x"),
    ("resnet18", "peak_rss_train_mb"): Target("ratio", 0.6, "<= 0.6x"),
    ("resnet8", "first_step_process_s"): Target("ours", 3.0, "< 3 s"),
}
#: issue 15, ``bench-sparse``: our train step at sparsity S / PyTorch's dense step
SPARSE_TARGETS = {
    ("resnet8", 0.0): Target("ratio", 1.0, "<= 1.0x"),
    ("resnet18", 0.0): Target("ratio", 1.0, "<= 1.0x"),
    ("resnet8", 0.99): Target("ratio", 0.4, "<= 0.4x"),
    ("resnet18", 0.99): Target("ratio", 0.2, "<= 0.2x"),
    ("resnet18", 0.999): Target("ratio", 0.1, "<= 0.1x"),
}
#: issue 15, ``bench-memory``: peak RSS of one local round (MB, ``ours``), and
#: dense ResNet-18 against PyTorch's round (``ratio``)
MEMORY_TARGETS = {
    ("resnet18", 0.99): Target("ours", 250.0, "<= 250 MB"),
    ("resnet8", 0.99): Target("ours", 165.0, "<= 165 MB"),
    ("resnet18", 0.0): Target("ratio", 0.6, "<= 0.6x torch"),
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
    #: paired time ratios: ratio_min/max/q1/q3, turns; and the raw per-turn times
    #: (ours_turns_ms, torch_turns_ms) and ratios (turn_ratios)
    spread: dict = field(default_factory=dict)

    def record(self) -> dict:
        """The fields of a JSON-lines ``bench`` event."""
        out = asdict(self)
        del out["label"]
        out.update(out.pop("spread"))
        return out


def paired_stats(ours_turns: list[list[float]], torch_turns: list[list[float]]) -> dict:
    """The spread fields of a row timed in turns (``Row.spread``)."""
    ratios = turn_ratios(ours_turns, torch_turns)
    return {**ratio_spread(ratios), "turn_ratios": ratios,
            "ours_turns_ms": ours_turns, "torch_turns_ms": torch_turns}


def make_row(model: str, metric: str, label: str, ours, torch,
             paired: tuple | None = None, target: Target | None = None) -> Row:
    """A row; ``paired`` = (ours turns, torch turns) makes the ratio the paired median."""
    spread = {}
    if paired is not None and paired[0] and paired[1]:
        spread = paired_stats(*paired)
        ratio = spread.pop("ratio")
    else:
        ratio = ours / torch if ours is not None and torch else None
        if paired is not None and paired[0]:
            spread = {"ours_turns_ms": paired[0]}
    target = target or TARGETS.get((model, metric))
    return Row(model, metric, label, ours, torch, ratio,
               target.text if target else None,
               target.verdict(ours, ratio) if target else None, spread)


#: metrics timed in turns, and the worker operation behind each
PAIRED = {"train_step_ms": "train", "inference_ms": "infer"}


def build_rows(results: dict, models: tuple[str, ...], turns: dict | None = None
               ) -> list[Row]:
    """Rows from worker records keyed ``(framework, task, model)`` and per-turn
    times keyed ``(framework, op, model)`` (``take_turns`` lists).

    A missing record (not run, failed, or torch absent) gives ``None`` values.
    """
    turns = turns or {}
    def value(framework, task, model, get):
        record = results.get((framework, task, model))
        return get(record) if record is not None else None

    rows = []
    for model in models:
        for metric, label, task, get in MODEL_METRICS:
            paired = None
            if metric in PAIRED:
                op = PAIRED[metric]
                paired = (turns.get(("ours", op, model)), turns.get(("torch", op, model)))
            rows.append(make_row(model, metric, label, value("ours", task, model, get),
                                 value("torch", task, model, get), paired))
    for metric, label, task, get in FIRST_STEP_METRICS:
        model = FIRST_STEP_MODEL
        rows.append(make_row(model, metric, label, value("ours", task, model, get),
                             value("torch", task, model, get)))
    return rows


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def format_ratio(ratio: float | None, spread: dict) -> str:
    """``2.41x [2.10-2.90]``: the paired median and its min-max over the turns."""
    if ratio is None:
        return "-"
    if "ratio_min" in spread:
        return f"{ratio:.2f}x [{spread['ratio_min']:.2f}-{spread['ratio_max']:.2f}]"
    return f"{ratio:.2f}x"


def _cells(row: Row) -> list[str]:
    return [row.model, row.label, _num(row.ours), _num(row.torch),
            format_ratio(row.ratio, row.spread), row.target or "", row.verdict or ""]


HEADER = ["model", "metric", "ours", "torch", "ours/torch [min-max]", "target",
          "verdict"]


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
