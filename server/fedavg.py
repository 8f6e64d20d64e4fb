"""FedAvg over sparse client models, with seeded client sampling, a quorum and an
optional magnitude pruning of the global model (SparseFedPP's downlink)."""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Mapping

import numpy as np
from sparsefedpp.runtime.errors import ConfigError, DTypeError, ShapeError
from sparsefedpp.runtime.pruning import SCOPES, nonzeros, prune

from .aggregate import Accumulator
from .strategy import ClientInstruction, ClientResult, Strategy

logger = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]


def _check_int(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"FedAvg {what}: expected an integer >= {minimum}, "
                          f"got {value!r}")
    if value < minimum:
        raise ConfigError(f"FedAvg {what}: expected an integer >= {minimum}, "
                          f"got {value}")
    return int(value)


def _check_fraction(value: object, what: str, *, allow_one: bool) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        f = math.nan
    ok = 0.0 <= f <= 1.0 if allow_one else 0.0 <= f < 1.0  # NaN fails both
    if not ok:
        bounds = "[0, 1]" if allow_one else "[0, 1)"
        raise ConfigError(f"FedAvg {what}: expected a sparsity in {bounds}, "
                          f"got {value!r}")
    return f


def _check_callable(value: object, what: str) -> None:
    if value is not None and not callable(value):
        raise ConfigError(f"FedAvg {what}: expected a callable or None, got {value!r}")


def _result_problem(result: ClientResult) -> str:
    """Why a result cannot be averaged ('' if it can)."""
    n = result.num_examples
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        return f"num_examples: expected an integer >= 1, got {n!r}"
    for name, arr in result.tensors.items():
        a = np.asarray(arr)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            return f"tensor '{name}' holds NaN or inf (training diverged?)"
    return ""


def _fit_metrics(results: list[ClientResult]) -> dict[str, float]:
    """Numeric client metrics averaged with the num_examples weights."""
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    for r in results:
        for key, value in r.metrics.items():
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                sums[key] = sums.get(key, 0.0) + float(value) * r.num_examples
                weights[key] = weights.get(key, 0) + r.num_examples
    return {key: sums[key] / weights[key] for key in sums}


class FedAvg(Strategy):
    """Federated averaging weighted by sample counts (McMahan et al., 2017).

    Sampling: round ``rnd`` draws ``min(per_round, len(available))`` distinct
    clients from the sorted, de-duplicated ``available`` ids with
    ``np.random.default_rng((seed, rnd))``, so the draw depends only on
    (seed, rnd, the set of available ids). With fewer than ``min_clients``
    available, ``configure_round`` returns [] (the round is skipped).

    Aggregation: results with a repeated client id (kept: the first), fewer than
    one example, NaN/inf tensors or names/shapes/dtypes that do not match the
    reference are counted as failures and logged; the rest go through
    :class:`~sparsefedpp.server.aggregate.Accumulator` (float32 out, float64
    sums; integer buffers rounded half up). Fewer than ``min_clients`` usable
    results: ``aggregate`` logs why and returns None (keep the old model).

    Parameters
    ----------
    per_round : int
        Clients sampled per round, >= 1.
    min_clients : int
        Quorum, 1 <= min_clients <= per_round.
    seed : int
        Seeds the client sampling, >= 0.
    round_config : callable, optional
        ``round_config(rnd) -> dict`` merged into every instruction's config
        after ``{"round": rnd}`` (e.g. that round's learning rate).
    prune_to : float, optional
        After aggregation, magnitude-prune the conv/linear weights to this sparsity
        in [0, 1), so the downlink model is sparse: all together (``prune_scope``
        "global", SparseFedPP and Top-k) or each layer on its own ("layer",
        ZeroFL's per-layer top-k). BatchNorm tensors and biases are not pruned.
        Needs ``prune_model``.
    prune_model : runtime Model, optional
        Scratch model of the clients' architecture, used for pruning via
        ``load_state_dict``/``state_dict`` and ``runtime.pruning.prune``; its
        tensors are overwritten. When given, its names/shapes are the reference
        that client results must match.
    evaluate_fn : callable, optional
        ``evaluate_fn(tensors) -> dict`` of metrics of a global model (the
        simulation injects it; the server does not import the trainer).
    eval_sparsities : tuple of float
        One-shot global pruning levels in [0, 1] at which ``evaluate`` also
        scores a pruned copy; keys become ``f"{key}@{sparsity:g}"``, e.g.
        ``"accuracy@0.99"``, plus ``"nonzeros@0.99"`` (per-layer counts). Needs
        ``evaluate_fn`` and ``prune_model``.

    Attributes
    ----------
    last_round : dict
        Summary of the last ``aggregate``: round, num_results, num_failures,
        num_examples, failures [(client_id, reason)], fit_metrics (the clients'
        numeric metrics averaged by num_examples).
    """

    def __init__(self, *, per_round: int, min_clients: int = 1, seed: int = 0,
                 round_config: Callable[[int], dict] | None = None,
                 prune_to: float | None = None, prune_scope: str = "global",
                 prune_model=None,
                 evaluate_fn: Callable[[Tensors], dict] | None = None,
                 eval_sparsities: tuple = ()) -> None:
        self.per_round = _check_int(per_round, "per_round", 1)
        self.min_clients = _check_int(min_clients, "min_clients", 1)
        if self.min_clients > self.per_round:
            raise ConfigError(f"FedAvg min_clients: expected at most per_round = "
                              f"{self.per_round}, got {self.min_clients}")
        self.seed = _check_int(seed, "seed", 0)
        _check_callable(round_config, "round_config")
        _check_callable(evaluate_fn, "evaluate_fn")
        self.round_config = round_config
        self.evaluate_fn = evaluate_fn
        self.prune_to = (None if prune_to is None
                         else _check_fraction(prune_to, "prune_to", allow_one=False))
        if prune_scope not in SCOPES:
            raise ConfigError(f"FedAvg prune_scope: expected one of {SCOPES}, got "
                              f"{prune_scope!r}")
        self.prune_scope = prune_scope
        self.eval_sparsities = tuple(
            _check_fraction(s, "eval_sparsities", allow_one=True)
            for s in eval_sparsities)
        if len({f"{s:g}" for s in self.eval_sparsities}) != len(self.eval_sparsities):
            raise ConfigError(f"FedAvg eval_sparsities: expected distinct levels, got "
                              f"{self.eval_sparsities}")
        if self.eval_sparsities and evaluate_fn is None:
            raise ConfigError("FedAvg eval_sparsities: expected an evaluate_fn too, "
                              "got none")
        needs_model = self.prune_to is not None or self.eval_sparsities
        if prune_model is not None and not all(
                hasattr(prune_model, a) for a in ("load_state_dict", "state_dict")):
            raise ConfigError(f"FedAvg prune_model: expected a runtime Model, got "
                              f"{type(prune_model).__name__}")
        if needs_model and prune_model is None:
            raise ConfigError("FedAvg prune_model: expected a model to prune with "
                              "(prune_to or eval_sparsities is set), got None; pass "
                              "models.build(...) of the clients' architecture")
        self.prune_model = prune_model
        self.last_round: dict = {}

    # ------------------------------------------------------------------ rounds
    def configure_round(self, rnd: int,
                        available: list[str]) -> list[ClientInstruction]:
        """Sample this round's clients (see the class docstring).

        Every config is ``{"round": rnd, **round_config(rnd)}``.
        """
        rnd = _check_int(rnd, "round", 0)
        ids = sorted(set(available))
        if len(ids) < self.min_clients:
            logger.warning("round %d: %d clients available, expected at least "
                           "min_clients=%d; skipping the round", rnd, len(ids),
                           self.min_clients)
            return []
        rng = np.random.default_rng((self.seed, rnd))
        chosen = rng.choice(len(ids), size=min(self.per_round, len(ids)), replace=False)
        extra = {} if self.round_config is None else self.round_config(rnd)
        if not isinstance(extra, Mapping):
            raise ConfigError(f"FedAvg round_config({rnd}): expected a dict, got "
                              f"{type(extra).__name__}")
        return [ClientInstruction(ids[i], {"round": rnd, **extra}) for i in chosen]

    def _usable(self, results: list[ClientResult],
                failed: list[tuple[str, str]]) -> list[ClientResult]:
        usable, seen = [], set()
        for r in results:
            problem = ("duplicate result (kept the first)" if r.client_id in seen
                       else _result_problem(r))
            seen.add(r.client_id)
            if problem:
                failed.append((r.client_id, problem))
            else:
                usable.append(r)
        return usable

    def _keep_old(self, rnd: int, num_ok: int, failed: list[tuple[str, str]]) -> None:
        logger.warning("round %d: %d usable results, expected at least min_clients=%d;"
                       " keeping the previous global model; failures: %s", rnd, num_ok,
                       self.min_clients, failed)
        self.last_round = {"round": rnd, "num_results": num_ok,
                           "num_failures": len(failed), "num_examples": 0,
                           "failures": failed, "fit_metrics": {}, "aggregated": False}

    def aggregate(self, rnd: int, results: list[ClientResult],
                  failures: list[tuple[str, str]]) -> Tensors | None:
        """FedAvg of the usable results, then pruning to ``prune_to`` if set.

        Returns None (keep the previous global model) when fewer than
        ``min_clients`` results are usable; the reason is logged.
        """
        failed = list(failures)
        usable = self._usable(results, failed)
        if len(usable) < self.min_clients:
            self._keep_old(rnd, len(usable), failed)
            return None
        like = None if self.prune_model is None else self.prune_model.state_dict()
        acc, added = Accumulator(like), []
        for r in usable:
            try:
                acc.add(r.tensors, r.num_examples)
            except (ShapeError, DTypeError) as err:
                failed.append((r.client_id, str(err)))
                logger.warning("round %d: result of %s rejected: %s", rnd,
                               r.client_id, err)
            else:
                added.append(r)
        if len(added) < self.min_clients:
            self._keep_old(rnd, len(added), failed)
            return None
        tensors = acc.result()
        if self.prune_to is not None:
            tensors, _ = self._pruned(tensors, self.prune_to, self.prune_scope)
        self.last_round = {"round": rnd, "num_results": len(added),
                           "num_failures": len(failed),
                           "num_examples": acc.total_weight, "failures": failed,
                           "fit_metrics": _fit_metrics(added), "aggregated": True}
        return tensors

    def _pruned(self, tensors: Tensors, sparsity: float,
                scope: str = "global") -> tuple[Tensors, dict]:
        """A copy of ``tensors`` magnitude-pruned to ``sparsity`` (global or per-layer
        scope), and the nonzero count per conv/linear layer."""
        self.prune_model.load_state_dict(tensors)
        counts = prune(self.prune_model, sparsity, scope)
        state = self.prune_model.state_dict()
        return {name: state[name] for name in tensors}, counts

    def evaluate(self, rnd: int, tensors: Tensors) -> dict | None:
        """``evaluate_fn(tensors)``, plus its metrics at every ``eval_sparsities``
        level under the key suffix ``@<sparsity>``; None without an evaluate_fn."""
        if self.evaluate_fn is None:
            return None
        metrics = dict(self.evaluate_fn(tensors))
        if self.prune_model is not None:
            self.prune_model.load_state_dict(tensors)
            metrics.setdefault("nonzeros", nonzeros(self.prune_model))
        for s in self.eval_sparsities:
            pruned, counts = self._pruned(tensors, s)
            for key, value in self.evaluate_fn(pruned).items():
                metrics[f"{key}@{s:g}"] = value
            metrics.setdefault(f"nonzeros@{s:g}", counts)
        logger.info("round %d: evaluated %s", rnd, sorted(metrics))
        return metrics
