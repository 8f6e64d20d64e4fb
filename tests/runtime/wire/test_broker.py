"""Broker settings: URLs, credential and TLS files, and what a failed connect says."""

from __future__ import annotations

import socket

import pytest
from sparsefedpp.runtime.wire.broker import BrokerSettings, ConnectWaiter, probe
from sparsefedpp.runtime.errors import ConfigError, TransportError


@pytest.mark.parametrize("url, host, port, tls", [
    ("mqtt://10.0.0.5", "10.0.0.5", 1883, False),
    ("mqtts://broker.example", "broker.example", 8883, True),
    ("mqtt://localhost:18830", "localhost", 18830, False),
    ("127.0.0.1:1884", "127.0.0.1", 1884, False),
])
def test_from_url(url, host, port, tls):
    s = BrokerSettings.from_url(url)

    assert (s.host, s.port, s.tls) == (host, port, tls)


@pytest.mark.parametrize("url", ["http://x", "mqtt://", "mqtt://h:99999", "mqtt://h:x"])
def test_bad_url_names_the_expected_form(url):
    with pytest.raises(ConfigError, match="broker URL"):
        BrokerSettings.from_url(url)


def test_missing_files_name_their_option(tmp_path):
    s = BrokerSettings.from_url("mqtts://h", ca_file=str(tmp_path / "ca.crt"))

    with pytest.raises(ConfigError, match="--ca .*expected an existing file"):
        s.check_files()


def test_cert_without_key_is_refused(tmp_path):
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    s = BrokerSettings.from_url("mqtts://h", cert_file=str(cert))

    with pytest.raises(ConfigError, match="both --cert and --key"):
        s.check_files()


def test_tls_files_on_a_plain_url_are_refused(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("x")

    with pytest.raises(ConfigError, match="use mqtts://"):
        BrokerSettings.from_url("mqtt://h", ca_file=str(ca)).check_files()


def test_password_file_first_line(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\nignored\n")

    assert BrokerSettings.from_url("mqtt://h", password_file=str(pw)).password() == \
        "s3cret"
    with pytest.raises(ConfigError, match="password file"):
        BrokerSettings.from_url("mqtt://h", password_file=str(tmp_path / "no")).password()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_broker_gives_a_transport_error_with_the_cause():
    settings = BrokerSettings.from_url(f"mqtt://127.0.0.1:{_closed_port()}")

    assert "Connection refused" in probe(settings)
    with pytest.raises(TransportError, match="Connection refused.*is Mosquitto running"):
        ConnectWaiter(settings).wait(0.1)
