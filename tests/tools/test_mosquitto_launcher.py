"""tools/mosquitto.py: the launcher of the tests, bench-mqtt and scripts/mqtt_demo.sh
(broker facts under the shipped config are in tests/test_mosquitto.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import paho.mqtt.client as mqtt
import pytest
from mosquitto import TIMEOUT, require_mosquitto
from sparsefedpp.runtime.errors import TransportError
from sparsefedpp.tools.mosquitto import ANONYMOUS, SHIPPED_CONF, Mosquitto, parse_config

pytestmark = pytest.mark.mqtt


def _connects(url: str) -> bool:
    """An anonymous MQTT 5 CONNECT to ``url``: True on a successful CONNACK."""
    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="launcher-probe",
                         protocol=mqtt.MQTTv5)
    try:
        client.connect(host, int(port), keepalive=10)
        deadline = time.monotonic() + TIMEOUT
        while not client.is_connected() and time.monotonic() < deadline:
            client.loop(timeout=0.1)
        return client.is_connected()
    finally:
        client.disconnect()


def test_demo_mode_prints_the_url_serves_and_stops_on_sigterm(tmp_path):
    # Arrange
    require_mosquitto()
    folder = tmp_path / "broker"

    # Act: what scripts/mqtt_demo.sh runs
    proc = subprocess.Popen([sys.executable, "-m", "sparsefedpp.tools.mosquitto",
                             str(folder)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        url = proc.stdout.readline().strip()  # printed once the port accepts
        served = _connects(url)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)

    # Assert: anonymous, persistence in the folder, every other setting shipped
    assert url.startswith("mqtt://127.0.0.1:"), err
    assert served and proc.returncode == 0, err
    settings = parse_config((folder / "mosquitto.conf").read_text())
    shipped, rendered = Counter(parse_config(SHIPPED_CONF.read_text())), Counter(settings)
    changed = {key for key, _ in (shipped - rendered) + (rendered - shipped)}
    tls = {"cafile", "certfile", "keyfile", "require_certificate", "tls_version",
           "max_connections"}  # the TLS listener's block, dropped
    logging = {"log_dest", "log_type", "user"}
    assert changed <= set(ANONYMOUS) | tls | logging | {"listener",
                                                        "persistence_location"}
    assert dict(settings)["persistence_location"] == f"{folder.resolve()}/"
    assert (folder / "mosquitto.db").exists()  # saved at the clean shutdown


def test_a_broker_that_exits_at_start_raises_with_its_output(tmp_path):
    # Arrange: a line Mosquitto refuses
    require_mosquitto()
    broker = Mosquitto(tmp_path, settings=ANONYMOUS, append="no_such_option 1\n")

    # Act / Assert
    with pytest.raises(TransportError, match=r"(?s)exit code .*no_such_option"):
        broker.start()
    assert not broker.is_running
