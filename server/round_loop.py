"""The one round loop of a federation, over a Transport that moves the bytes.

A round, whoever carries it (the in-process simulation in tools/simulate.py, the
MQTT service in server/mqtt_service.py)::

    encode the global model
      -> [attempt] transport.available() -> strategy.configure_round
      -> transport.announce(plan, model) -> transport.collect(deadline, quorum)
           deadline without quorum: "extend" collects again, "rerun" announces again,
           "skip" keeps the old model (RoundPolicy, at most max_attempts in all)
      -> quorum: strategy.aggregate -> evaluate -> RoundRecord
      -> transport.acknowledge(counted) -> transport.save_state() -> emit("round", ...)

The quorum, the deadline and the evaluation schedule live here, once; the
transport owns its wire (what "available", "announce" and "arrived" mean on it,
validation on arrival, acks, its state file). The strategy returns what the loop
records (``AggregateResult``); the loop never reads a strategy's state.
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
from sparsefedpp.runtime.wire import codec
from sparsefedpp.runtime.errors import ConfigError

from .strategy import AggregateResult, ClientInstruction, ClientResult, Strategy

logger = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]
POLICIES = ("extend", "rerun", "skip")


@dataclass(frozen=True)
class RoundPolicy:
    """When a round closes and what happens without a quorum.

    ``quorum`` results are needed to aggregate. A transport collects for
    ``round_timeout`` seconds after announcing (``math.inf``: until every selected
    client answered, as in the simulation). At the deadline without a quorum,
    ``on_no_quorum`` says what to do: ``"extend"`` collects ``extend_seconds``
    more, ``"rerun"`` asks the transport who is available and announces again,
    ``"skip"`` keeps the previous global model; attempts plus extensions are at
    most ``max_attempts``. The global model is evaluated every ``eval_every``
    rounds and after round ``rounds`` with the strategy's full ``evaluate``.
    """

    rounds: int
    quorum: int = 1
    round_timeout: float = math.inf
    on_no_quorum: str = "skip"
    extend_seconds: float = 60.0
    max_attempts: int = 1
    eval_every: int = 1

    def __post_init__(self):
        for name in ("rounds", "quorum", "max_attempts", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"round policy {name}: expected an integer >= 1, "
                                  f"got {value!r}")
        if self.on_no_quorum not in POLICIES:
            raise ConfigError(f"round policy on_no_quorum: expected one of {POLICIES}, "
                              f"got {self.on_no_quorum!r}")
        for name in ("round_timeout", "extend_seconds"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ConfigError(f"round policy {name}: expected seconds >= 0, got "
                                  f"{value!r}")


@dataclass
class Arrivals:
    """What a transport collected in the open round so far.

    ``results`` in the order of the selection; ``failures`` ``(client_id,
    reason)`` of selected clients without a usable result; ``rejected``
    ``[client_id, reason]`` of every upload refused on arrival (several per
    client possible); ``bytes_up`` the bytes of the uploads counted.
    """

    results: list[ClientResult] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    rejected: list = field(default_factory=list)
    bytes_up: int = 0


class Transport(ABC):
    """How a round's model reaches the clients and their results come back.

    The loop calls, per round: ``open``; per attempt ``available``, then
    ``announce`` and ``collect`` (again after a deadline extension); at the end
    ``acknowledge`` and ``save_state``. ``sender`` names the aggregator in the
    encoded global model's header.
    """

    sender: str = "server"

    def open(self, rnd: int) -> None:
        """A new round ``rnd`` (0-based) begins: forget the last one's arrivals."""

    @abstractmethod
    def available(self) -> list[str]:
        """The client ids that can take part now (a transport may wait for them)."""

    @abstractmethod
    def announce(self, rnd: int, attempt: int, plan: list[ClientInstruction],
                 model: bytes) -> None:
        """Send the encoded global ``model`` and each selected client's instruction."""

    @abstractmethod
    def collect(self, deadline: float, quorum: int) -> Arrivals:
        """Wait until every selected client answered, or the ``quorum`` is met and
        the others cannot answer any more, or ``deadline`` (``time.monotonic()``)
        passed; return what arrived in the round so far."""

    @abstractmethod
    def acknowledge(self, rnd: int, counted: list[str]) -> None:
        """Round ``rnd`` is closed; the results of ``counted`` went into the new
        global model (empty when the round kept the old one)."""

    def save_state(self) -> None:
        """Persist what a restart needs, after every round (before its event)."""


@dataclass
class RoundRecord:
    """What one round did: the metrics' ``round`` event (``event()``).

    ``round`` counts from 1; ``selected`` are the clients of the last attempt
    (``clients`` in the event too, the name the simulation's readers use);
    ``lr`` the learning rate the plan carried; ``fit`` the clients' metrics
    averaged by examples and ``train_loss``/``train_accuracy`` its loss and
    accuracy (NaN when nothing was aggregated); ``global_sparsity`` and
    ``nonzeros`` describe the global model after the round; ``eval`` its
    evaluation (empty on rounds that are not evaluated).
    """

    round: int
    attempts: int = 0
    lr: float | None = None
    selected: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    aggregated: bool = False
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0
    train_loss: float = math.nan
    train_accuracy: float = math.nan
    global_sparsity: float | None = None
    nonzeros: dict = field(default_factory=dict)
    fit: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)    # [client_id, reason]
    rejected: list = field(default_factory=list)    # [client_id, reason]
    screening: dict = field(default_factory=dict)

    @property
    def clients(self) -> list[str]:
        return self.selected

    def event(self) -> dict:
        """The fields of the metrics' ``round`` event."""
        return {**asdict(self), "clients": list(self.selected)}


def _plan_lr(plan: list[ClientInstruction]) -> float | None:
    lrs = {p.config.get("lr") for p in plan} - {None}
    return float(lrs.pop()) if len(lrs) == 1 else None


class RoundLoop:
    """Runs the rounds of ``strategy`` over ``transport`` from ``tensors``.

    Holds the federation's progress: the global model ``tensors``, ``next_round``
    and the cumulative ``totals`` (bytes up and down), which a resumed run sets
    before going on. ``evaluate_fn(tensors)`` scores the global model every
    ``policy.eval_every`` rounds; the last round uses ``strategy.evaluate``.
    ``model_stats(tensors)`` returns ``{"global_sparsity": float, "nonzeros":
    {layer: count}}`` for the record. ``emit(event, **fields)`` receives each
    round's event, with ``cum_bytes_up`` and ``cum_bytes_down``.
    """

    def __init__(self, strategy: Strategy | None, transport: Transport,
                 tensors: Tensors, *, policy: RoundPolicy, method: str,
                 encoding: str = "csr",
                 evaluate_fn: Callable[[Tensors], dict] | None = None,
                 model_stats: Callable[[Tensors], dict] | None = None,
                 emit: Callable[..., object] | None = None) -> None:
        if encoding not in codec.ENCODINGS:
            raise ConfigError(f"round loop encoding: expected one of "
                              f"{', '.join(codec.ENCODINGS)}, got {encoding!r}")
        self.strategy = strategy
        self.transport = transport
        self.tensors = {k: np.array(v) for k, v in tensors.items()}
        self.policy = policy
        self.method = method
        self.encoding = encoding
        self.evaluate_fn = evaluate_fn
        self.model_stats = model_stats
        self.emit = emit or (lambda event, **fields: None)
        self.next_round = 0
        self.totals = {"bytes_up": 0, "bytes_down": 0}

    def run(self) -> Tensors:
        """Run the remaining rounds; returns the final global model."""
        while self.next_round < self.policy.rounds:
            self.run_round(self.next_round)
        return self.tensors

    def run_round(self, rnd: int) -> RoundRecord:
        """One round (0-based ``rnd``): announce, collect, aggregate, evaluate,
        record; the record is also emitted and returned."""
        start = time.monotonic()
        record = RoundRecord(rnd + 1)
        model = codec.encode(codec.Message("model", rnd, self.transport.sender,
                                           self.method, self.tensors), self.encoding)
        self.transport.open(rnd)
        arrivals = self._gather(rnd, model, record)
        result = self._aggregate(rnd, arrivals)
        if result.tensors is not None:
            self.tensors = result.tensors
        self._fill(record, rnd, arrivals, result)
        self.transport.acknowledge(rnd, record.accepted if record.aggregated else [])
        record.seconds = time.monotonic() - start
        self.next_round = rnd + 1
        self.totals["bytes_up"] += record.bytes_up
        self.totals["bytes_down"] += record.bytes_down
        self.transport.save_state()
        self.emit("round", **record.event(), cum_bytes_up=self.totals["bytes_up"],
                  cum_bytes_down=self.totals["bytes_down"])
        return record

    def _gather(self, rnd: int, model: bytes, record: RoundRecord) -> Arrivals:
        """The attempts of a round under the policy: what arrived in the end."""
        p = self.policy
        arrivals, stale = Arrivals(), False
        for attempt in range(p.max_attempts):
            record.attempts = attempt + 1
            available = self.transport.available()
            plan = self.strategy.configure_round(rnd, available)
            if not plan:
                logger.warning("round %d: %d clients available, expected at least %d",
                               rnd + 1, len(available), p.quorum)
                stale = bool(record.selected)  # an earlier attempt's may have grown
                continue
            stale = False
            record.selected = [i.client_id for i in plan]
            record.lr = _plan_lr(plan)
            self.transport.announce(rnd, attempt, plan, model)
            record.bytes_down += len(model) * len(plan)
            deadline = time.monotonic() + p.round_timeout
            extensions = 0
            while True:
                arrivals = self.transport.collect(deadline, p.quorum)
                if len(arrivals.results) >= p.quorum or p.on_no_quorum != "extend" or \
                        attempt + extensions + 1 >= p.max_attempts:
                    break
                extensions += 1
                logger.warning("round %d: %d of %d updates at the deadline, quorum %d; "
                               "extending by %g s", rnd + 1, len(arrivals.results),
                               len(plan), p.quorum, p.extend_seconds)
                deadline = time.monotonic() + p.extend_seconds
            if len(arrivals.results) >= p.quorum or p.on_no_quorum != "rerun":
                break
            logger.warning("round %d: no quorum (%d of %d); announcing again",
                           rnd + 1, len(arrivals.results), p.quorum)
        if stale:  # what arrived for the earlier attempt meanwhile, without waiting
            arrivals = self.transport.collect(time.monotonic(), p.quorum)
        return arrivals

    def _aggregate(self, rnd: int, arrivals: Arrivals) -> AggregateResult:
        if len(arrivals.results) >= self.policy.quorum:
            return self.strategy.aggregate(rnd, arrivals.results, arrivals.failures)
        logger.warning("round %d: %d valid updates, quorum %d: keeping the previous "
                       "global model", rnd + 1, len(arrivals.results),
                       self.policy.quorum)
        return AggregateResult(None, len(arrivals.results), 0, list(arrivals.failures))

    def _fill(self, record: RoundRecord, rnd: int, arrivals: Arrivals,
              result: AggregateResult) -> None:
        record.accepted = [r.client_id for r in arrivals.results]
        record.aggregated = result.aggregated
        record.rejected = [list(r) for r in arrivals.rejected]
        record.failures = [list(f) for f in result.failures]
        record.bytes_up = arrivals.bytes_up
        record.screening = dict(result.screening)
        record.fit = dict(result.fit_metrics) if result.aggregated else {}
        record.train_loss = float(record.fit.get("loss", math.nan))
        record.train_accuracy = float(record.fit.get("accuracy", math.nan))
        if self.model_stats is not None:
            stats = self.model_stats(self.tensors)
            record.global_sparsity = float(stats["global_sparsity"])
            record.nonzeros = dict(stats["nonzeros"])
        if rnd + 1 == self.policy.rounds:  # dense, and after one-shot pruning
            record.eval = self.strategy.evaluate(rnd, self.tensors) or {}
        elif self.evaluate_fn is not None and (rnd + 1) % self.policy.eval_every == 0:
            record.eval = self.evaluate_fn(self.tensors)
