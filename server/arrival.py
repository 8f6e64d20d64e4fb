"""What the aggregator checks of an update once it has arrived and decoded: the
method, the tensors against the global model (runtime/wire/checks.py), the example
count, the metrics and the norm of the change. One call, ``update_problem``, on
arrival; everything after it trusts the update (docs/protocol.md, "What is
validated")."""

from __future__ import annotations

import math

import numpy as np
from sparsefedpp.runtime.wire import codec
from sparsefedpp.runtime.wire.checks import tensors_problem

Tensors = dict[str, np.ndarray]
# An update's metrics (codec meta): small, flat, finite. fedavg averages the
# numbers weighted by num_examples, so each must stay far from float overflow.
MAX_METRICS = 64
MAX_METRIC_KEY = 64
MAX_METRIC_VALUE = 1e15
MAX_METRIC_TEXT = 256


def _number_text(value) -> str:
    if isinstance(value, int) and abs(value) > 10**20:
        return f"an integer of {value.bit_length()} bits"
    return f"{value!r:.40}"


def metrics_problem(meta: dict) -> str:
    """Why an update's metrics (codec meta) are unusable ('' if they are): at most
    ``MAX_METRICS`` keys of at most ``MAX_METRIC_KEY`` characters, each value a
    number within +-``MAX_METRIC_VALUE``, true/false, null or a short string.
    ``{"loss": 10**400}`` is valid JSON whose float() overflows."""
    if len(meta) > MAX_METRICS:
        return f"metrics: expected at most {MAX_METRICS} entries, got {len(meta)}"
    for key, value in meta.items():
        if len(key) > MAX_METRIC_KEY:
            return (f"metrics key {key[:20]!r}...: expected at most {MAX_METRIC_KEY} "
                    f"characters, got {len(key)}")
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            if not abs(value) <= MAX_METRIC_VALUE:  # also False for NaN
                return (f"metrics {key!r}: expected a finite number within "
                        f"+-{MAX_METRIC_VALUE:g}, got {_number_text(value)}")
        elif isinstance(value, str):
            if len(value) > MAX_METRIC_TEXT:
                return (f"metrics {key!r}: expected a string of at most "
                        f"{MAX_METRIC_TEXT} characters, got {len(value)}")
        else:
            return (f"metrics {key!r}: expected a number, true/false, null or a "
                    f"string, got {type(value).__name__}")
    return ""


def update_problem(msg: codec.Message, reference: Tensors, *, max_examples: int,
                   max_norm: float | None, method: str | None = None,
                   declared: int | None = None) -> str:
    """Why a decoded update cannot be averaged into ``reference`` ('' if it can):
    the method (the announced ``method``), the tensors (``tensors_problem``),
    the example count (at most ``max_examples``, and at most what the device
    ``declared`` at registration), the metrics and the L2 norm of the change
    against the global model."""
    if method is not None and msg.method != method:
        return f"method {msg.method[:40]!r}: expected the announced {method!r}"
    problem = tensors_problem(msg.tensors, reference, max_integer=None)
    if problem:
        return problem
    n = msg.num_examples
    if declared is not None and declared < max_examples:
        if not 1 <= n <= declared:
            return (f"num_examples: expected 1 to {declared} (the count it declared "
                    f"online), got {n}")
    elif not 1 <= n <= max_examples:
        return f"num_examples: expected 1 to {max_examples}, got {n}"
    problem = metrics_problem(msg.meta)
    if problem:
        return problem
    if max_norm is not None:
        sq = sum(float(np.sum((msg.tensors[k].astype(np.float64) - ref) ** 2))
                 for k, ref in reference.items() if ref.dtype.kind == "f")
        if math.sqrt(sq) > max_norm:
            return f"update norm {math.sqrt(sq):.4g} exceeds max_update_norm {max_norm:g}"
    return ""
