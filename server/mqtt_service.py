"""The aggregator as an MQTT service: the MQTT transport of the round loop.

server/round_loop.py runs the rounds (the quorum, the deadline policy, the
aggregation, the evaluation, the round record); this module is its transport over
the broker: who is online (retained device status, last wills), announcing a round
(retained model chunks and announcement), collecting updates (reassembly,
validation on arrival, an ack for every upload), the counted-update digests and
the state file.

Round state machine (docs/protocol.md draws it)::

    WAIT_DEVICES -> ANNOUNCE -> COLLECT -> (quorum) AGGREGATE -> EVALUATE -> CHECKPOINT
                                   |  deadline, no quorum:
                                   |  "extend": deadline += extend_seconds, COLLECT
                                   |  "rerun":  ANNOUNCE again (attempt + 1)
                                   |  "skip":   keep the old model, CHECKPOINT

paho's network thread only puts messages on a queue; everything else runs on
the caller's thread. The whole federation state (global model, next round,
cumulative bytes, a fingerprint of the configuration, the digests of the
updates counted in the last rounds) is written atomically to
``state_dir/federation.sfpp`` after every round; a restarted service resumes
there: the interrupted round is announced again with the same selection, and
updates the devices published meanwhile (queued by the broker in the service's
durable session, or re-sent by the devices) are accepted.

Devices are not trusted: every message handler catches whatever a payload can
raise, logs one line naming the sender, rejects an upload with an ack, and
goes on (docs/protocol.md, "What is validated").
"""

from __future__ import annotations

import logging
import math
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sparsefedpp.runtime.checkpoint import write_atomic
from sparsefedpp.runtime.errors import CodecError, ConfigError, StateError
from sparsefedpp.runtime.wire import codec, protocol
from sparsefedpp.runtime.wire.broker import CONNECTED, BrokerSettings, QueuedClient
from sparsefedpp.runtime.wire.checks import tensors_problem

from .round_loop import (
    POLICIES,
    Arrivals,
    RoundLoop,
    RoundPolicy,
    RoundRecord,
    Transport,
)
from .strategy import ClientInstruction, ClientResult, Strategy

logger = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]
STATE_FILE = "federation.sfpp"
COUNTED_ROUNDS = 3        # rounds whose counted update digests the state file keeps
ALREADY_COUNTED = "already counted"
# An update's metrics (codec meta): small, flat, finite. fedavg averages the
# numbers weighted by num_examples, so each must stay far from float overflow.
MAX_METRICS = 64
MAX_METRIC_KEY = 64
MAX_METRIC_VALUE = 1e15
MAX_METRIC_TEXT = 256


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

    def __post_init__(self):
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


class Aggregator(Transport):
    """Runs ``config.rounds`` rounds of ``strategy`` over the broker: a
    :class:`~sparsefedpp.server.round_loop.RoundLoop` (``loop``) with this
    service as its transport.

    ``round_config(rnd)`` is the JSON settings every selected device receives
    (model, method, local training, learning rate; ``seed`` per device is added
    here). ``evaluate_fn(tensors)`` scores the global model every ``eval_every``
    rounds; the last round uses ``strategy.evaluate`` (dense plus the pruned
    levels). ``model_stats(tensors)`` describes the global model in the round
    record (``RoundLoop``). ``emit(event, **fields)`` receives the metrics events.
    """

    sender = "aggregator"

    def __init__(self, config: ServiceConfig, strategy: Strategy, tensors: Tensors, *,
                 broker: BrokerSettings, round_config: Callable[[int], dict],
                 seed: int = 0, fingerprint: dict | None = None,
                 evaluate_fn: Callable[[Tensors], dict] | None = None,
                 model_stats: Callable[[Tensors], dict] | None = None,
                 emit: Callable[..., object] | None = None) -> None:
        self.config = config
        self.strategy = strategy
        self.broker = broker
        self.round_config = round_config
        self.seed = seed
        self.fingerprint = dict(fingerprint or {})
        self.emit = emit or (lambda event, **fields: None)
        self.loop = RoundLoop(strategy, self, tensors, policy=config.policy,
                              method=config.method, encoding=config.encoding,
                              evaluate_fn=evaluate_fn, model_stats=model_stats,
                              emit=self.emit)
        self.topics = protocol.Topics(config.prefix)
        self.state_path = Path(config.state_dir) / STATE_FILE
        self.online: dict[str, bool] = {}
        self.declared: dict[str, int] = {}  # examples each device declared online
        self._offline_since: dict[str, float] = {}
        # an update holds at most what the announced model holds: decoding is
        # bounded by it (names, dtypes, shapes, compressed-to-raw ratio), and so
        # is what the reassembler keeps of one upload
        self._spec = codec.model_spec(self.tensors)
        self._max_upload = min(config.max_update_bytes,
                               codec.max_encoded_size(self._spec))
        self._reassembler = protocol.Reassembler(max_total=self._max_upload,
                                                 on_drop=self._transfer_dropped)
        # digest -> (round, device) of the updates counted in the last rounds
        self._counted: dict[str, tuple[int, str]] = {}
        self._round_digests: dict[str, str] = {}  # device -> digest, open round
        self._model_chunks = 0
        self._retained: list[tuple[str, bytes]] = []  # the open round's announcement
        self._round: int | None = None          # the round being run
        self._selected: list[str] | None = None  # None until it is announced
        self._accepted: dict[str, ClientResult] = {}
        self._rejected: list = []
        self._early: dict[str, bytes] = {}      # updates for the round before it opened
        self._bytes_up = 0
        self._quorum = config.quorum
        self._mqtt: QueuedClient | None = None
        self._resume()

    # ---------------------------------------------------- the round loop's state
    @property
    def tensors(self) -> Tensors:
        """The global model (the loop's): what updates are checked against."""
        return self.loop.tensors

    @tensors.setter
    def tensors(self, value: Tensors) -> None:
        self.loop.tensors = value

    @property
    def next_round(self) -> int:
        return self.loop.next_round

    @next_round.setter
    def next_round(self, value: int) -> None:
        self.loop.next_round = value

    @property
    def totals(self) -> dict:
        """Cumulative ``bytes_up`` and ``bytes_down`` of the federation."""
        return self.loop.totals

    # ---------------------------------------------------------------- state file
    def _resume(self) -> None:
        if not self.state_path.exists():
            return
        try:
            msg = codec.decode(self.state_path.read_bytes())
        except (OSError, CodecError) as e:
            raise StateError(f"federation state {self.state_path}: expected a readable "
                             f"state file, got {e}; move it away to start over") from None
        saved = msg.meta.get("fingerprint")
        if saved != self.fingerprint:
            raise ConfigError(f"federation state {self.state_path}: written for another "
                              f"configuration (saved {saved}, now {self.fingerprint}); "
                              f"use another state folder to start a new federation")
        problem = tensors_problem(msg.tensors, self.tensors, max_integer=None)
        if problem:
            raise StateError(f"federation state {self.state_path}: {problem}")
        self.tensors = dict(msg.tensors)
        self.next_round = int(msg.meta["next_round"])
        self.totals.update(msg.meta.get("totals", {}))
        for entry in msg.meta.get("counted", []):  # absent in older state files
            rnd, device, digest = entry
            self._counted[str(digest)] = (int(rnd), str(device))
        logger.info("resuming at round %d from %s", self.next_round + 1, self.state_path)
        self.emit("resume", round=self.next_round, state=str(self.state_path))

    def save_state(self) -> None:
        """The transport's hook after every round: the state file."""
        self._save()

    def _save(self) -> None:
        oldest = self.next_round - COUNTED_ROUNDS
        self._counted = {d: v for d, v in self._counted.items() if v[0] >= oldest}
        counted = sorted([rnd, device, digest]
                         for digest, (rnd, device) in self._counted.items())
        msg = codec.Message("model", self.next_round, "aggregator", self.config.method,
                            self.tensors, 0, {"fingerprint": self.fingerprint,
                                              "next_round": self.next_round,
                                              "totals": self.totals,
                                              "counted": counted})
        data = codec.encode(msg, "csr")
        write_atomic(self.state_path, lambda f: f.write(data))

    # ---------------------------------------------------------------- broker
    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self._mqtt.publish_confirmed(topic, payload, retain=retain,
                                     timeout=self.config.publish_timeout)

    @property
    def client_id(self) -> str:
        """The MQTT client id: configured, else the username (which the shipped
        broker forces anyway), else ``sfpp-aggregator``."""
        return self.config.client_id or self.broker.username or "sfpp-aggregator"

    def start(self) -> None:
        watched = (self.topics.update("+"), self.topics.status("+"))
        self._mqtt = QueuedClient(
            self.broker, self.client_id, list(watched), logger,
            will_topic=self.topics.server, will_payload=protocol.SERVER_OFFLINE,
            watched=watched)
        try:
            self._mqtt.start(self.config.connect_timeout)
        except Exception:
            self.stop()
            raise
        self._publish(self.topics.server, protocol.control(
            "server", state="online", round=self.next_round, rounds=self.config.rounds),
            retain=True)

    def stop(self, state: str | None = None) -> None:
        if self._mqtt is None:
            return
        if state is not None and self._mqtt.connected.is_set():
            self._publish(self.topics.server, protocol.control(
                "server", state=state, round=self.next_round,
                rounds=self.config.rounds), retain=True)
        self._mqtt.stop()
        self._mqtt = None

    # ---------------------------------------------------------------- rounds
    def run(self) -> Tensors:
        """Run the remaining rounds; returns the final global model."""
        self.start()
        try:
            self.loop.run()
            self.stop("finished")
        finally:
            self.stop()
        return self.tensors

    def run_round(self, rnd: int) -> RoundRecord:
        """One round of the loop over the broker (``start`` first)."""
        return self.loop.run_round(rnd)

    def _drain(self, until: float, stop: Callable[[], bool] | None = None) -> None:
        """Handle queued messages until ``until`` (monotonic), or as soon as
        ``stop()`` holds after a message; status messages update ``online``."""
        while True:
            try:
                topic, payload, retained = self._mqtt.events.get(
                    timeout=max(0.0, until - time.monotonic()))
            except queue.Empty:
                return
            self._handle(topic, payload, retained)
            if (stop is not None and stop()) or (
                    time.monotonic() >= until and self._mqtt.events.empty()):
                return

    def _available(self) -> list[str]:
        return sorted(d for d in self.config.devices if self.online.get(d))

    def _wait_for_devices(self) -> list[str]:
        c = self.config
        start = time.monotonic()
        self._drain(start)  # statuses that are already queued
        if len(self._available()) < len(c.devices):
            logger.info("waiting up to %g s for devices to come online (%d of %d are)",
                        c.device_grace, len(self._available()), len(c.devices))
        while True:
            avail = self._available()
            waited = time.monotonic() - start
            if len(avail) == len(c.devices) or (
                    len(avail) >= c.quorum and waited >= c.device_grace):
                return avail
            if waited >= c.device_grace + c.wait_for_quorum:
                return avail
            self._drain(time.monotonic() + 0.2)

    # ---------------------------------------------------- the Transport methods
    def open(self, rnd: int) -> None:
        self._round, self._selected = rnd, None
        self._accepted, self._rejected, self._bytes_up = {}, [], 0
        self._round_digests = {}

    def available(self) -> list[str]:
        """The registered devices online, after waiting for them (``device_grace``,
        ``wait_for_quorum``)."""
        return self._wait_for_devices()

    def announce(self, rnd: int, attempt: int, plan: list[ClientInstruction],
                 model: bytes) -> None:
        """Publish the model chunks and the announcement (retained), then take the
        updates that arrived before the round was open."""
        self._selected = [p.client_id for p in plan]
        self._announce(rnd, attempt, plan, model, protocol.digest_of(model))
        early, self._early = self._early, {}
        for device, payload in early.items():
            self._guarded(self._on_update, self.topics.update(device), payload,
                          device, payload)

    def collect(self, deadline: float, quorum: int) -> Arrivals:
        self._quorum = quorum
        self._collect(deadline)
        selected = self._selected or []
        order = {d: i for i, d in enumerate(selected)}
        results = sorted(self._accepted.values(),
                         key=lambda r: order.get(r.client_id, 0))
        failures = [(d, "no valid update before the deadline") for d in selected
                    if d not in self._accepted]
        return Arrivals(results, failures, list(self._rejected), self._bytes_up)

    def acknowledge(self, rnd: int, counted: list[str]) -> None:
        """Remember the digests of the counted updates (a re-sent one is acked
        "already counted"), close the round."""
        for device, digest in self._round_digests.items():
            if device in counted:
                self._counted[digest] = (rnd, device)
        self._round, self._selected = None, None

    def _announce(self, rnd: int, attempt: int, plan, model_bytes: bytes,
                  digest: str) -> None:
        chunks = protocol.split(model_bytes, self.config.chunk_bytes)
        self._retained = [(self.topics.model(i), c) for i, c in enumerate(chunks)]
        for topic, chunk in self._retained:
            self._publish(topic, chunk, retain=True)
        for i in range(len(chunks), self._model_chunks):  # clear stale retained chunks
            self._publish(self.topics.model(i), b"", retain=True)
        self._model_chunks = len(chunks)
        config = dict(self.round_config(rnd))
        config["seeds"] = {p.client_id: protocol.client_seed(self.seed, rnd, p.client_id)
                           for p in plan}
        announcement = protocol.control(
            "round", round=rnd, attempt=attempt,
            selected=[p.client_id for p in plan],
            deadline=time.time() + self.config.round_timeout,
            model={"digest": digest, "chunks": len(chunks), "bytes": len(model_bytes)},
            config=config)
        self._retained.append((self.topics.round, announcement))
        self._publish(self.topics.round, announcement, retain=True)
        logger.info("round %d (attempt %d): announced to %s, model %d bytes in %d "
                    "chunks", rnd + 1, attempt + 1, ", ".join(p.client_id for p in plan),
                    len(model_bytes), len(chunks))

    def _republish(self) -> None:
        """After a reconnect, publish the open round's model chunks and announcement
        again: a broker killed before it saved them has lost them (devices ignore
        an announcement they have already seen)."""
        if self._selected is None or not self._retained:
            return
        logger.info("round %d: publishing the announcement again after a reconnect",
                    self._round + 1)
        for topic, payload in self._retained:
            self._publish(topic, payload, retain=True)

    def _collect(self, deadline: float) -> None:
        """Until the deadline, or every selected device answered, or the quorum is
        met and the others have been offline for ``offline_grace``."""
        while time.monotonic() < deadline and not self._round_complete():
            self._drain(min(deadline, time.monotonic() + 0.5), self._round_complete)

    def _round_complete(self) -> bool:
        return len(self._accepted) == len(self._selected) or (
            len(self._accepted) >= self._quorum and not self._waiting_for())

    def _waiting_for(self) -> list[str]:
        """Selected devices without an accepted update that may still send one."""
        gone = time.monotonic() - self.config.offline_grace
        return [d for d in self._selected if d not in self._accepted
                and self._offline_since.get(d, math.inf) > gone]

    # ---------------------------------------------------------------- messages
    def _handle(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """One message from the queue. Nothing a device sends may stop the
        service: whatever a handler raises is logged (one line, the sender; the
        traceback at debug level), an upload is rejected with an ack."""
        self._guarded(self._dispatch, topic, payload, topic, payload, retained)

    def _guarded(self, handler, topic: str, payload: bytes, *args) -> None:
        try:
            handler(*args)
        except Exception as e:  # noqa: BLE001 - the handler boundary
            logger.debug("handler of %s failed", topic[:200], exc_info=True)
            what = f"{type(e).__name__}: {e}"[:270]
            if topic == CONNECTED:  # e.g. the broker went away again
                logger.warning("publishing the round again after a reconnect failed "
                               "(%s); again at the next reconnect", what)
                return
            reason = f"internal error on this message: {what}"
            device = self.topics.device_of(topic, "update")
            if device is not None and device in self.config.devices:
                try:
                    self._reject(device, None, reason, protocol.transfer_id(payload))
                    return
                except Exception:  # noqa: BLE001, S110 - the ack failed too: log below
                    pass
            sender = device or self.topics.device_of(topic, "status") or "?"
            logger.warning("dropped a message from %s on %s: %s", sender, topic[:200],
                           reason)

    def _dispatch(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic == CONNECTED:
            self._republish()
            return
        device = self.topics.device_of(topic, "status")
        if device is not None:
            self._on_status(device, payload, retained)
            return
        device = self.topics.device_of(topic, "update")
        if device is None:
            logger.warning("dropped a message on unexpected topic %r", topic[:200])
            return
        if device not in self.config.devices:
            logger.warning("dropped an update from unregistered device %r", device)
            return
        if retained:
            if payload:  # updates are never retained: no agent sent this one
                logger.warning("ignored a retained update from %s (updates are never "
                               "retained); cleared it", device)
                self._clear(topic)
            return
        try:
            payload = self._reassembler.add(device, payload)
        except protocol.ProtocolError as e:
            self._reject(device, None, f"bad chunk: {e}", protocol.transfer_id(payload))
            return
        if payload is not None:
            self._on_update(device, payload)

    def _clear(self, topic: str) -> None:
        """Delete the retained message on ``topic`` (an empty retained publish; the
        aggregator's ACL may write every topic of the prefix)."""
        self._mqtt.paho.publish(topic, b"", qos=1, retain=True)

    def _transfer_dropped(self, device: str, held: int, count: int, why: str) -> None:
        logger.warning("dropped an unfinished upload from %s (%d of %d chunks): %s",
                       device, held, count, why)

    def _on_status(self, device: str, payload: bytes, retained: bool) -> None:
        if device not in self.config.devices:
            logger.debug("status of unregistered device %r ignored", device)
            return
        if not payload:  # a cleared retained status
            self._set_online(device, False)
            return
        try:
            msg = protocol.parse_control(payload, "status")
        except protocol.ProtocolError as e:
            if retained:
                self._clear(self.topics.status(device))
            logger.warning("ignored a bad status from %s%s: %s", device,
                           " (retained: cleared it)" if retained else "", e)
            return
        if "examples" in msg and self.declared.get(device) != msg["examples"]:
            self.declared[device] = msg["examples"]
            logger.info("device %s declares %d examples", device, msg["examples"])
        self._set_online(device, msg["state"] != "offline")
        logger.debug("device %s is %s", device, msg["state"])

    def _set_online(self, device: str, online: bool) -> None:
        self.online[device] = online
        if online:
            self._offline_since.pop(device, None)
        else:
            self._offline_since.setdefault(device, time.monotonic())
            # its unfinished upload will be re-sent
            self._reassembler.forget(device, "the device went offline")

    def _on_update(self, device: str, payload: bytes) -> None:
        rnd = self._round if self._round is not None else self.next_round
        digest = protocol.digest_of(payload)
        counted = self._counted.get(digest)
        if counted is not None and counted[1] == device:
            logger.info("round %d: update from %s already counted in round %d; "
                        "acknowledged", rnd + 1, device, counted[0] + 1)
            self._ack(device, counted[0], True, ALREADY_COUNTED, digest)
            return
        try:
            msg = codec.decode(payload, max_bytes=self._max_upload, like=self._spec,
                               exact=True)
        except CodecError as e:
            self._reject(device, None, f"undecodable update: {e}", digest)
            return
        except Exception as e:  # noqa: BLE001 - e.g. RecursionError in the meta JSON
            self._reject(device, None, f"undecodable update: {type(e).__name__}",
                         digest)
            return
        if msg.kind != "update" or msg.sender != device:
            self._reject(device, msg.round, f"expected an update sent by {device}, got "
                         f"kind {msg.kind!r} from {msg.sender!r}", digest)
        elif msg.round == rnd and self._selected is None:
            self._early[device] = payload  # e.g. queued while the service restarted
        elif msg.round != rnd:
            when = "closed" if msg.round < rnd else "not open yet"
            self._reject(device, msg.round, f"round {msg.round + 1} is {when} (now "
                         f"round {rnd + 1})", digest)
        elif device not in self._selected:
            self._reject(device, msg.round, f"{device} is not selected for round "
                         f"{rnd + 1}", digest)
        elif device in self._accepted:
            if self._round_digests.get(device) == digest:
                logger.info("round %d: update from %s already counted; acknowledged",
                            rnd + 1, device)
                self._ack(device, rnd, True, ALREADY_COUNTED, digest)
            else:
                logger.info("round %d: a second update from %s ignored", rnd + 1,
                            device)
                self._ack(device, rnd, True, "duplicate; the first copy was accepted",
                          digest)
        else:
            problem = update_problem(msg, self.tensors,
                                     max_examples=self.config.max_examples,
                                     max_norm=self.config.max_update_norm,
                                     method=self.config.method,
                                     declared=self.declared.get(device))
            if problem:
                self._reject(device, rnd, problem, digest)
                return
            self._accepted[device] = ClientResult(device, msg.tensors, msg.num_examples,
                                                  msg.meta)
            self._round_digests[device] = digest
            self._bytes_up += len(payload)
            logger.info("round %d: update from %s accepted (%d bytes, %d examples)",
                        rnd + 1, device, len(payload), msg.num_examples)
            self._ack(device, rnd, True, "", digest)

    def _reject(self, device: str, rnd: int | None, reason: str, digest: str) -> None:
        logger.warning("rejected an update from %s: %s", device, reason)
        self._rejected.append([device, reason])
        self._ack(device, rnd if rnd is not None else -1, False, reason, digest)

    def _ack(self, device: str, rnd: int, accepted: bool, reason: str,
             digest: str) -> None:
        """The ack names the upload it answers by its SHA-256 (the chunk header's
        transfer id; '' if the message had none), so that a device can ignore
        acks of uploads it did not send."""
        rnd = rnd if 0 <= rnd <= protocol.MAX_ROUND else -1
        data = protocol.control("ack", round=rnd, accepted=accepted,
                                reason=reason[:500], digest=digest)
        self._mqtt.paho.publish(self.topics.ack(device), data, qos=1)
