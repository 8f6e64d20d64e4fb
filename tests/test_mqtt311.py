"""MQTT 3.1.1 in BrokerSettings/QueuedClient (issue 18): the option is checked, and
a 3.1.1 durable session (clean_session=False) on a real private Mosquitto gets a
QoS 1 message published while it was offline once it reconnects."""

from __future__ import annotations

import logging
import queue
import time

import pytest

from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.runtime.wire.broker import BrokerSettings, QueuedClient, CONNECTED

pytestmark = pytest.mark.mqtt
log = logging.getLogger("test")


def test_bad_mqtt_version_names_the_option():
    with pytest.raises(ConfigError, match="--mqtt-version.*3.1"):
        BrokerSettings("localhost", 1883, mqtt_version="4")


def _next_message(client: QueuedClient, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            topic, payload, _ = client.events.get(timeout=0.5)
        except queue.Empty:
            continue
        if topic != CONNECTED:
            return topic, payload
    return None


def test_mqtt311_durable_session_gets_queued_message(mosquitto):
    settings = BrokerSettings("127.0.0.1", mosquitto.port, mqtt_version="3.1.1")
    sub = QueuedClient(settings, "durable311", ["t/q"], log)
    sub.start(10)
    assert sub.connected.wait(10)
    sub.stop()
    pub = QueuedClient(settings, "pub311", [], log)
    pub.start(10)
    assert pub.connected.wait(10)
    pub.publish_confirmed("t/q", b"while offline", timeout=10)
    pub.stop()
    again = QueuedClient(settings, "durable311", ["t/q"], log)
    again.start(10)
    try:
        assert _next_message(again) == ("t/q", b"while offline")
    finally:
        again.stop()
