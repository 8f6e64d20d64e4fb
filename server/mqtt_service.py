"""The aggregator as an MQTT service: the MQTT transport of the round loop.

server/round_loop.py runs the rounds (the quorum, the deadline policy, the
aggregation, the evaluation, the round record); this module is its transport over
the broker: who is online (retained device status, last wills), announcing a round
(retained model chunks and announcement), collecting updates (reassembly, one
check on arrival, an ack for every upload) and the counted-update digests. Its
settings are server/service_config.py, the check of an arrived update
server/arrival.py, the state file server/state_file.py.

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
from pathlib import Path

import numpy as np
from sparsefedpp.runtime.errors import CodecError
from sparsefedpp.runtime.wire import codec, protocol
from sparsefedpp.runtime.wire.broker import CONNECTED, BrokerSettings, QueuedClient

from . import state_file
from .arrival import update_problem
from .round_loop import Arrivals, RoundLoop, RoundRecord, Transport
from .service_config import ServiceConfig
from .strategy import ClientInstruction, ClientResult, Strategy

logger = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]
ALREADY_COUNTED = "already counted"


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
        self.state_path = Path(config.state_dir) / state_file.STATE_FILE
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
        saved = state_file.load(self.state_path, self.fingerprint, self.tensors)
        if saved is None:
            return
        self.tensors = saved.tensors
        self.next_round = saved.next_round
        self.totals.update(saved.totals)
        self._counted.update(saved.counted)
        logger.info("resuming at round %d from %s", self.next_round + 1, self.state_path)
        self.emit("resume", round=self.next_round, state=str(self.state_path))

    def save_state(self) -> None:
        """The transport's hook after every round: the state file."""
        self._save()

    def _save(self) -> None:
        self._counted = state_file.recent(self._counted, self.next_round)
        state_file.save(self.state_path,
                        state_file.SavedState(self.tensors, self.next_round,
                                              self.totals, self._counted),
                        method=self.config.method, fingerprint=self.fingerprint)

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
        if not payload and not self.broker.v5:
            return  # under 3.1.1 our own clears come back (no no-local): not a device's

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
        self._mqtt.publish(topic, b"", retain=True)

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
        self._mqtt.publish(self.topics.ack(device), data)
