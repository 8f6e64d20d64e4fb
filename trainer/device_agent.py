"""The device agent: waits for a round it is selected for, trains, uploads, repeats.

paho's network thread (``loop_start``) keeps the connection alive and only puts
messages on a queue; training runs on the caller's thread, so a long round never
starves the keepalive. The encoded update is written to ``state_dir`` before it
is published and kept until a later round is announced: after a broker restart
(or an aggregator restart that re-announces the round) it is sent again from
disk, never retrained and never lost. The aggregator acknowledges each update
on ``{prefix}/ack/{device}``, naming the upload's SHA-256; acks of uploads
this agent did not send (someone else used its credentials) are ignored.
Without an ack within ``ack_timeout`` the agent re-sends it (the aggregator
ignores duplicates). No message stops the agent: a handler that fails logs one
line and the agent goes on. The MQTT client id is the device id (the shipped
broker forces client id = username, and the username is the device id).
"""

from __future__ import annotations

import json
import logging
import queue
import time
from dataclasses import dataclass, replace
from pathlib import Path

from sparsefedpp.runtime import models
from sparsefedpp.runtime.checkpoint import write_atomic
from sparsefedpp.runtime.errors import CodecError, ConfigError, SparseFedError
from sparsefedpp.runtime.wire import codec, protocol
from sparsefedpp.runtime.wire.broker import CONNECTED, BrokerSettings, QueuedClient

from .data import Dataset
from .local_round import LocalConfig, local_round
from .memory_budget import plan_batch_size
from .methods import MethodConfig

logger = logging.getLogger(__name__)

UPDATE_FILE = "update.sfpp"
STATE_FILE = "agent.json"


@dataclass(frozen=True)
class AgentConfig:
    """Settings of one device agent."""

    device_id: str
    state_dir: str
    prefix: str = protocol.DEFAULT_PREFIX
    chunk_bytes: int = protocol.DEFAULT_CHUNK_BYTES
    ack_timeout: float = 60.0
    publish_timeout: float = 120.0
    connect_timeout: float | None = None   # None: keep retrying (field default)
    exit_when_finished: bool = False
    max_model_bytes: int = 256 << 20
    max_rounds: int | None = None          # stop after training this many rounds
    max_memory: int | None = None          # bytes; picks the batch size to fit
    recompute: bool = False                # rebuild block activations in backward

    def __post_init__(self):
        protocol.check_device_id(self.device_id, ConfigError)
        protocol.Topics(self.prefix)
        if self.chunk_bytes < 1024:
            raise ConfigError(f"client chunk_bytes: expected >= 1024, got "
                              f"{self.chunk_bytes}")


class DeviceAgent:
    """One device of the federation; ``run()`` returns when the aggregator says the
    federation is finished (with ``exit_when_finished``) or after ``max_rounds``."""

    def __init__(self, config: AgentConfig, data: Dataset, broker: BrokerSettings):
        if len(data) == 0:
            raise ConfigError(f"device {config.device_id}: expected training data, got "
                              f"an empty dataset")
        self.config = config
        self.data = data
        self.broker = broker
        self.topics = protocol.Topics(config.prefix)
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.rounds_trained = 0
        self._mqtt: QueuedClient | None = None
        self._models = protocol.Reassembler(max_total=config.max_model_bytes,
                                            on_drop=self._model_dropped)
        self._round: dict | None = None       # the current announcement
        self._model: bytes | None = None      # the current global model payload
        self._net = None                      # the engine model, rebuilt on change
        self._net_spec: dict | None = None
        self._sent_at = 0.0
        self._acked = self._load_state().get("acked", [-1, ""])
        self._finished = False
        self._handled: tuple | None = None
        self._stored = self._read_stored()   # (round, encoded update) kept on disk

    # ---------------------------------------------------------------- local state
    @property
    def update_path(self) -> Path:
        return self.state_dir / UPDATE_FILE

    def _load_state(self) -> dict:
        try:
            return json.loads((self.state_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def _save_state(self) -> None:
        data = json.dumps({"acked": self._acked}).encode()
        write_atomic(self.state_dir / STATE_FILE, lambda f: f.write(data))

    def _read_stored(self) -> tuple[int, bytes] | None:
        """(round, bytes) of the update left on disk by an earlier run, or None (a
        corrupt file is dropped). Read once; ``_stored`` keeps it in memory."""
        try:
            data = self.update_path.read_bytes()
        except OSError:
            return None
        try:
            return codec.decode(data).round, data
        except CodecError as e:
            logger.warning("dropping the corrupt stored update %s: %s",
                           self.update_path, e)
            self.update_path.unlink(missing_ok=True)
            return None

    def _store(self, rnd: int, data: bytes) -> None:
        write_atomic(self.update_path, lambda f: f.write(data))
        self._stored = (rnd, data)

    def _drop_stored(self) -> None:
        self.update_path.unlink(missing_ok=True)
        self._stored = None

    def _stored_round(self) -> int | None:
        return None if self._stored is None else self._stored[0]

    # ---------------------------------------------------------------- broker
    def _announce_online(self, client) -> None:  # on every (re)connect
        """The online status declares the example count: the aggregator refuses
        an update of this device that claims more (a FedAvg weight bound)."""
        client.publish(self.topics.status(self.config.device_id),
                       protocol.control("status", state="online",
                                        examples=len(self.data)), qos=1, retain=True)

    def _status(self, state: str, rnd: int | None = None, detail: str = "") -> None:
        if self._mqtt.connected.is_set():
            self._mqtt.publish(self.topics.status(self.config.device_id),
                               protocol.control("status", state=state, round=rnd,
                                                detail=detail[:500]), retain=True)

    # ---------------------------------------------------------------- main loop
    def run(self) -> int:
        """Serve rounds until told to stop; returns the number of rounds trained."""
        c = self.config
        t = self.topics
        self._mqtt = mqtt = QueuedClient(
            self.broker, c.device_id,
            [t.round, t.ack(c.device_id), t.server], logger,
            will_topic=t.status(c.device_id), will_payload=protocol.OFFLINE,
            on_connected=self._announce_online)
        try:
            mqtt.start(c.connect_timeout)
            while not self._done():
                try:
                    topic, payload, _retained = mqtt.events.get(timeout=1.0)
                except queue.Empty:
                    self._maybe_resend()
                    continue
                self._handle(topic, payload)
        finally:
            if mqtt.connected.is_set():
                info = mqtt.publish(t.status(c.device_id), protocol.OFFLINE, retain=True)
                info.wait_for_publish(5)
            mqtt.stop()
        return self.rounds_trained

    def _done(self) -> bool:
        c = self.config
        if c.max_rounds is not None and self.rounds_trained >= c.max_rounds and \
                self._acked[0] >= 0 and self._stored_round() == self._acked[0]:
            return True
        return self._finished

    def _handle(self, topic: str, payload: bytes) -> None:
        t = self.topics
        try:
            if topic == t.round:
                self._on_round(payload)
            elif topic.startswith(t.model("")):
                self._on_model_chunk(payload)
            elif topic == t.ack(self.config.device_id):
                self._on_ack(protocol.parse_control(payload, "ack"))
            elif topic == t.server:
                self._on_server(payload)
            elif topic == CONNECTED:
                self._resume_round()
        except protocol.ProtocolError as e:
            logger.warning("ignored a bad message on %s: %s", topic[:200], e)
        except Exception as e:  # noqa: BLE001 - the handler boundary: go on
            logger.debug("handler of %s failed", topic[:200], exc_info=True)
            logger.warning("ignored a message on %s that failed its handler: %s: %s",
                           topic[:200], type(e).__name__, str(e)[:300])

    def _model_dropped(self, sender: str, held: int, count: int, why: str) -> None:
        logger.info("dropped an unfinished global model (%d of %d chunks): %s",
                    held, count, why)

    def _resume_round(self) -> None:
        """After a (re)connect: ask again for the announced model if it is still
        missing (a restarted broker may have lost the subscription), and re-send
        an unacknowledged update."""
        ann = self._round
        if ann is not None and self.config.device_id in ann["selected"] and \
                self._stored_round() != ann["round"] and (
                self._model is None or
                protocol.digest_of(self._model) != ann["model"]["digest"]):
            self._mqtt.subscribe(self.topics.model("+"))
        self._maybe_resend(force=True)

    def _on_server(self, payload: bytes) -> None:
        if not payload:
            return
        msg = protocol.parse_control(payload, "server")
        if msg["state"] == "finished" and self.config.exit_when_finished and \
                self._round is not None:
            logger.info("the aggregator finished the federation")
            self._finished = True

    def _on_round(self, payload: bytes) -> None:
        if not payload:
            return
        ann = protocol.parse_control(payload, "round")
        key = (ann["round"], ann["attempt"], ann["deadline"])
        if key == self._handled:  # the same retained announcement after a reconnect
            return
        self._handled, self._round = key, ann
        me = self.config.device_id
        stored = self._stored
        if stored is not None and stored[0] < ann["round"]:
            self._drop_stored()  # a later round: the old update is of no use now
            stored = None
        if me not in ann["selected"]:
            self._unsubscribe_model()
            return
        if stored is not None and stored[0] == ann["round"]:
            logger.info("round %d announced again: re-sending the stored update",
                        ann["round"] + 1)
            self._send(stored[1], ann["round"])
            return
        if self._model is not None and protocol.digest_of(self._model) == \
                ann["model"]["digest"]:
            self._train(self._model)
        else:
            self._mqtt.subscribe(self.topics.model("+"))

    def _unsubscribe_model(self) -> None:
        if self._mqtt.connected.is_set():
            self._mqtt.unsubscribe(self.topics.model("+"))

    def _on_model_chunk(self, payload: bytes) -> None:
        if not payload or self._round is None:
            return
        model = self._models.add("aggregator", payload)
        if model is None:
            return
        if protocol.digest_of(model) != self._round["model"]["digest"]:
            logger.info("ignored a global model that is not the announced one")
            return
        self._model = model
        self._unsubscribe_model()
        ann = self._round
        stored = self._stored
        if self.config.device_id in ann["selected"] and (
                stored is None or stored[0] != ann["round"]):
            self._train(model)

    def _train(self, model_bytes: bytes) -> None:
        ann, me = self._round, self.config.device_id
        rnd, cfg = ann["round"], ann["config"]
        self._status("training", rnd)
        try:
            net = self._network(cfg["model"])
            # the global model holds exactly the announced network's tensors (like:
            # the model's own arrays, not a state_dict copy of them)
            msg = codec.decode(model_bytes, max_bytes=self.config.max_model_bytes,
                               like={**net.params(), **net.buffers()}, exact=True)
            if msg.kind != "model" or msg.round != rnd:
                raise protocol.ProtocolError(f"global model: expected round {rnd}, got "
                                             f"kind {msg.kind} round {msg.round}")
            net.load_state_dict(msg.tensors)
            del msg  # a second copy of the model through the whole round otherwise
            data = self.data
            if "mean" in cfg and "std" in cfg:  # the federation's normalisation
                data = replace(data, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
            local = self._fit_memory(LocalConfig(**cfg["local"]), cfg["model"], data)
            logger.info("round %d: training on %d examples", rnd + 1, len(data))
            update = local_round(net, data, MethodConfig(**cfg["method"]), local,
                                 lr=float(cfg["lr"]), seed=int(cfg["seeds"][me]))
            reply = codec.Message("update", rnd, me, cfg["method"]["method"],
                                  update.tensors, update.num_examples, update.metrics)
            data_out = codec.encode(reply, cfg.get("encoding", "csr"))
        except (SparseFedError, KeyError, TypeError, ValueError) as e:
            logger.error("round %d: cannot train: %s", rnd + 1, e)
            self._status("error", rnd, str(e))
            return
        self._store(rnd, data_out)
        self.rounds_trained += 1
        self._send(data_out, rnd)

    def _fit_memory(self, local: LocalConfig, spec: dict, data) -> LocalConfig:
        """The announced local settings, with recomputation (``--recompute``, or
        when the memory budget needs it: the same training) and then a smaller
        batch if the budget still needs it (ConfigError, reported as an error
        status, if nothing fits)."""
        local = replace(local, recompute=self.config.recompute)
        if self.config.max_memory is None:
            return local
        budget = self.config.max_memory
        batch, estimate = plan_batch_size(budget, local.batch_size, spec, data,
                                          recompute=local.recompute)
        if batch != local.batch_size and not local.recompute:
            try:
                again = plan_batch_size(budget, local.batch_size, spec, data,
                                        recompute=True)
            except ConfigError:
                again = (0, 0)
            if again[0] > batch:
                batch, estimate = again
                local = replace(local, recompute=True)
                logger.warning("memory budget %d MB: recomputing block activations "
                               "in backward (the same training, one more forward "
                               "per block)", budget >> 20)
        if batch != local.batch_size:
            logger.warning("memory budget %d MB: batch size %d instead of %d "
                           "(estimated peak %d MB)", self.config.max_memory >> 20,
                           batch, local.batch_size, estimate >> 20)
        return replace(local, batch_size=batch)

    def _network(self, spec: dict):
        # no random initialisation: the global model's weights are loaded next
        if spec != self._net_spec:
            self._net = models.build(spec["name"], num_classes=spec["num_classes"],
                                     width=spec["width"], alpha=spec["alpha"],
                                     in_channels=spec["in_channels"], init=False)
            self._net_spec = dict(spec)
        return self._net

    def _send(self, data: bytes, rnd: int) -> None:
        me = self.config.device_id
        chunks = protocol.split(data, self.config.chunk_bytes)
        for chunk in chunks:
            self._mqtt.publish_confirmed(self.topics.update(me), chunk,
                                         timeout=self.config.publish_timeout)
        self._sent_at = time.monotonic()
        logger.info("round %d: update sent (%d bytes, %d chunks)", rnd + 1, len(data),
                    len(chunks))
        self._status("uploaded", rnd)

    def _maybe_resend(self, force: bool = False) -> None:
        """Re-send a stored, unacknowledged update of the current round."""
        if self._round is None or not self._mqtt.connected.is_set():
            return
        stored = self._stored
        if stored is None or stored[0] != self._round["round"] or \
                self._acked[0] == stored[0]:
            return
        if force or time.monotonic() - self._sent_at > self.config.ack_timeout:
            logger.info("round %d: no ack yet, re-sending the update", stored[0] + 1)
            self._send(stored[1], stored[0])

    def _on_ack(self, ack: dict) -> None:
        if "digest" in ack:  # older aggregators do not name the upload
            mine = self._stored is not None and \
                ack["digest"] == protocol.digest_of(self._stored[1])
            if not mine:
                logger.debug("ignored an ack for an upload this device did not send "
                             "(%s): %s", ack["digest"][:16] or "no digest",
                             ack["reason"][:200])
                return
        stored = self._stored_round()
        if ack["accepted"]:
            logger.info("round %d: update accepted", ack["round"] + 1)
        else:
            logger.warning("round %d: update rejected by the aggregator: %s",
                           ack["round"] + 1, ack["reason"])
            self._status("error", ack["round"], ack["reason"])
        if stored is not None and ack["round"] in (stored, -1):
            self._acked = [stored, ack["reason"]]
            self._save_state()
