"""The Strategy interface between the round loop and a federated algorithm.

A round (server/round_loop.py runs it): ``configure_round`` picks clients and what
to tell them; the transport (in-process or MQTT; strategies never see it) runs
them; ``aggregate`` turns the results into the next global model and says what it
did (an ``AggregateResult``: the loop records that, it never reads a strategy's
state); ``evaluate`` scores it. Tensors are flat ``dict[str, np.ndarray]`` keyed
like ``Model.state_dict()``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ClientInstruction:
    """What one client is asked to do this round.

    Attributes
    ----------
    client_id : str
    config : dict
        JSON-like settings for the client's local training, e.g.
        ``{"round": 3, "lr": 0.21}``.
    """

    client_id: str
    config: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ClientResult:
    """One client's answer: its trained tensors and how many examples it used.

    Attributes
    ----------
    client_id : str
    tensors : dict of str to np.ndarray
        The client's model (float32 parameters, int64 ``num_batches_tracked``),
        dense arrays with exact zeros where the model is sparse.
    num_examples : int
        Local training examples; the FedAvg weight.
    metrics : dict
        Client-side metrics (e.g. ``{"loss": 1.7}``).
    """

    client_id: str
    tensors: dict[str, np.ndarray]
    num_examples: int
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class AggregateResult:
    """What ``Strategy.aggregate`` did with a round's results: the round record is
    built from it.

    Attributes
    ----------
    tensors : dict of str to np.ndarray, or None
        The next global model; None keeps the previous one (too few usable
        results, a non-finite aggregate, ...).
    num_results : int
        Results that went into the aggregate (or that were usable, when none did).
    num_examples : int
        Their examples (0 when nothing was aggregated).
    failures : list of (client_id, reason)
        The failures the loop passed in, then the results the strategy refused.
    fit_metrics : dict
        The clients' numeric metrics averaged by num_examples ({} when nothing was
        aggregated).
    screening : dict
        The strategy's summary of the update norms ({} when it screened nothing).
    aggregator : str
        Which rule combined the results (e.g. ``"fedavg"``, ``"median"``).
    """

    tensors: dict[str, np.ndarray] | None
    num_results: int = 0
    num_examples: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    fit_metrics: dict = field(default_factory=dict)
    screening: dict = field(default_factory=dict)
    aggregator: str = ""

    @property
    def aggregated(self) -> bool:
        """Whether there is a new global model."""
        return self.tensors is not None

    @property
    def num_failures(self) -> int:
        return len(self.failures)


class Strategy(ABC):
    """A federated algorithm as three callbacks of the round loop."""

    @abstractmethod
    def configure_round(self, rnd: int,
                        available: list[str]) -> list[ClientInstruction]:
        """Pick this round's clients among ``available`` and say what each must do.

        An empty list means "skip this round".
        """

    @abstractmethod
    def aggregate(self, rnd: int, results: list[ClientResult],
                  failures: list[tuple[str, str]]) -> AggregateResult:
        """Combine the clients' results into the next global model.

        ``failures`` are ``(client_id, reason)`` pairs of clients that did not
        answer usefully. A result whose ``tensors`` is None means there is nothing
        to aggregate (for example fewer results than the strategy's minimum) and
        the round loop keeps the previous global model.
        """

    @abstractmethod
    def evaluate(self, rnd: int, tensors: dict[str, np.ndarray]) -> dict | None:
        """Metrics of the global model ``tensors`` after round ``rnd``, or None
        when this strategy does no server-side evaluation."""
