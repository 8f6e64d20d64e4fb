"""Security of an MQTT federation on the shipped Mosquitto config (secure_mosquitto):
passwords, the per-device ACL, and TLS with server verification.

The command-line failures run as real ``sparsefedpp serve`` / ``client`` processes
(what an operator sees), started together so the slow interpreter start-ups
overlap; the ACL is probed with raw paho clients, and a small federation runs
over TLS while a device tries to forge another device's update.
"""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fedproc import Federation, make_shards, require_cifar, write_config
from sparsefedpp.runtime import models
from sparsefedpp.runtime.errors import ConfigError, TransportError
from sparsefedpp.runtime.wire import codec, protocol

pytestmark = pytest.mark.mqtt

NOT_AUTHORIZED = 0x87
FORGED_EXAMPLES = 777  # the forged update's num_examples: easy to spot in the log


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    require_cifar()
    return make_shards(tmp_path_factory.mktemp("shards"), 2)


def password_file(folder: Path, name: str, password: str) -> str:
    path = folder / f"{name}.pw"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return str(path)


def start_cli(folder: Path, name: str, *args: str) -> subprocess.Popen:
    log = open(folder / f"{name}.log", "wb")  # noqa: SIM115 - closed by the OS
    return subprocess.Popen([sys.executable, "-m", "sparsefedpp.tools.cli", *args],
                            stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)


def finish(folder: Path, name: str, proc: subprocess.Popen,
           timeout: float = 120.0) -> tuple[int, str]:
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = None
    out = (folder / f"{name}.log").read_text(errors="replace")
    assert code is not None, f"{name} still running after {timeout} s:\n{out[-3000:]}"
    return code, out


class Raw:
    """A raw paho MQTT 5 client with a user name, optionally over TLS; keeps the
    PUBACK reason codes and the messages it receives."""

    def __init__(self, broker, username: str, password: str, client_id: str, *,
                 tls: bool = False):
        import paho.mqtt.client as mqtt

        self.messages: queue.Queue = queue.Queue()
        self.pubacks: dict[int, int] = {}
        self._acked = threading.Condition()
        self._up = threading.Event()
        self.connack = None
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.username_pw_set(username, password)
        if tls:
            self.client.tls_set(ca_certs=str(broker.certs.ca_cert))
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_message = lambda c, u, m: self.messages.put(
            (m.topic, bytes(m.payload)))
        self.client.connect(broker.host, broker.tls_port if tls else broker.port,
                            keepalive=30, clean_start=True)
        self.client.loop_start()
        assert self._up.wait(30), f"{username}: no CONNACK"
        assert not self.connack.is_failure, f"{username}: {self.connack}"

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack = reason_code
        self._up.set()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self._acked:
            self.pubacks[mid] = reason_code.value
            self._acked.notify_all()

    def subscribe(self, *topics: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe([(t, 1) for t in topics])
        assert done.wait(30), "no SUBACK"

    def publish(self, topic: str, payload: bytes) -> int:
        """QoS 1; the broker's PUBACK reason code (0 success, 0x87 not authorized)."""
        info = self.client.publish(topic, payload, qos=1)
        with self._acked:
            assert self._acked.wait_for(lambda: info.mid in self.pubacks, 30), topic
            return self.pubacks[info.mid]

    def next_message(self, timeout: float = 30.0) -> tuple[str, bytes]:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message within {timeout} s") from None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def forged_update(config: dict, rnd: int, victim: str) -> bytes:
    """A well-formed update of ``victim`` for round ``rnd``: the aggregator would
    accept it if it ever arrived (same names and shapes as the global model)."""
    spec = config["model"]
    net = models.build(spec["name"], num_classes=spec["num_classes"],
                       width=spec["width"], alpha=spec["alpha"],
                       in_channels=spec["in_channels"], seed=1)
    return codec.encode(codec.Message("update", rnd, victim, config["method"]["method"],
                                      net.state_dict(), FORGED_EXAMPLES), "csr")


# ------------------------------------------------------------------ passwords
def test_wrong_password_or_unknown_user_is_refused_with_a_clear_error(
        secure_mosquitto, shards, tmp_path):
    b = secure_mosquitto
    wrong = password_file(tmp_path, "wrong", "not-the-password")
    config = write_config(tmp_path / "fed.toml", ["dev1", "dev2"], rounds=1,
                          per_round=2, min_clients=2, connect_timeout=300)
    common = ["--broker", b.url, "--password-file", wrong, "--reconnect-max", "2"]
    procs = {
        "client-dev1": start_cli(tmp_path, "client-dev1", "client", "--id", "dev1",
                                 "--data", str(shards[0]), "--connect-timeout", "300",
                                 "--state", str(tmp_path / "s1"), *common),
        "client-dev3": start_cli(tmp_path, "client-dev3", "client", "--id", "dev3",
                                 "--data", str(shards[0]), "--connect-timeout", "300",
                                 "--state", str(tmp_path / "s3"), *common),
        "serve": start_cli(tmp_path, "serve", "serve", "--config", str(config),
                           *common),
    }
    for name, proc in procs.items():
        # refused at once: well before the 300 s connect timeout
        code, out = finish(tmp_path, name, proc, timeout=180)
        assert code == TransportError.exit_code, (name, out)
        assert re.search(rf"error: broker mqtt://127\.0\.0\.1:{b.port} refused the "
                         r"connection: (Bad user name or password|Not authori[sz]ed); "
                         r"check --username and --password-file", out), (name, out)
        assert "Traceback" not in out, out
    broker_log = b.log_path.read_text(errors="replace").lower()
    assert "not authorised" in broker_log or "bad user name or password" in broker_log


# ------------------------------------------------------------------ the ACL
def test_a_device_cannot_write_or_read_another_devices_topics(secure_mosquitto):
    b = secure_mosquitto
    agg = Raw(b, "aggregator", "agg-secret", "test-aggregator")
    dev1 = Raw(b, "dev1", "pw1", "test-dev1")
    dev2 = Raw(b, "dev2", "pw2", "test-dev2")
    try:
        agg.subscribe("sfpp/#")
        # a denied SUBACK is still "granted" (see the ACL): only delivery counts
        dev1.subscribe("sfpp/update/+", "sfpp/ack/+", "sfpp/status/+")
        fake = protocol.split(b"pretend update" * 10)[0]
        forbidden = {
            "sfpp/update/dev2": fake,
            "sfpp/status/dev2": protocol.control("status", state="offline"),
            "sfpp/ack/dev2": protocol.control("ack", round=0, accepted=False,
                                              reason="forged"),
            "sfpp/round": b"{}",
            "sfpp/model/0": fake,
            "sfpp/server": protocol.SERVER_OFFLINE,
            "sfpp/update/aggregator": fake,
            "other/topic": b"x",
        }
        codes = {topic: dev1.publish(topic, data) for topic, data in forbidden.items()}
        assert codes == dict.fromkeys(forbidden, NOT_AUTHORIZED)
        # allowed: after the denied ones, so the aggregator's first message proves
        # that none of them was delivered (one publisher's messages stay in order)
        assert dev1.publish("sfpp/update/dev1", fake) == 0
        assert agg.next_message() == ("sfpp/update/dev1", fake)

        # dev1 reads neither dev2's update nor dev2's acks nor its own update
        assert dev2.publish("sfpp/update/dev2", fake) == 0
        assert agg.next_message() == ("sfpp/update/dev2", fake)
        assert agg.publish("sfpp/ack/dev2", b"for dev2") == 0
        assert agg.publish("sfpp/ack/dev1", b"for dev1") == 0
        assert dev1.next_message() == ("sfpp/ack/dev1", b"for dev1")
        assert dev1.messages.empty()
        assert agg.next_message()[0] == "sfpp/ack/dev2"
        assert agg.next_message()[0] == "sfpp/ack/dev1"
        assert agg.messages.empty()
    finally:
        for c in (agg, dev1, dev2):
            c.close()
    # The broker names the session after the username (use_username_as_clientid),
    # not after the client id "test-dev1" that the client sent.
    assert "Denied PUBLISH from dev1 " in b.log_path.read_text(errors="replace")


# ------------------------------------------------------------------ TLS
@pytest.fixture
def broker_with_dev3(tmp_path, mosquitto_certs):
    """The shipped config with a third device user, dev3, outside the federation.

    The forger needs credentials of its own: the broker allows one connection per
    user (the client id is the username), so a forger holding dev1's would only
    take turns with dev1's agent, each connect kicking the other off.
    """
    from mosquitto import TEST_USERS, Mosquitto, require_mosquitto

    require_mosquitto()
    with Mosquitto(tmp_path / "mosquitto", auth=True, tls=True, certs=mosquitto_certs,
                   users={**TEST_USERS, "dev3": "pw3"}) as broker:
        yield broker


def test_tls_federation_completes_and_a_forged_update_never_arrives(
        broker_with_dev3, shards, tmp_path):
    b = broker_with_dev3
    fed = Federation(tmp_path, b.tls_url, extra_args=("--ca", str(b.certs.ca_cert)))
    config = write_config(tmp_path / "fed.toml", ["dev1", "dev2"], rounds=1,
                          per_round=2, min_clients=2)
    forger = Raw(b, "dev3", "pw3", "forger-dev3", tls=True)
    try:
        forger.subscribe("sfpp/round")
        fed.device("dev1", shards[0], "--password-file",
                   password_file(tmp_path, "dev1", "pw1"))
        fed.device("dev2", shards[1], "--password-file",
                   password_file(tmp_path, "dev2", "pw2"))
        fed.server(config, "--password-file",
                   password_file(tmp_path, "aggregator", "agg-secret"))

        topic, payload = forger.next_message(120)
        ann = protocol.parse_control(payload, "round")
        assert topic == "sfpp/round" and sorted(ann["selected"]) == ["dev1", "dev2"]
        forged = forged_update(ann["config"], ann["round"], "dev2")
        codes = [forger.publish("sfpp/update/dev2", c) for c in protocol.split(forged)]
        assert codes == [NOT_AUTHORIZED] * len(codes)

        assert fed.wait("server", 120) == 0, fed.log("server")
        for d in ("dev1", "dev2"):
            assert fed.wait(f"device-{d}", 60) == 0, fed.log(f"device-{d}")
    finally:
        forger.close()
        fed.close()

    (only,) = fed.rounds()
    assert only["aggregated"] and sorted(only["accepted"]) == ["dev1", "dev2"]
    assert only["rejected"] == [] and only["failures"] == []
    log = fed.log("server")
    assert "connected to mqtts://127.0.0.1" in log
    accepted = re.findall(r"update from dev2 accepted \(\d+ bytes, (\d+) examples\)",
                          log)
    assert len(accepted) == 1 and int(accepted[0]) != FORGED_EXAMPLES
    assert f"{FORGED_EXAMPLES} examples" not in log
    assert "duplicate" not in log and "rejected an update" not in log
    assert "Denied PUBLISH from dev3 " in b.log_path.read_text(errors="replace")


def test_tls_wrong_ca_and_missing_ca_fail_clearly(secure_mosquitto, shards, tmp_path):
    b = secure_mosquitto
    pw = password_file(tmp_path, "dev1", "pw1")
    config = write_config(tmp_path / "fed.toml", ["dev1", "dev2"], rounds=1,
                          per_round=2, min_clients=2, connect_timeout=5)
    missing = str(tmp_path / "no-such-ca.pem")
    device = ["client", "--id", "dev1", "--data", str(shards[0]), "--broker",
              b.tls_url, "--password-file", pw, "--connect-timeout", "5",
              "--state", str(tmp_path / "s1")]
    serve = ["serve", "--config", str(config), "--broker", b.tls_url,
             "--password-file", password_file(tmp_path, "agg", "agg-secret")]
    procs = {
        "client-wrong-ca": start_cli(tmp_path, "client-wrong-ca", *device, "--ca",
                                     str(b.certs.wrong_ca_cert)),
        "serve-wrong-ca": start_cli(tmp_path, "serve-wrong-ca", *serve, "--ca",
                                    str(b.certs.wrong_ca_cert)),
        "client-missing-ca": start_cli(tmp_path, "client-missing-ca", *device, "--ca",
                                       missing),
        "serve-missing-ca": start_cli(tmp_path, "serve-missing-ca", *serve, "--ca",
                                      missing),
    }
    results = {name: finish(tmp_path, name, proc) for name, proc in procs.items()}
    for name in ("client-wrong-ca", "serve-wrong-ca"):
        code, out = results[name]
        assert code == TransportError.exit_code, (name, out)
        assert re.search(rf"error: broker {re.escape(b.tls_url)}: no connection after "
                         r"5 s \(TLS: CERTIFICATE_VERIFY_FAILED\)", out), (name, out)
        assert "--ca" in out and "Traceback" not in out, out
    for name in ("client-missing-ca", "serve-missing-ca"):
        code, out = results[name]
        assert code == ConfigError.exit_code, (name, out)
        assert f"error: --ca {missing}: expected an existing file" in out, (name, out)
