"""FedAvg over sparse client models, with seeded client sampling, a quorum, update
screening (a norm bound on each update's change), an optional robust aggregator
an optional magnitude pruning of the global model (ours, not the reference's: off
unless ``prune_to``), and evaluation of the global model as is and of a copy pruned
to the method's sparsity (the seed's "accuracy at S")."""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Mapping

import numpy as np
from sparsefedpp.runtime.errors import ConfigError, DTypeError, ShapeError
from sparsefedpp.runtime.sparsity.pruning import (
    SCOPES,
    global_sparsity,
    nonzeros,
    prune,
)
from sparsefedpp.runtime.wire.checks import finite_problem, tensors_problem

from . import robust
from .aggregate import Accumulator
from .strategy import AggregateResult, ClientInstruction, ClientResult, Strategy

logger = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]

# Screening defaults, from clean runs (docs/robustness.md): in 20-client
# Fashion-MNIST federations of ResNet-8 (SparseFedPP at 90 %, dense FedAvg) the
# largest update norm was 3.3 x its round's median and 0.67 x the global model's
# norm (round 1 of a sparse method: pruning removes most weights). 10 x leaves a
# 3x and a 15x margin, and x1e3 (let alone x1e30) scaled updates land far above.
SCREEN_MEDIAN = 10.0
SCREEN_GLOBAL = 10.0
# Largest num_examples a result may claim: more than a small board trains on in a
# round (Fashion-MNIST and CIFAR-10 hold 50-60k training images in all); above
# it a result is a failure. The MQTT service also checks it against the device's
# declared count.
MAX_EXAMPLES = 100_000
# Client metrics beyond this magnitude (or non-finite) are ignored.
MAX_METRIC = 1e15


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


def _result_problem(result: ClientResult, max_examples: int) -> str:
    """Why a result cannot be averaged ('' if it can)."""
    n = result.num_examples
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        return f"num_examples: expected an integer >= 1, got {n!r}"
    if n > max_examples:
        return (f"num_examples: expected at most max_examples={max_examples}, got {n}"
                f" (one client would outweigh the others)")
    return finite_problem(result.tensors)


def _metric_value(value: object) -> float | None:
    """A client metric as a float, or None when it is not a finite real number of
    at most MAX_METRIC in magnitude (10**400 would overflow float())."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        f = float(value)
    except (OverflowError, ValueError, TypeError):
        return None
    return f if math.isfinite(f) and abs(f) <= MAX_METRIC else None


def _fit_metrics(results: list[ClientResult]) -> dict[str, float]:
    """Numeric client metrics averaged with the num_examples weights; values that
    are not finite numbers within +-MAX_METRIC are skipped."""
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    for r in results:
        if not isinstance(r.metrics, Mapping):
            continue
        for key, value in r.metrics.items():
            f = _metric_value(value)
            if f is not None and isinstance(key, str):
                sums[key] = sums.get(key, 0.0) + f * r.num_examples
                weights[key] = weights.get(key, 0) + r.num_examples
    return {key: sums[key] / weights[key] for key in sums}


def _check_ratio(value: object, what: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError, OverflowError):
        f = math.nan
    if not (f == 0 or 1 <= f < math.inf):
        raise ConfigError(f"FedAvg {what}: expected 0 (off) or a ratio >= 1, got "
                          f"{value!r}")
    return f


class FedAvg(Strategy):
    """Federated averaging weighted by sample counts (McMahan et al., 2017).

    Sampling: round ``rnd`` draws ``min(per_round, len(available))`` distinct
    clients from the sorted, de-duplicated ``available`` ids with
    ``np.random.default_rng((seed, rnd))``, so the draw depends only on
    (seed, rnd, the set of available ids). With fewer than ``min_clients``
    available, ``configure_round`` returns [] (the round is skipped).

    Aggregation: results with a repeated client id (kept: the first), fewer than
    one or more than ``max_examples`` examples, NaN/inf tensors or names/shapes/
    dtypes that do not match the global model are counted as failures and logged.
    Then screening (:func:`~sparsefedpp.server.robust.screen`): the L2 norm of
    each result's change from the global model must be at most ``screen_median``
    x the round's median change (rounds of 3 or more results) and at most
    ``screen_global`` x the global model's norm; the others are failures too. The
    rest go through :class:`~sparsefedpp.server.aggregate.Accumulator` (float32
    out, float64 sums; integer buffers rounded half up), or through
    :func:`~sparsefedpp.server.robust.robust_mean` for a robust ``aggregator``.
    ``aggregate`` returns an :class:`~sparsefedpp.server.strategy.AggregateResult`
    (the results and examples counted, the failures with their reasons, the
    clients' fit metrics averaged by num_examples, the screening summary: median
    and bound of the round's change norms, the global model's norm, per client
    its norm and ratio to the median). Fewer than ``min_clients`` usable results,
    or a non-finite aggregate: it logs why and its ``tensors`` is None (keep the
    old model).

    The global model that screening compares against is ``initial``, then each
    model ``aggregate`` returns; a round loop that loads a global model from
    elsewhere (a resumed service) passes it to ``set_global``. Until one is known
    (no ``initial``), the first round is not screened.

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
        Needs ``prune_model``. Not what the reference does (its server is plain
        FedAvg of the clients' pruned models); re-pruning the aggregate every
        round compounds the client masks. Default None: no server pruning.
    eval_pruned : float, optional
        The method's sparsity S: ``evaluate_global`` (every evaluated round) also
        scores a copy of the global model pruned globally to S, under the key
        suffix ``_pruned`` (``accuracy_pruned``, ``loss_pruned``,
        ``nonzeros_pruned``). Needs ``evaluate_fn`` and ``prune_model``.
    prune_floor : int
        Every pruning this strategy does (``prune_to``, ``eval_pruned``,
        ``eval_sparsities``) keeps at least min(prune_floor, size) weights per
        layer (``runtime.sparsity.pruning.magnitude_masks`` ``floor``); 0 (default): plain
        global magnitude pruning, the reference's.
    prune_model : runtime Model, optional
        Scratch model of the clients' architecture, used for pruning via
        ``load_state_dict``/``state_dict`` and ``runtime.sparsity.pruning.prune``; its
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
    initial : dict of str to np.ndarray, optional
        The global model the first round's clients start from (copied).
    aggregator : str
        ``"fedavg"`` (weighted mean), ``"clip"`` (each change clipped to the
        median norm, then the weighted mean), ``"trimmed-mean"`` or ``"median"``
        (coordinate-wise, unweighted); the robust ones need ``initial``.
    trim : float
        Trimmed mean: fraction of the results dropped at each end of every
        coordinate, in [0, 0.5) (``robust.trim_count``).
    screen_median, screen_global : float
        Screening ratios (see above), >= 1, or 0 to turn that bound off.
    max_examples : int
        Largest num_examples a result may claim, >= 1.
    """

    def __init__(self, *, per_round: int, min_clients: int = 1, seed: int = 0,
                 round_config: Callable[[int], dict] | None = None,
                 prune_to: float | None = None, prune_scope: str = "global",
                 prune_model=None, eval_pruned: float | None = None,
                 prune_floor: int = 0,
                 evaluate_fn: Callable[[Tensors], dict] | None = None,
                 eval_sparsities: tuple = (), initial: Tensors | None = None,
                 aggregator: str = "fedavg", trim: float = 0.1,
                 screen_median: float = SCREEN_MEDIAN,
                 screen_global: float = SCREEN_GLOBAL,
                 max_examples: int = MAX_EXAMPLES) -> None:
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
        self.eval_pruned = (None if eval_pruned is None
                            else _check_fraction(eval_pruned, "eval_pruned",
                                                 allow_one=False))
        self.prune_floor = _check_int(prune_floor, "prune_floor", 0)
        self.eval_sparsities = tuple(
            _check_fraction(s, "eval_sparsities", allow_one=True)
            for s in eval_sparsities)
        if len({f"{s:g}" for s in self.eval_sparsities}) != len(self.eval_sparsities):
            raise ConfigError(f"FedAvg eval_sparsities: expected distinct levels, got "
                              f"{self.eval_sparsities}")
        for what, wanted in (("eval_sparsities", self.eval_sparsities),
                             ("eval_pruned", self.eval_pruned is not None)):
            if wanted and evaluate_fn is None:
                raise ConfigError(f"FedAvg {what}: expected an evaluate_fn too, "
                                  "got none")
        needs_model = (self.prune_to is not None or self.eval_sparsities
                       or self.eval_pruned is not None)
        if prune_model is not None and not all(
                hasattr(prune_model, a) for a in ("load_state_dict", "state_dict")):
            raise ConfigError(f"FedAvg prune_model: expected a runtime Model, got "
                              f"{type(prune_model).__name__}")
        if needs_model and prune_model is None:
            raise ConfigError("FedAvg prune_model: expected a model to prune with "
                              "(prune_to, eval_pruned or eval_sparsities is set), got "
                              "None; pass "
                              "models.build(...) of the clients' architecture")
        self.prune_model = prune_model
        self.aggregator, self.trim = robust.check_aggregator(aggregator, trim)
        if self.aggregator != "fedavg" and initial is None:
            raise ConfigError(f"FedAvg aggregator {self.aggregator!r}: expected the "
                              f"initial global model too (initial=...), got none")
        self.screen_median = _check_ratio(screen_median, "screen_median")
        self.screen_global = _check_ratio(screen_global, "screen_global")
        self.max_examples = _check_int(max_examples, "max_examples", 1)
        self._global: Tensors | None = None
        if initial is not None:
            self.set_global(initial)

    def set_global(self, tensors: Tensors) -> None:
        """The current global model (copied): what the next round's updates are
        screened against."""
        if not isinstance(tensors, Mapping):
            raise ConfigError(f"FedAvg global model: expected a dict of arrays, got "
                              f"{type(tensors).__name__}")
        self._global = {name: np.array(t) for name, t in tensors.items()}

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
                       else _result_problem(r, self.max_examples))
            seen.add(r.client_id)
            if problem:
                failed.append((r.client_id, problem))
            else:
                usable.append(r)
        return usable

    def _screened(self, rnd: int, usable: list[ClientResult],
                  failed: list[tuple[str, str]]) -> tuple[list[ClientResult], dict]:
        """The results that match the global model and pass the norm bound, their
        change norms, and the round's screening summary."""
        ref = self._global
        matching = []
        for r in usable:
            problem = tensors_problem(r.tensors, ref)
            if problem:
                failed.append((r.client_id, problem))
                logger.warning("round %d: result of %s rejected: %s", rnd,
                               r.client_id, problem)
            else:
                matching.append(r)
        norms = [robust.delta_norm(r.tensors, ref) for r in matching]
        global_norm = robust.model_norm(ref)
        bound, reasons = robust.screen(norms, global_norm,
                                       median_ratio=self.screen_median,
                                       global_ratio=self.screen_global)
        median = float(np.median(norms)) if norms else math.nan
        kept, kept_norms = [], []
        for r, n, reason in zip(matching, norms, reasons, strict=True):
            if reason:
                failed.append((r.client_id, reason))
                logger.warning("round %d: result of %s rejected: %s", rnd,
                               r.client_id, reason)
            else:
                kept.append(r)
                kept_norms.append(n)
        pairs = list(zip([r.client_id for r in matching], norms, strict=True))
        summary = {"median": median, "bound": bound if math.isfinite(bound) else None,
                   "global_norm": global_norm, "norms": dict(pairs),
                   "ratios": {c: (n / median if median > 0 else None)
                              for c, n in pairs},
                   "rejected": len(matching) - len(kept)}
        if norms:
            logger.info("round %d: update norms median %.4g, max %.3g x the median, "
                        "bound %.4g, %d rejected", rnd, median,
                        max(norms) / median if median > 0 else math.nan, bound,
                        summary["rejected"])
        return kept, {**summary, "kept_norms": kept_norms}

    def _keep_old(self, rnd: int, num_ok: int, failed: list[tuple[str, str]],
                  screening: dict | None = None, why: str = "") -> AggregateResult:
        why = why or (f"{num_ok} usable results, expected at least "
                      f"min_clients={self.min_clients}")
        logger.warning("round %d: %s; keeping the previous global model; failures: %s",
                       rnd, why, failed)
        return AggregateResult(None, num_ok, 0, failed, {}, screening or {},
                               self.aggregator)

    def aggregate(self, rnd: int, results: list[ClientResult],
                  failures: list[tuple[str, str]]) -> AggregateResult:
        """Screening, then FedAvg (or the robust aggregator) of the usable results,
        then pruning to ``prune_to`` if set.

        The result's ``tensors`` is None (keep the previous global model) when
        fewer than ``min_clients`` results are usable or the aggregate is not
        finite; the reason is logged.
        """
        failed = list(failures)
        usable = self._usable(results, failed)
        if len(usable) < self.min_clients:
            return self._keep_old(rnd, len(usable), failed)
        screening: dict = {}
        if self._global is not None:
            usable, screening = self._screened(rnd, usable, failed)
            if len(usable) < self.min_clients:
                return self._keep_old(rnd, len(usable), failed, screening)
        kept_norms = screening.pop("kept_norms", None)
        if self.aggregator == "fedavg":
            tensors, added, total = self._weighted_mean(rnd, usable, failed)
        else:
            tensors = robust.robust_mean(
                self.aggregator, self._global,
                [(r.tensors, r.num_examples) for r in usable], trim=self.trim,
                norms=kept_norms)
            added, total = usable, sum(r.num_examples for r in usable)
        if len(added) < self.min_clients:
            return self._keep_old(rnd, len(added), failed, screening)
        bad = [n for n, t in tensors.items() if t.dtype.kind == "f"
               and not np.isfinite(t).all()]
        if bad:
            return self._keep_old(rnd, len(added), failed, screening,
                                  f"the aggregate of tensors {bad[:5]} is not finite")
        if self.prune_to is not None:
            tensors, _ = self._pruned(tensors, self.prune_to, self.prune_scope)
        self._global = {name: t.copy() for name, t in tensors.items()}
        return AggregateResult(tensors, len(added), total, failed, _fit_metrics(added),
                               screening, self.aggregator)

    def _weighted_mean(self, rnd: int, usable: list[ClientResult],
                       failed: list[tuple[str, str]]
                       ) -> tuple[Tensors | None, list[ClientResult], int]:
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
            return None, added, 0
        return acc.result(), added, acc.total_weight

    def _pruned(self, tensors: Tensors, sparsity: float,
                scope: str = "global") -> tuple[Tensors, dict]:
        """A copy of ``tensors`` magnitude-pruned to ``sparsity`` (global or per-layer
        scope), and the nonzero count per conv/linear layer."""
        self.prune_model.load_state_dict(tensors)
        counts = prune(self.prune_model, sparsity, scope, floor=self.prune_floor)
        state = self.prune_model.state_dict()
        return {name: state[name] for name in tensors}, counts

    def evaluate_global(self, tensors: Tensors) -> dict:
        """What every evaluated round records: ``evaluate_fn(tensors)`` of the
        global model as is, its ``density`` (nonzero share of the conv/linear
        weights) and, with ``eval_pruned`` S, the metrics of a copy pruned globally
        to S (``<key>_pruned``, ``nonzeros_pruned`` per layer); {} without an
        evaluate_fn."""
        if self.evaluate_fn is None:
            return {}
        metrics = dict(self.evaluate_fn(tensors))
        if self.prune_model is None:
            return metrics
        self.prune_model.load_state_dict(tensors)
        metrics.setdefault("nonzeros", nonzeros(self.prune_model))
        metrics["density"] = 1.0 - global_sparsity(self.prune_model)
        if self.eval_pruned is not None:
            pruned, pruned_counts = self._pruned(tensors, self.eval_pruned)
            for key, value in self.evaluate_fn(pruned).items():
                metrics[f"{key}_pruned"] = value
            metrics["nonzeros_pruned"] = pruned_counts
        return metrics

    def evaluate(self, rnd: int, tensors: Tensors) -> dict | None:
        """``evaluate_global(tensors)``, plus its metrics at every
        ``eval_sparsities`` level under the key suffix ``@<sparsity>``; None
        without an evaluate_fn."""
        if self.evaluate_fn is None:
            return None
        metrics = self.evaluate_global(tensors)
        for s in self.eval_sparsities:
            pruned, counts = self._pruned(tensors, s)
            for key, value in self.evaluate_fn(pruned).items():
                metrics[f"{key}@{s:g}"] = value
            metrics.setdefault(f"nonzeros@{s:g}", counts)
        logger.info("round %d: evaluated %s", rnd, sorted(metrics))
        return metrics
