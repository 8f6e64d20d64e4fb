"""A hostile device cannot stop the aggregator or the device agent (issue 14).

Unit part (no broker): the aggregator's and the agent's message handlers fed
what one device's credentials can send: deep or oversized JSON, numbers out of
range, retained updates, wrong methods, inflated example counts, acks of other
uploads, handlers that raise; each is answered with one log line naming the
sender (and an ack where there is an upload) and nothing propagates.

Live part: a real ``sparsefedpp serve`` and a real device agent on the broker
as shipped (secure_mosquitto: users aggregator, dev1, dev2; client id forced
to the username), the attacker holding only dev1's or dev2's password.
"""

from __future__ import annotations

import logging
import queue
import re
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from sparsefedpp.runtime import models
from sparsefedpp.runtime.wire import codec, protocol
from sparsefedpp.runtime.wire.broker import BrokerSettings
from sparsefedpp.runtime.wire.codec import Message
from sparsefedpp.server import mqtt_service
from sparsefedpp.server.arrival import metrics_problem, update_problem
from sparsefedpp.server.mqtt_service import ALREADY_COUNTED, Aggregator
from sparsefedpp.server.service_config import ServiceConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from fedproc import Federation, make_shards, require_cifar, write_config

LOGGER = "sparsefedpp.server.mqtt_service"


# ------------------------------------------------------------ a broker-less aggregator
class FakePaho:
    def __init__(self):
        self.published: list[tuple[str, bytes, bool]] = []

    def publish(self, topic, payload, qos=0, retain=False):
        self.published.append((topic, bytes(payload), retain))


class FakeMqtt:
    def __init__(self):
        self.paho = FakePaho()
        self.events: queue.Queue = queue.Queue()
        self.connected = threading.Event()

    def publish(self, topic, payload, *, retain=False):  # as QueuedClient.publish
        self.paho.publish(topic, payload, qos=1, retain=retain)

    def acks(self, device: str) -> list[dict]:
        return [protocol.parse_control(p, "ack") for t, p, _ in self.paho.published
                if t == f"sfpp/ack/{device}"]


def reference() -> dict:
    return {"w": np.zeros((3, 4), np.float32), "b": np.ones(4, np.float32)}


def make_aggregator(tmp_path: Path, **config) -> Aggregator:
    service = ServiceConfig(**{"devices": ("dev1", "dev2"), "rounds": 3,
                               "state_dir": str(tmp_path / "agg"), "method": "fedavg",
                               **config})
    agg = Aggregator(service, None, reference(), broker=BrokerSettings(
        "127.0.0.1", 1, username="aggregator"), round_config=lambda rnd: {})
    agg._mqtt = FakeMqtt()
    return agg


def open_round(agg: Aggregator, rnd: int = 0, selected=("dev1", "dev2")) -> None:
    agg._round, agg._selected = rnd, list(selected)
    agg._accepted, agg._rejected, agg._round_digests = {}, [], {}


def update(device="dev1", rnd=0, *, method="fedavg", num_examples=10, meta=None,
           tensors=None) -> bytes:
    return codec.encode(Message("update", rnd, device, method,
                                tensors or reference(), num_examples, meta or {}),
                        "dense")


def send(agg: Aggregator, device: str, payload: bytes, retained=False) -> None:
    for chunk in protocol.split(payload, 4096):
        agg._handle(f"sfpp/update/{device}", chunk, retained)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno >= logging.WARNING]


def test_a_retained_deep_status_is_ignored_cleared_and_logged_once(tmp_path, caplog):
    agg = make_aggregator(tmp_path)
    agg._handle("sfpp/status/dev1", b"[" * 2000, True)
    (line,) = warnings_of(caplog)
    assert line.startswith("ignored a bad status from dev1 (retained: cleared it): ")
    assert "nested at most 16 levels deep, got 2000" in line
    assert agg._mqtt.paho.published == [("sfpp/status/dev1", b"", True)]
    assert not agg.online.get("dev1")
    # a live (not retained) bad status is ignored, not cleared
    agg._handle("sfpp/status/dev2", b'{"v": 1, "type": "status"', False)
    assert len(warnings_of(caplog)) == 2 and len(agg._mqtt.paho.published) == 1


def test_status_numbers_are_checked_and_examples_remembered(tmp_path, caplog):
    agg = make_aggregator(tmp_path)
    agg._handle("sfpp/status/dev1", b'{"v":1,"type":"status","state":"online",'
                b'"examples":' + b"1" + b"0" * 400 + b"}", True)
    assert "'examples': expected 1 to" in warnings_of(caplog)[0]
    assert "dev1" not in agg.declared and not agg.online.get("dev1")
    agg._handle("sfpp/status/dev1", protocol.control("status", state="online",
                                                      examples=50), True)
    assert agg.declared == {"dev1": 50} and agg.online["dev1"]


@pytest.mark.parametrize("meta, match", [
    ({"loss": 10**400}, r"metrics 'loss': expected a finite number within \+-1e\+15, "
                        r"got an integer of 1329 bits"),
    ({"loss": -2e15}, r"metrics 'loss': .*got -2000000000000000.0"),
    ({"x": [1, 2]}, r"metrics 'x': expected a number, true/false, null or a string, "
                    r"got list"),
    ({"x": {"y": 1}}, r"metrics 'x': .*got dict"),
    ({"k" * 65: 1}, r"metrics key 'kkkk.*expected at most 64 characters, got 65"),
    ({f"m{i}": 1 for i in range(65)}, r"metrics: expected at most 64 entries, got 65"),
    ({"note": "x" * 257}, r"metrics 'note': expected a string of at most 256 "
                           r"characters, got 257"),
])
def test_metrics_out_of_range_reject_the_update(tmp_path, meta, match):
    assert re.match(match, metrics_problem(meta)), metrics_problem(meta)
    agg = make_aggregator(tmp_path)
    open_round(agg)
    send(agg, "dev1", update(meta=meta))
    (ack,) = agg._mqtt.acks("dev1")
    assert not ack["accepted"] and ack["reason"] == metrics_problem(meta)
    assert agg._accepted == {}


def test_usual_metrics_pass():
    meta = {"loss": 2.3, "accuracy": 0.1, "train_seconds": 3.5, "nonzeros": 12345,
            "act_keep": 0.5, "flag": True, "none": None, "note": "ok"}
    assert metrics_problem(meta) == ""


def test_an_update_must_name_the_announced_method(tmp_path):
    msg = codec.decode(update(method="topk"))
    assert update_problem(msg, reference(), max_examples=100, max_norm=None,
                          method="fedavg") == \
        "method 'topk': expected the announced 'fedavg'"
    agg = make_aggregator(tmp_path)
    open_round(agg)
    send(agg, "dev1", update(method="topk"))
    assert agg._mqtt.acks("dev1")[0]["reason"] == \
        "method 'topk': expected the announced 'fedavg'"


def test_num_examples_is_bounded_by_the_declared_count_and_max_examples(tmp_path):
    assert ServiceConfig(devices=("a",), rounds=1, state_dir="x").max_examples == \
        100_000
    agg = make_aggregator(tmp_path, max_examples=1000)
    open_round(agg)
    send(agg, "dev2", update("dev2", num_examples=1001))  # declared nothing
    assert agg._mqtt.acks("dev2")[-1]["reason"] == \
        "num_examples: expected 1 to 1000, got 1001"
    agg._handle("sfpp/status/dev1", protocol.control("status", state="online",
                                                      examples=50), True)
    send(agg, "dev1", update(num_examples=51))
    assert agg._mqtt.acks("dev1")[-1]["reason"] == \
        "num_examples: expected 1 to 50 (the count it declared online), got 51"
    send(agg, "dev1", update(num_examples=50))
    assert agg._mqtt.acks("dev1")[-1]["accepted"]
    # a declaration above max_examples does not lift the cap
    agg._handle("sfpp/status/dev2", protocol.control("status", state="online",
                                                      examples=10**6), True)
    send(agg, "dev2", update("dev2", num_examples=5000))
    assert agg._mqtt.acks("dev2")[-1]["reason"] == \
        "num_examples: expected 1 to 1000, got 5000"


def test_a_retained_update_is_ignored_cleared_and_never_acked(tmp_path, caplog):
    agg = make_aggregator(tmp_path)
    open_round(agg)
    agg._handle("sfpp/update/dev1", protocol.split(update())[0], True)
    assert warnings_of(caplog) == ["ignored a retained update from dev1 (updates are "
                                   "never retained); cleared it"]
    assert agg._mqtt.paho.published == [("sfpp/update/dev1", b"", True)]
    assert agg._accepted == {}
    agg._handle("sfpp/update/dev1", b"", True)  # someone's clear: nothing to do
    assert len(agg._mqtt.paho.published) == 1


def test_acks_name_the_digest_of_the_upload(tmp_path):
    agg = make_aggregator(tmp_path)
    open_round(agg)
    good = update()
    send(agg, "dev1", good)
    junk_chunk = protocol.split(b"x" * 10)[0]
    agg._handle("sfpp/update/dev1", junk_chunk, False)
    agg._handle("sfpp/update/dev1", b"JUNK" * 20, False)
    accepted, junk, raw = agg._mqtt.acks("dev1")
    assert accepted == {"v": 1, "type": "ack", "round": 0, "accepted": True,
                        "reason": "", "digest": protocol.digest_of(good)}
    assert junk["digest"] == protocol.digest_of(b"x" * 10) and not junk["accepted"]
    assert raw["digest"] == "" and raw["reason"].startswith("bad chunk: chunk magic")


def test_dropped_unfinished_transfers_are_logged(tmp_path, caplog):
    agg = make_aggregator(tmp_path)
    open_round(agg)
    first, second = protocol.split(update(), 40), protocol.split(
        update(num_examples=11), 40)
    assert len(first) > 2
    agg._handle("sfpp/update/dev1", first[0], False)
    agg._handle("sfpp/update/dev1", first[1], False)
    agg._handle("sfpp/update/dev1", second[0], False)
    agg._handle("sfpp/status/dev1", protocol.OFFLINE, True)
    assert warnings_of(caplog) == [
        f"dropped an unfinished upload from dev1 (2 of {len(first)} chunks): "
        "replaced by a newer transfer",
        f"dropped an unfinished upload from dev1 (1 of {len(second)} chunks): "
        "the device went offline"]


def test_a_handler_that_raises_is_logged_and_the_upload_rejected(tmp_path, caplog,
                                                                 monkeypatch):
    agg = make_aggregator(tmp_path)
    open_round(agg)

    def boom(*args, **kwargs):
        raise ZeroDivisionError("a programming error")

    monkeypatch.setattr(mqtt_service, "update_problem", boom)
    good = update()
    send(agg, "dev1", good)
    (ack,) = agg._mqtt.acks("dev1")
    assert not ack["accepted"] and ack["digest"] == protocol.digest_of(good)
    assert ack["reason"] == ("internal error on this message: ZeroDivisionError: a "
                             "programming error")
    monkeypatch.setattr(agg, "_on_status", boom)
    agg._handle("sfpp/status/dev2", protocol.OFFLINE, True)
    assert warnings_of(caplog) == [
        "rejected an update from dev1: " + ack["reason"],
        "dropped a message from dev2 on sfpp/status/dev2: internal error on this "
        "message: ZeroDivisionError: a programming error"]


def test_a_failed_republish_after_a_reconnect_is_logged_not_raised(tmp_path, caplog,
                                                                   monkeypatch):
    from sparsefedpp.runtime.errors import TransportError
    from sparsefedpp.runtime.wire.broker import CONNECTED

    agg = make_aggregator(tmp_path)

    def gone():
        raise TransportError("publish to sfpp/round: no PUBACK within 120 s")

    monkeypatch.setattr(agg, "_republish", gone)
    agg._handle(CONNECTED, b"", False)
    assert warnings_of(caplog) == [
        "publishing the round again after a reconnect failed (TransportError: "
        "publish to sfpp/round: no PUBACK within 120 s); again at the next reconnect"]


def test_an_update_with_deeply_nested_meta_is_rejected(tmp_path):
    """The codec's meta JSON of "[" x 5010, CRC recomputed: a reason, no crash."""
    import struct
    import zlib

    text = b'{"a":"' + b"x" * 5000 + b'"}'
    data = update(meta={"a": "x" * 5000})
    at = data.index(text)
    body = data[:at] + b"[" * len(text) + data[at + len(text):-4]
    forged = body + struct.pack("<I", zlib.crc32(body))
    agg = make_aggregator(tmp_path)
    open_round(agg)
    send(agg, "dev1", forged)
    (ack,) = agg._mqtt.acks("dev1")
    assert not ack["accepted"] and ack["digest"] == protocol.digest_of(forged)
    assert ack["reason"].startswith("undecodable update: message meta")


def test_an_undecodable_meta_that_raises_anything_is_rejected(tmp_path, monkeypatch):
    agg = make_aggregator(tmp_path)
    open_round(agg)

    def deep(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(mqtt_service.codec, "decode", deep)
    send(agg, "dev1", update())
    assert agg._mqtt.acks("dev1")[0]["reason"] == "undecodable update: RecursionError"


def test_a_counted_update_is_acked_already_counted_also_after_a_restart(tmp_path):
    agg = make_aggregator(tmp_path)
    open_round(agg)
    good = update()
    send(agg, "dev1", good)
    send(agg, "dev1", good)  # the same round: counted once
    assert [a["reason"] for a in agg._mqtt.acks("dev1")] == ["", ALREADY_COUNTED]
    # the round is aggregated and saved (what the round loop does after aggregating)
    agg._counted[protocol.digest_of(good)] = (0, "dev1")
    agg.next_round = 1
    agg._save()

    again = make_aggregator(tmp_path)  # a restarted service
    assert again.next_round == 1
    open_round(again, 1)
    send(again, "dev1", good)
    send(again, "dev2", good)  # the same bytes on another device's topic: not its
    (ack,) = again._mqtt.acks("dev1")
    assert ack == {"v": 1, "type": "ack", "round": 0, "accepted": True,
                   "reason": ALREADY_COUNTED, "digest": protocol.digest_of(good)}
    assert again._mqtt.acks("dev2")[0]["reason"].startswith(
        "expected an update sent by dev2")
    # an uncounted late update is still refused
    send(again, "dev2", update("dev2", 0))
    assert again._mqtt.acks("dev2")[1]["reason"] == "round 1 is closed (now round 2)"


def test_counted_digests_keep_the_last_rounds_and_old_state_files_load(tmp_path):
    agg = make_aggregator(tmp_path)
    for rnd in range(6):
        agg._counted[f"{rnd:064x}"] = (rnd, "dev1")
    agg.next_round = 6
    agg._save()
    meta = codec.decode((tmp_path / "agg" / "federation.sfpp").read_bytes()).meta
    assert meta["counted"] == [[r, "dev1", f"{r:064x}"] for r in (3, 4, 5)]
    # a state file written before the digests were kept
    old = codec.Message("model", 2, "aggregator", "fedavg", reference(), 0,
                        {"fingerprint": {}, "next_round": 2, "totals": {}})
    (tmp_path / "agg" / "federation.sfpp").write_bytes(codec.encode(old, "csr"))
    resumed = make_aggregator(tmp_path)
    assert resumed.next_round == 2 and resumed._counted == {}


def test_the_aggregators_client_id_is_its_username(tmp_path):
    agg = make_aggregator(tmp_path)
    assert agg.client_id == "aggregator"
    agg.broker = BrokerSettings("127.0.0.1", 1)
    assert agg.client_id == "sfpp-aggregator"
    agg = make_aggregator(tmp_path, client_id="farm-agg")
    assert agg.client_id == "farm-agg"


# ---------------------------------------------------------- a broker-less device agent
AGENT_LOGGER = "sparsefedpp.trainer.device_agent"


def make_agent(tmp_path: Path, n: int = 7):
    from sparsefedpp.trainer.data import Dataset
    from sparsefedpp.trainer.device_agent import AgentConfig, DeviceAgent

    data = Dataset(np.zeros((n, 3, 4, 4), np.uint8), np.zeros(n, np.int64),
                   ("a", "b"), (0.5,) * 3, (0.25,) * 3, "tiny")
    agent = DeviceAgent(AgentConfig("dev1", str(tmp_path / "dev1")), data,
                        BrokerSettings("127.0.0.1", 1, username="dev1"))
    agent._mqtt = FakeMqtt()
    agent._mqtt.connected.set()
    return agent


def agent_lines(caplog, level=logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == AGENT_LOGGER and r.levelno >= level]


def test_the_agents_online_status_declares_its_examples(tmp_path):
    agent = make_agent(tmp_path, n=7)
    agent._announce_online(agent._mqtt.paho)
    ((topic, payload, retain),) = agent._mqtt.paho.published
    assert topic == "sfpp/status/dev1" and retain
    assert protocol.parse_control(payload, "status") == {
        "v": 1, "type": "status", "state": "online", "examples": 7}


def test_the_agent_ignores_acks_of_uploads_it_did_not_send(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, AGENT_LOGGER)
    agent = make_agent(tmp_path)
    mine = update("dev1", 3)
    agent._store(3, mine)
    foreign = protocol.control("ack", round=-1, accepted=False,
                               reason="bad chunk: forged", digest="ab" * 32)
    agent._handle("sfpp/ack/dev1", foreign)
    agent._handle("sfpp/ack/dev1", protocol.control(
        "ack", round=-1, accepted=False, reason="bad chunk: junk", digest=""))
    assert agent._acked == [-1, ""] and agent_lines(caplog) == []
    assert agent._mqtt.paho.published == []  # no "error" status either
    debug = agent_lines(caplog, logging.DEBUG)
    assert debug[0] == ("ignored an ack for an upload this device did not send "
                        "(abababababababab): bad chunk: forged")
    assert debug[1].endswith("(no digest): bad chunk: junk")
    # its own upload's ack counts
    agent._handle("sfpp/ack/dev1", protocol.control(
        "ack", round=3, accepted=True, reason=ALREADY_COUNTED,
        digest=protocol.digest_of(mine)))
    assert agent._acked == [3, ALREADY_COUNTED]


def test_the_agent_handles_an_old_ack_without_digest_as_before(tmp_path, caplog):
    agent = make_agent(tmp_path)
    agent._store(2, update("dev1", 2))
    agent._handle("sfpp/ack/dev1", protocol.control("ack", round=2, accepted=False,
                                                     reason="too late"))
    assert agent._acked == [2, "too late"]
    assert agent_lines(caplog) == ["round 3: update rejected by the aggregator: "
                                   "too late"]


def test_no_message_stops_the_agent(tmp_path, caplog, monkeypatch):
    agent = make_agent(tmp_path)
    agent._handle("sfpp/round", b"[" * 2000)
    agent._handle("sfpp/server", b"{" * 100000)
    agent._handle("sfpp/ack/dev1", b'{"v":1,"type":"ack","accepted":true,"reason":"",'
                  b'"round":' + b"9" * 500 + b"}")

    def boom(payload):
        raise KeyError("a programming error")

    monkeypatch.setattr(agent, "_on_round", boom)
    agent._handle("sfpp/round", b"{}")
    lines = agent_lines(caplog)
    assert len(lines) == 4
    assert "nested at most 16 levels deep, got 2000" in lines[0]
    assert "expected at most 8192 bytes" in lines[1]
    assert "'round': expected -1 to" in lines[2]
    assert lines[3] == ("ignored a message on sfpp/round that failed its handler: "
                        "KeyError: 'a programming error'")


def test_the_agents_client_id_is_its_device_id(tmp_path, monkeypatch):
    from sparsefedpp.trainer import device_agent

    class Built(Exception):
        pass

    def capture(settings, client_id, subscriptions, log, **kwargs):
        raise Built(client_id)

    monkeypatch.setattr(device_agent, "QueuedClient", capture)
    with pytest.raises(Built, match="^dev1$"):
        make_agent(tmp_path).run()


# ------------------------------------------------------------------ QueuedClient
@pytest.mark.mqtt
def test_watched_topics_see_the_retain_flag_live_and_not_their_own_clear(mosquitto):
    """The aggregator's subscription options (MQTT 5 retain-as-published and
    no-local) on a real Mosquitto: a live retained publish arrives flagged, the
    owner's own clearing publish does not come back to it."""
    import paho.mqtt.client as mqtt
    from sparsefedpp.runtime.wire.broker import CONNECTED, QueuedClient

    settings = BrokerSettings(mosquitto.host, mosquitto.port)
    owner = QueuedClient(settings, "owner", ["t/watched/+", "t/plain/+"],
                         logging.getLogger("test"), watched=("t/watched/+",))
    other = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="other",
                        protocol=mqtt.MQTTv5)
    other.connect(mosquitto.host, mosquitto.port)
    other.loop_start()
    try:
        owner.start(30)
        assert owner.events.get(timeout=30) == (CONNECTED, b"", False)
        for topic in ("t/watched/a", "t/plain/a"):
            other.publish(topic, b"kept", qos=1, retain=True).wait_for_publish(30)
        got = [owner.events.get(timeout=30) for _ in range(2)]
        assert sorted(got) == [("t/plain/a", b"kept", False),  # the default: live
                               ("t/watched/a", b"kept", True)]  # as published
        owner.publish_confirmed("t/watched/a", b"", retain=True)  # the clear
        owner.publish_confirmed("t/plain/a", b"mine")
        assert owner.events.get(timeout=30) == ("t/plain/a", b"mine", False)
        assert owner.events.empty()  # the clear on the watched topic never came back
    finally:
        owner.stop()
        other.disconnect()
        other.loop_stop()


# ------------------------------------------------------------------ the live run
class Attacker:
    """A raw paho MQTT 5 client holding one device's password (the broker forces
    the client id to the username). The paho thread only files messages away."""

    def __init__(self, broker, user: str, password: str, subscriptions=()):
        import paho.mqtt.client as mqtt

        self.cond = threading.Condition()
        self.received: list[tuple[str, bytes, bool]] = []
        self.errors: list[str] = []
        self._pubacks: dict[int, int] = {}
        self._up = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user,
                                  protocol=mqtt.MQTTv5)
        self.client.username_pw_set(user, password)
        self.client.on_connect = lambda c, u, f, rc, p: self._up.set()
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.connect(broker.host, broker.port, keepalive=30, clean_start=True)
        self.client.loop_start()
        assert self._up.wait(30), f"{user}: no CONNACK"
        for topic in subscriptions:
            self.client.subscribe(topic, qos=1)

    def _on_message(self, client, userdata, message):
        with self.cond:
            self.received.append((message.topic, bytes(message.payload),
                                  bool(message.retain)))
            self.cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self.cond:
            self._pubacks[mid] = reason_code.value
            self.cond.notify_all()

    def wait_for(self, what, timeout: float, why: str):
        with self.cond:
            value = self.cond.wait_for(what, timeout)
        assert value, f"timed out after {timeout} s waiting for {why}"
        return value

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        self.wait_for(lambda: info.mid in self._pubacks, 30, f"PUBACK {topic}")
        # 0x10: accepted, no subscriber yet (still retained if asked)
        assert self._pubacks[info.mid] in (0, 0x10), (topic, self._pubacks[info.mid])

    def messages(self, topic: str) -> list[bytes]:
        return [p for t, p, _ in self.received if t == topic]

    def ack_of(self, device: str, digest: str, after: int = 0,
               timeout: float = 60) -> dict:
        """The first ack naming ``digest`` among the acks after the ``after`` first."""
        def find():
            for payload in self.messages(f"sfpp/ack/{device}")[after:]:
                ack = protocol.parse_control(payload, "ack")
                if ack.get("digest") == digest:
                    return ack
            return None
        return self.wait_for(find, timeout, f"the ack of {digest[:12]}")

    def upload(self, payload: bytes) -> dict:
        """Publish an update as one chunk on its own topic; the aggregator's ack."""
        (chunk,) = protocol.split(payload, len(payload) + 1)
        with self.cond:
            seen = len(self.messages("sfpp/ack/dev2"))
        self.publish("sfpp/update/dev2", chunk)
        return self.ack_of("dev2", protocol.digest_of(payload), seen)

    def announcement(self, rnd: int, timeout: float, not_deadline=None) -> tuple:
        """The latest round ``rnd`` announcement (another than ``not_deadline``)
        and its global model."""
        def find():
            for payload in reversed(self.messages("sfpp/round")):
                ann = protocol.parse_control(payload, "round") if payload else None
                if ann and ann["round"] == rnd and ann["deadline"] != not_deadline:
                    return ann
            return None
        ann = self.wait_for(find, timeout, f"round {rnd + 1}")

        def model():
            # only the announced model's chunks: a multi-chunk (dense) model of
            # another round would make the reassembler drop this one
            r = protocol.Reassembler(max_total=64 << 20)
            digest = ann["model"]["digest"]
            for payload in self.messages(f"sfpp/model/{0}") + [
                    p for t, p, _ in self.received if t.startswith("sfpp/model/")
                    and t != "sfpp/model/0"]:
                if payload and protocol.transfer_id(payload) == digest:
                    try:
                        whole = r.add("aggregator", payload)
                    except protocol.ProtocolError:
                        continue
                    if whole is not None and protocol.digest_of(whole) == \
                            ann["model"]["digest"]:
                        return whole
            return None
        return ann, codec.decode(self.wait_for(model, 60, "the announced model"))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish_as_will(broker, user: str, password: str, topic: str,
                    payload: bytes) -> None:
    """Take over ``user``'s durable session (clean_start=False, session kept), leave
    ``payload`` as the will on ``topic`` and disconnect with reason 0x04: the
    broker publishes it once we are gone, so the aggregator's ack of it is queued
    for the user's real agent, which reconnects to that session."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode
    from sparsefedpp.runtime.wire.broker import SESSION_EXPIRY

    up = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user,
                         protocol=mqtt.MQTTv5)
    client.username_pw_set(user, password)
    client.will_set(topic, payload, qos=1, retain=False)
    client.on_connect = lambda c, u, f, rc, p: up.set()
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = SESSION_EXPIRY
    client.connect(broker.host, broker.port, keepalive=30, clean_start=False,
                   properties=props)
    client.loop_start()
    try:
        assert up.wait(30), f"{user}: no CONNACK"
    finally:
        client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=4))
        client.loop_stop()


def password_file(folder: Path, name: str, password: str) -> str:
    path = folder / f"{name}.pw"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return str(path)


def count(log: str, text: str) -> int:
    return sum(text in line for line in log.splitlines())


def wait_for_count(fed: Federation, text: str, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while count(fed.log("server"), text) < n:
        assert fed.procs["server"].poll() is None, fed.log("server")[-3000:]
        assert time.monotonic() < deadline, (text, fed.log("server")[-3000:])
        time.sleep(0.1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    require_cifar()
    return make_shards(tmp_path_factory.mktemp("shards"), 2)


DEEP = b"[" * 2000
HUGE_EXAMPLES = (b'{"v":1,"type":"status","state":"online","examples":1' + b"0" * 400
                 + b"}")
DECLARED = 50


@pytest.mark.mqtt
def test_one_devices_credentials_cannot_stop_the_federation(secure_mosquitto, shards,
                                                            tmp_path):
    """dev1 runs an honest agent; dev2's password is the attacker's (its agent
    never runs), who also once uses dev1's password. Both rounds complete, with
    one aggregator log line per attack, across a SIGKILLed and restarted serve."""
    b = secure_mosquitto
    fed = Federation(tmp_path, b.url)
    agg_pw = password_file(tmp_path, "aggregator", "agg-secret")
    config = write_config(tmp_path / "fed.toml", ["dev1", "dev2"], rounds=2,
                          per_round=2, min_clients=2, round_timeout=120,
                          device_grace=60, offline_grace=2)
    evil = Attacker(b, "dev2", "pw2", ["sfpp/round", "sfpp/model/+", "sfpp/ack/dev2",
                                       "sfpp/status/dev2"])
    try:
        _hostile_run(fed, evil, b, config, agg_pw, shards, tmp_path)
    finally:
        evil.close()
        fed.close()


def _hostile_run(fed, evil, b, config, agg_pw, shards, tmp_path) -> None:
    # ---- before serve starts: what stopped it at every start
    evil.publish("sfpp/status/dev2", DEEP, retain=True)
    method = "sparsefedpp"
    net = models.build("cnn", num_classes=10, seed=1)
    stale = codec.encode(Message("update", 0, "dev2", method, net.state_dict(), 10),
                         "csr")
    evil.publish("sfpp/update/dev2", protocol.split(stale, len(stale) + 1)[0],
                 retain=True)
    fed.device("dev1", shards[0], "--password-file", password_file(
        tmp_path, "dev1", "pw1"), debug=True)
    fed.server(config, "--password-file", agg_pw)

    fed.wait_for_log("server", "ignored a retained update from dev2")
    fed.wait_for_log("server", "ignored a bad status from dev2 (retained: cleared it)"
                     ": status message: expected JSON nested at most 16 levels deep, "
                     "got 2000")
    evil.wait_for(lambda: b"" in evil.messages("sfpp/status/dev2"), 30, "the clear")
    # a number out of range in a status, retained: ignored and cleared too
    cleared = evil.messages("sfpp/status/dev2").count(b"")
    evil.publish("sfpp/status/dev2", HUGE_EXAMPLES, retain=True)
    evil.wait_for(lambda: evil.messages("sfpp/status/dev2").count(b"") > cleared, 30,
                  "the second clear")
    evil.publish("sfpp/status/dev2", protocol.control(
        "status", state="online", examples=DECLARED), retain=True)

    # ---- round 1: hostile updates on dev2's own topic
    ann, model = evil.announcement(0, 120)
    assert sorted(ann["selected"]) == ["dev1", "dev2"]
    assert ann["config"]["method"]["method"] == method

    def upd(rnd, tensors, *, meth=method, n=DECLARED, meta=None) -> bytes:
        return codec.encode(Message("update", rnd, "dev2", meth, tensors, n,
                                    meta or {}), "csr")

    g = model.tensors
    attacks = {
        "metric 10**400": (upd(0, g, meta={"loss": 10**400}),
                           "metrics 'loss': expected a finite number within +-1e+15, "
                           "got an integer of 1329 bits"),
        "wrong method": (upd(0, g, meth="topk"),
                         f"method 'topk': expected the announced '{method}'"),
        "inflated num_examples": (upd(0, g, n=DECLARED + 1),
                                  f"num_examples: expected 1 to {DECLARED} (the count "
                                  f"it declared online), got {DECLARED + 1}"),
    }
    for name, (payload, reason) in attacks.items():
        ack = evil.upload(payload)
        assert ack == {"v": 1, "type": "ack", "round": 0, "accepted": False,
                       "reason": reason, "digest": protocol.digest_of(payload)}, name
    live = upd(0, g, n=1)
    evil.publish("sfpp/update/dev2", protocol.split(live, len(live) + 1)[0],
                 retain=True)
    wait_for_count(fed, "ignored a retained update from dev2", 2)
    # dev1's password: junk on dev1's topic, published as a will, so that the ack
    # (with the junk's digest) reaches dev1's real agent, which must ignore it
    junk = protocol.split(b"not an update at all")[0]
    publish_as_will(b, "dev1", "pw1", "sfpp/update/dev1", junk)
    wait_for_count(fed, "rejected an update from dev1: undecodable update", 1)
    counted = upd(0, g)
    assert evil.upload(counted)["accepted"]

    # ---- round 2: SIGKILL serve once it is announced, restart it
    ann2, _ = evil.announcement(1, 180)
    fed.kill("server")
    fed.server(config, "--password-file", agg_pw)
    ann2b, model2 = evil.announcement(1, 120, not_deadline=ann2["deadline"])
    late = evil.upload(counted)  # the round-1 update again, after the restart
    assert late == {"v": 1, "type": "ack", "round": 0, "accepted": True,
                    "reason": ALREADY_COUNTED, "digest": protocol.digest_of(counted)}
    assert evil.upload(upd(1, model2.tensors))["accepted"]

    assert fed.wait("server", 180) == 0, fed.log("server")[-3000:]
    assert fed.wait("device-dev1", 60) == 0, fed.log("device-dev1")[-3000:]

    log = fed.log("server")
    assert "Traceback" not in log
    once = ["ignored a bad status from dev2 (retained: cleared it): status message: "
            "expected JSON nested at most 16 levels deep, got 2000",
            "ignored a bad status from dev2 (retained: cleared it): status message "
            "field 'examples': expected 1 to",
            "rejected an update from dev1: undecodable update: message magic",
            "update from dev2 already counted in round 1",
            *(f"rejected an update from dev2: {reason}"
              for _, reason in attacks.values())]
    assert {t: count(log, t) for t in once} == dict.fromkeys(once, 1)
    # the retained update before the start and the live one, each once: cleared,
    # so the restarted serve did not see them again
    assert count(log, "ignored a retained update from dev2") == 2
    assert count(log, "rejected an update") == len(attacks) + 1
    dev1 = fed.log("device-dev1")
    assert "rejected by the aggregator" not in dev1
    assert count(dev1, "ignored an ack for an upload this device did not send") == 1
    rounds = fed.rounds()
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["aggregated"] and sorted(r["accepted"]) == ["dev1", "dev2"]
               for r in rounds)
    assert np.isfinite(rounds[-1]["eval"]["accuracy"])
