"""Update screening and robust aggregators: one hostile update must not move the
global model far (issue 14).

An update is a client's whole model; its change is ``delta_i = model_i - global``.
Screening bounds ``||delta_i||`` by a multiple of the round's median change and of
the global model's own norm. The robust aggregators combine the deltas so that a
single outlier has a bounded effect: norm clipping (each delta scaled down to the
median norm, then the weighted mean), the coordinate-wise trimmed mean and the
coordinate-wise median (both unweighted: a weight is a claim the device makes).
Work is per tensor: memory is one tensor times the clients, in float64. Integer
buffers (``num_batches_tracked``) always take FedAvg's rounded weighted mean.

Pure functions; no logging, no I/O.
"""

from __future__ import annotations

import math

import numpy as np
from sparsefedpp.runtime.errors import ConfigError

from .aggregate import Accumulator

Tensors = dict[str, np.ndarray]

AGGREGATORS = ("fedavg", "clip", "trimmed-mean", "median")


def float_names(reference: Tensors) -> list[str]:
    return [n for n, a in reference.items() if np.asarray(a).dtype.kind == "f"]


def delta_norm(tensors: Tensors, reference: Tensors) -> float:
    """L2 norm of ``tensors - reference`` over the float tensors, in float64 (a
    float32 value squared stays below 1.2e77, so x1e30 updates do not overflow)."""
    sq = 0.0
    for name in float_names(reference):
        d = np.subtract(tensors[name], reference[name], dtype=np.float64)
        sq += float(np.dot(d.reshape(-1), d.reshape(-1)))
    return math.sqrt(sq)


def model_norm(tensors: Tensors) -> float:
    """L2 norm of the float tensors, in float64."""
    sq = 0.0
    for name in float_names(tensors):
        a = np.asarray(tensors[name], dtype=np.float64).reshape(-1)
        sq += float(np.dot(a, a))
    return math.sqrt(sq)


def screen(norms: list[float], global_norm: float, *, median_ratio: float,
           global_ratio: float, min_for_median: int = 3) -> tuple[float, list[str]]:
    """The norm bound of a round and, per update, why it is rejected ('' if kept).

    ``bound = min(median_ratio * median(norms), global_ratio * global_norm)``; the
    median term needs ``min_for_median`` updates (one or two updates have no
    meaningful median) and a ratio of 0 turns its term off. The median is over the
    finite norms; an update is rejected when its norm is not finite or exceeds
    the bound; ``bound`` is inf when no term applies.
    """
    bound = math.inf
    finite = [n for n in norms if math.isfinite(n)]
    median = float(np.median(finite)) if finite else math.nan
    if median_ratio > 0 and len(finite) >= min_for_median:
        bound = min(bound, median_ratio * median)
    if global_ratio > 0:
        bound = min(bound, global_ratio * global_norm)
    reasons = []
    for n in norms:
        if not (math.isfinite(n) and n <= bound):
            what = (f"{n / median:.3g} x the round's median {median:.4g}"
                    if median > 0 else f"median {median:.4g}")
            reasons.append(f"update norm {n:.4g} exceeds the bound {bound:.4g} "
                           f"({what}; global model norm {global_norm:.4g})")
        else:
            reasons.append("")
    return bound, reasons


def trim_count(n: int, trim: float) -> int:
    """Updates dropped at each end of every coordinate: ceil(trim * n), leaving at
    least one (so 1-2 updates are not trimmed and 3 with trim > 0 give the median)."""
    return min(math.ceil(round(trim * n, 9)), (n - 1) // 2)


def check_aggregator(name: object, trim: object) -> tuple[str, float]:
    if name not in AGGREGATORS:
        raise ConfigError(f"aggregator: expected one of {', '.join(AGGREGATORS)}, got "
                          f"{name!r}")
    try:
        t = float(trim)
    except (TypeError, ValueError):
        t = math.nan
    if not 0.0 <= t < 0.5:
        raise ConfigError(f"trim: expected the fraction of updates trimmed at each end "
                          f"of a coordinate, in [0, 0.5), got {trim!r}")
    return str(name), t


def _integer_mean(reference: Tensors, results: list[tuple[Tensors, int]]) -> Tensors:
    names = [n for n in reference if n not in set(float_names(reference))]
    if not names:
        return {}
    acc = Accumulator({n: np.asarray(reference[n]) for n in names})
    for tensors, weight in results:
        acc.add({n: tensors[n] for n in names}, weight)
    return acc.result()


def robust_mean(aggregator: str, reference: Tensors,
                results: list[tuple[Tensors, int]], *, trim: float = 0.1,
                norms: list[float] | None = None) -> Tensors:
    """The next global model from screened ``results`` [(tensors, num_examples)].

    ``clip``: ``global + sum_i w_i c_i delta_i / sum_i w_i`` with
    ``c_i = min(1, median(norms) / norms[i])``. ``trimmed-mean``: per coordinate,
    the mean of the values left after dropping the ``trim_count`` smallest and
    largest. ``median``: per coordinate, the median. Float tensors come out float32,
    integer tensors as FedAvg's rounded weighted mean; names in ``reference``'s
    order. ``norms`` are the updates' delta norms (computed when None).
    """
    if aggregator not in AGGREGATORS[1:]:
        raise ConfigError(f"robust_mean: expected one of {AGGREGATORS[1:]}, got "
                          f"{aggregator!r}")
    if not results:
        raise ConfigError("robust_mean: expected at least one update, got none")
    out = _integer_mean(reference, results)
    if aggregator == "clip":
        if norms is None:
            norms = [delta_norm(t, reference) for t, _ in results]
        median = float(np.median(norms))
        scale = [1.0 if n <= median else median / n for n in norms]
        total = sum(w for _, w in results)
        if total <= 0:
            raise ConfigError("robust_mean: expected a positive total weight, got 0")
    k = trim_count(len(results), trim)
    for name in float_names(reference):
        g = np.asarray(reference[name], dtype=np.float64)
        if aggregator == "clip":
            step = np.zeros(g.shape, np.float64)
            for (tensors, w), c in zip(results, scale, strict=True):
                if w and c:
                    step += (w * c) * np.subtract(tensors[name], g, dtype=np.float64)
            value = g + step / total
        else:
            stack = np.stack([np.asarray(t[name], dtype=np.float64)
                              for t, _ in results])
            if aggregator == "median":
                value = np.median(stack, axis=0)
            else:
                stack.sort(axis=0)
                value = stack[k:len(results) - k].mean(axis=0)
        out[name] = np.asarray(value).astype(np.float32)
    return {name: out[name] for name in reference}
