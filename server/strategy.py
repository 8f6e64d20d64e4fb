"""The Strategy interface between the round loop and a federated algorithm.

A round: ``configure_round`` picks clients and what to tell them; the transport
(in-process or MQTT; strategies never see it) runs them; ``aggregate`` turns the
results into the next global model; ``evaluate`` scores it. Tensors are flat
``dict[str, np.ndarray]`` keyed like ``Model.state_dict()``.
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
                  failures: list[tuple[str, str]]) -> dict[str, np.ndarray] | None:
        """Combine the clients' results into the next global model.

        ``failures`` are ``(client_id, reason)`` pairs of clients that did not
        answer usefully. Returning None means there is nothing to aggregate (for
        example fewer results than the strategy's minimum) and the round loop
        keeps the previous global model.
        """

    @abstractmethod
    def evaluate(self, rnd: int, tensors: dict[str, np.ndarray]) -> dict | None:
        """Metrics of the global model ``tensors`` after round ``rnd``, or None
        when this strategy does no server-side evaluation."""
