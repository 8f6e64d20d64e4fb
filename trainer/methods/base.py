"""What every federated method shares: its validated configuration and the
interface a method fills in (client side and what the server does with it).

A method is one module in this package (``sparsefedpp``, ``zerofl``, ``topk``,
``fedavg``) holding one :class:`Method`: the Powerprop exponent it trains with,
how it sets the model's sparsity machinery before local training
(:meth:`Method.prepare`), how it prunes the upload after it
(:meth:`Method.finish`), and, for the aggregator, at which sparsity its global
model is judged (:meth:`Method.eval_sparsity`, the seed's "accuracy at S") and
to which sparsity ``--server-prune`` would re-prune the aggregate. The server
package stays generic: tools/ hands these numbers to server/fedavg.FedAvg.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.runtime.sparsity import activation_policy, pruning


@dataclass(frozen=True)
class MethodConfig:
    """What makes the methods differ; everything else is shared local training.

    Validated once, here: every other place takes a MethodConfig. The fields
    travel in the round announcement (``asdict``), so they are plain numbers.
    """

    method: str
    sparsity: float = 0.0       # target weight sparsity of the upload
    mask_ratio: float = 0.0     # ZeroFL: extra upload density above 1 - sparsity
    min_keep: float = 0.05      # SparseFedPP: floor on the kept activation fraction
    swat_refresh: int = 10      # ZeroFL: activation/weight threshold refresh period
    layer_floor: int = 0        # not the reference: weights every layer keeps (0 off)

    def __post_init__(self):
        from . import METHODS, get  # the registry imports the method modules

        if self.method not in METHODS:
            raise ConfigError(f"method: expected one of {', '.join(METHODS)}, got "
                              f"{self.method!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity: expected a fraction in [0, 1), got "
                              f"{self.sparsity!r}")
        if not 0.0 <= self.mask_ratio <= self.sparsity:
            raise ConfigError(f"mask_ratio: expected a fraction in [0, sparsity], got "
                              f"{self.mask_ratio!r}")
        floor = self.layer_floor
        if isinstance(floor, bool) or int(floor) != floor or floor < 0:
            raise ConfigError(f"layer_floor: expected an integer >= 0, got "
                              f"{self.layer_floor!r}")
        get(self.method).check(self)

    @property
    def spec(self) -> Method:
        """The method object this configuration runs."""
        from . import get

        return get(self.method)

    @property
    def prune_scope(self) -> str:
        return self.spec.prune_scope

    @property
    def upload_sparsity(self) -> float:
        return self.spec.upload_sparsity(self)


class Method:
    """A federated method; the defaults are a magnitude-pruned dense-trained one."""

    name = ""
    alpha = 1.0                 # Powerprop exponent of the layers it trains
    prune_scope = "global"      # global magnitude pruning over every conv/linear weight
    default_sparsity = 0.9      # when a configuration names none
    dense = False               # uploads every weight (no sparsity of its own)

    def check(self, cfg: MethodConfig) -> None:
        """Method-specific constraints on the configuration (ConfigError)."""

    def upload_sparsity(self, cfg: MethodConfig) -> float:
        """Sparsity of the uploaded weights."""
        return cfg.sparsity

    def prepare(self, model, cfg: MethodConfig) -> dict[str, float]:
        """Set the sparsity machinery before local training; kept activation
        fractions per layer. Default: dense activations."""
        return activation_policy.dense(model)

    def finish(self, model, cfg: MethodConfig) -> dict[str, int]:
        """Post-training pruning of the upload to the full target (every round, no
        schedule, no error feedback, as the reference); ``layer_floor`` keeps that
        many weights in every layer. Returns nonzeros per layer."""
        s = self.upload_sparsity(cfg)
        if s > 0:
            return pruning.prune(model, s, self.prune_scope, floor=cfg.layer_floor)
        return pruning.nonzeros(model)

    def eval_sparsity(self, cfg: MethodConfig) -> float | None:
        """The sparsity S of the server's "accuracy at S" (a copy of the global
        model pruned globally to S), and of ``--server-prune``; None: dense."""
        return cfg.sparsity or None
