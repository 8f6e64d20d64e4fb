"""``sparsefedpp client --check`` against a real Mosquitto (password file, ACL, TLS):
right and wrong credentials, a missing CA file, a wrong CA, a missing data folder."""

from __future__ import annotations

import pytest
from fedproc import make_shards, require_cifar
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sparsefedpp.tools import cli

pytestmark = pytest.mark.mqtt


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    require_cifar()
    return make_shards(tmp_path_factory.mktemp("shard"), 1, limit=50)[0]


def _check(capsys, tmp_path, *args) -> tuple[int, str]:
    code = cli.main(["client", "--check", "--id", "dev1", "--state",
                     str(tmp_path / "state"), "--connect-timeout", "5", *args])
    return code, capsys.readouterr().out


def _pw(tmp_path, password: str) -> str:
    path = tmp_path / "pw"
    path.write_text(password + "\n")
    return str(path)


def test_everything_right_passes(secure_mosquitto, shard, tmp_path, capsys):
    code, out = _check(capsys, tmp_path, "--broker", secure_mosquitto.tls_url,
                       "--ca", str(secure_mosquitto.certs.ca_cert),
                       "--password-file", _pw(tmp_path, "pw1"), "--data", str(shard))

    assert code == 0, out
    assert "FAIL" not in out
    assert "ok   login: logged in as dev1" in out
    assert "TLS certificate verified" in out


def test_the_login_leaves_the_agents_session_and_queue_alone(
        secure_mosquitto, clients, shard, tmp_path, capsys):
    # The shipped broker names the check's session "dev1", as the agent's: the
    # check resumes it, and must neither wipe it nor take its queued messages.
    b = secure_mosquitto
    durable = Properties(PacketTypes.CONNECT)
    durable.SessionExpiryInterval = 3600
    agent = clients(b, "dev1", user="dev1", clean_start=False, properties=durable)
    agent.subscribe("sfpp/ack/dev1")
    agent.close()
    clients(b, "aggregator", user="aggregator").publish("sfpp/ack/dev1", b"queued ack")

    code, out = _check(capsys, tmp_path, "--broker", b.url,
                       "--password-file", _pw(tmp_path, "pw1"), "--data", str(shard))

    assert code == 0 and "ok   login: logged in as dev1" in out, out
    agent = clients(b, "dev1", user="dev1", clean_start=False, properties=durable)
    agent.subscribe("sfpp/ack/dev1")  # queued messages arrive before the SUBACK
    assert agent.session_present
    assert agent.received(0, timeout=0) == {"sfpp/ack/dev1": b"queued ack"}


def test_wrong_password_fails_the_login(secure_mosquitto, shard, tmp_path, capsys):
    code, out = _check(capsys, tmp_path, "--broker", secure_mosquitto.url,
                       "--password-file", _pw(tmp_path, "nope"), "--data", str(shard))

    assert code == 1
    assert "FAIL login: the broker refused user 'dev1': Not authorized" in out
    assert "check --username/--password-file" in out


def test_missing_ca_file_is_named(secure_mosquitto, shard, tmp_path, capsys):
    code, out = _check(capsys, tmp_path, "--broker", secure_mosquitto.tls_url,
                       "--ca", str(tmp_path / "missing-ca.crt"),
                       "--password-file", _pw(tmp_path, "pw1"), "--data", str(shard))

    assert code == 1
    assert "FAIL files: --ca" in out and "expected an existing file" in out


def test_wrong_ca_fails_the_certificate_check(secure_mosquitto, shard, tmp_path,
                                              capsys):
    code, out = _check(capsys, tmp_path, "--broker", secure_mosquitto.tls_url,
                       "--ca", str(secure_mosquitto.certs.wrong_ca_cert),
                       "--password-file", _pw(tmp_path, "pw1"), "--data", str(shard))

    assert code == 1
    assert "FAIL broker" in out and "CERTIFICATE_VERIFY_FAILED" in out
    assert "check --ca" in out


def test_missing_data_folder_is_named(secure_mosquitto, tmp_path, capsys):
    code, out = _check(capsys, tmp_path, "--broker", secure_mosquitto.url,
                       "--password-file", _pw(tmp_path, "pw1"),
                       "--data", str(tmp_path / "no-such-folder"))

    assert code == 1
    assert "FAIL data: dataset spec" in out and "no-such-folder" in out
    assert "ok   login" in out  # the other checks still ran


def test_no_broker_is_named(shard, tmp_path, capsys):
    code, out = _check(capsys, tmp_path, "--broker", "mqtt://127.0.0.1:1",
                       "--data", str(shard))

    assert code == 1
    assert "FAIL broker: mqtt://127.0.0.1:1: ConnectionRefusedError" in out
