"""A paho subscriber that watches an MQTT federation from the broker: the $SYS
counters (bytes and messages in and out), the round announcements and the device
statuses, each with the time it arrived."""

from __future__ import annotations

import json
import os
import threading
import time

from sparsefedpp.runtime.errors import TransportError

from ..mosquitto import HOST

PREFIX = "sfpp"
SYS_TOPICS = ("$SYS/broker/bytes/#", "$SYS/broker/messages/#", "$SYS/broker/load/#",
              "$SYS/broker/clients/connected", "$SYS/broker/version")
BYTES_RECEIVED = "$SYS/broker/bytes/received"
BYTES_SENT = "$SYS/broker/bytes/sent"
MESSAGES_RECEIVED = "$SYS/broker/messages/received"
MESSAGES_SENT = "$SYS/broker/messages/sent"


def _publish_wire_bytes(topic: str, payload: bytes) -> int:
    """Bytes of an MQTT 3.1.1 QoS 0 PUBLISH: fixed header, topic, payload."""
    remaining = 2 + len(topic.encode()) + len(payload)
    length_bytes = 1 if remaining < 128 else 2 if remaining < 16384 else 3
    return 1 + length_bytes + remaining


class Monitor:
    """A paho subscriber: $SYS counters, round announcements, device statuses.

    ``own_bytes`` counts what the broker sent to this subscriber, so it can be taken
    off ``bytes/sent``.
    """

    def __init__(self, port: int):
        import paho.mqtt.client as mqtt

        self.sys: dict[str, list[tuple[float, str]]] = {}
        self.own: list[tuple[float, int]] = [(time.time(), 0)]
        self.announced: dict[tuple[int, int], float] = {}
        self.online: dict[str, float] = {}
        self.connected = threading.Event()
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"sfpp-bench-monitor-{os.getpid()}",
                                  protocol=mqtt.MQTTv311, clean_session=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect(HOST, port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(10):
            self.close()
            raise TransportError(f"bench monitor: expected to connect to {HOST}:{port} "
                                 f"within 10 s, got no CONNACK")

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        client.subscribe([(t, 0) for t in SYS_TOPICS] +
                         [(f"{PREFIX}/round", 0), (f"{PREFIX}/status/+", 0)])
        self.connected.set()

    def _on_message(self, client, userdata, message):
        now, topic, payload = time.time(), message.topic, bytes(message.payload)
        with self._lock:
            wire = _publish_wire_bytes(topic, payload)
            self.own.append((now, self.own[-1][1] + wire))
            if topic.startswith("$SYS/"):
                value = payload.decode(errors="replace")
                self.sys.setdefault(topic, []).append((now, value))
                return
            try:
                msg = json.loads(payload) if payload else {}
            except ValueError:
                return
            if topic == f"{PREFIX}/round" and "round" in msg:
                key = (int(msg["round"]), int(msg.get("attempt", 0)))
                self.announced.setdefault(key, now)
            elif topic.startswith(f"{PREFIX}/status/") and msg.get("state") not in (
                    None, "offline"):
                self.online.setdefault(topic.rsplit("/", 1)[1], now)

    def counter(self, topic: str, *, before: float | None = None,
                after: float | None = None) -> tuple[float, int] | None:
        """(time, value) of the last sample before ``before`` or the first at or
        after ``after``."""
        with self._lock:
            samples = list(self.sys.get(topic, ()))
        if before is not None:
            hits = [s for s in samples if s[0] < before]
            return (hits[-1][0], int(float(hits[-1][1]))) if hits else None
        hits = [s for s in samples if s[0] >= after]
        return (hits[0][0], int(float(hits[0][1]))) if hits else None

    def own_bytes(self, t: float) -> int:
        with self._lock:
            value = 0
            for ts, total in self.own:
                if ts > t:
                    break
                value = total
            return value

    def latest(self, topic: str) -> str | None:
        with self._lock:
            samples = self.sys.get(topic)
            return samples[-1][1] if samples else None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

