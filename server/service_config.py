"""The aggregator's deployment settings (``[deployment]`` in serve's TOML), validated
once, where they are built; the FL settings live in the strategy."""

from __future__ import annotations

from dataclasses import dataclass

from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.runtime.wire.broker import check_mqtt_version
from sparsefedpp.runtime.wire import codec, protocol

from .round_loop import POLICIES, RoundPolicy


@dataclass(frozen=True)
class ServiceConfig:
    """Deployment settings of the aggregator (the FL settings live in the strategy
    and in ``round_config``).

    ``devices`` are the registered device ids (= their MQTT usernames); a round
    selects among those whose retained status says online. Before announcing,
    the service waits up to ``device_grace`` seconds for every registered device
    to be online, and longer (up to ``wait_for_quorum``) while fewer than the
    quorum are. ``quorum`` is the strategy's ``min_clients``. A round closes
    when every selected device has answered, or when the quorum is met and the
    others have been offline (last will) for ``offline_grace`` seconds, or at
    the deadline.

    ``max_examples`` caps an update's num_examples (its FedAvg weight) for
    every device; a device that declared its example count in its online
    status is held to that count. ``client_id`` defaults to the MQTT username
    (else ``sfpp-aggregator``): the shipped broker forces client id = username.
    """

    devices: tuple[str, ...]
    rounds: int
    state_dir: str
    quorum: int = 1
    round_timeout: float = 600.0
    on_no_quorum: str = "extend"
    extend_seconds: float = 60.0
    max_attempts: int = 3
    device_grace: float = 30.0
    offline_grace: float = 30.0
    wait_for_quorum: float = 3600.0
    eval_every: int = 1
    encoding: str = "csr"
    method: str = "fedavg"
    prefix: str = protocol.DEFAULT_PREFIX
    client_id: str | None = None
    chunk_bytes: int = protocol.DEFAULT_CHUNK_BYTES
    max_update_bytes: int = 256 << 20
    max_update_norm: float | None = None
    max_examples: int = 100_000
    connect_timeout: float = 30.0
    publish_timeout: float = 120.0
    mqtt_version: str = "5"  # "3.1.1" for brokers without MQTT 5; --mqtt-version wins

    def __post_init__(self):
        check_mqtt_version(str(self.mqtt_version), "serve mqtt_version")
        if not self.devices:
            raise ConfigError("serve devices: expected at least one registered device "
                              "id, got none; list them under [deployment] devices")
        for d in self.devices:
            protocol.check_device_id(d, ConfigError)
        if len(set(self.devices)) != len(self.devices):
            raise ConfigError(f"serve devices: expected distinct ids, got "
                              f"{list(self.devices)}")
        if self.on_no_quorum not in POLICIES:
            raise ConfigError(f"serve on_no_quorum: expected one of {POLICIES}, got "
                              f"{self.on_no_quorum!r}")
        for name in ("rounds", "quorum", "max_attempts", "eval_every", "chunk_bytes",
                     "max_update_bytes", "max_examples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"serve {name}: expected an integer >= 1, got "
                                  f"{value!r}")
        for name in ("round_timeout", "extend_seconds", "device_grace",
                     "wait_for_quorum", "offline_grace", "connect_timeout", "publish_timeout"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ConfigError(f"serve {name}: expected seconds >= 0, got {value!r}")
        if self.max_update_norm is not None and not self.max_update_norm > 0:
            raise ConfigError(f"serve max_update_norm: expected > 0 or none, got "
                              f"{self.max_update_norm!r}")
        if self.encoding not in codec.ENCODINGS:
            raise ConfigError(f"serve encoding: expected one of "
                              f"{', '.join(codec.ENCODINGS)}, got {self.encoding!r}")
        protocol.Topics(self.prefix)
        if self.client_id is not None and not self.client_id:
            raise ConfigError("serve client_id: expected a non-empty MQTT client id or "
                              "none (the username)")

    @property
    def policy(self) -> RoundPolicy:
        """The round loop's quorum, deadline and evaluation schedule."""
        return RoundPolicy(rounds=self.rounds, quorum=self.quorum,
                           round_timeout=self.round_timeout,
                           on_no_quorum=self.on_no_quorum,
                           extend_seconds=self.extend_seconds,
                           max_attempts=self.max_attempts, eval_every=self.eval_every)
