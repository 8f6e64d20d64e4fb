"""``sparsefedpp serve`` / ``client``: configuration errors and a missing broker."""

from __future__ import annotations

import socket

import pytest
from fedproc import CIFAR, require_cifar, write_config
from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.tools import cli
from sparsefedpp.tools.cmd_serve import load_config


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_config_round_trip(tmp_path):
    path = write_config(tmp_path / "fed.toml", ["a", "b"], rounds=4, per_round=2,
                        min_clients=1, on_no_quorum="rerun")

    sim, service = load_config(str(path))

    assert (sim.rounds, sim.per_round, sim.model) == (4, 2, "cnn")
    assert service.devices == ("a", "b") and service.quorum == 1
    assert service.on_no_quorum == "rerun" and service.rounds == 4


@pytest.mark.parametrize("text, match", [
    ("[federation]\nclients = 5\n[deployment]\ndevices=['a']\nstate_dir='s'\n",
     "unknown keys \\['clients'\\]"),
    ("[federation]\n[deployment]\ndevices=['a']\nstate_dir='s'\ntimeout=3\n",
     "unknown keys \\['timeout'\\]"),
    ("[federation]\n[deployment]\ndevices=['a']\n", "expected state_dir"),
    ("[federation]\n[deployment]\nstate_dir='s'\n", "at least one registered device"),
    ("[federation]\n[deployment]\ndevices=['a b']\nstate_dir='s'\n", "device id"),
    ("[federation]\nper_round = 3\n[deployment]\ndevices=['a']\nstate_dir='s'\n",
     "exceeds the 1 registered"),
    ("[federation]\n[deployment]\ndevices=['a']\nstate_dir='s'\non_no_quorum='wait'\n",
     "on_no_quorum"),
    ("[federation\n", "readable TOML"),
    ("[federation]\n[extra]\n", "tables"),
])
def test_config_errors_say_what_is_wrong(tmp_path, text, match):
    path = tmp_path / "fed.toml"
    path.write_text(text)

    with pytest.raises(ConfigError, match=match):
        load_config(str(path))


def test_serve_without_a_broker_fails_with_a_clear_message(tmp_path, capsys):
    require_cifar()
    config = write_config(tmp_path / "fed.toml", ["a"], rounds=1, per_round=1,
                          min_clients=1, connect_timeout=1)

    code = cli.main(["serve", "--broker", f"mqtt://127.0.0.1:{_closed_port()}",
                     "--config", str(config), "--quiet"])

    err = capsys.readouterr().err
    assert code == 17
    assert "no connection after 1 s (ConnectionRefusedError" in err
    assert "is Mosquitto running" in err


def test_client_with_missing_ca_names_the_option(tmp_path, capsys):
    code = cli.main(["client", "--broker", "mqtts://127.0.0.1:8883", "--id", "d1",
                     "--data", str(CIFAR), "--ca", str(tmp_path / "ca.crt"), "--quiet"])

    assert code == 12
    assert "--ca" in capsys.readouterr().err


def test_client_without_a_broker_gives_up_after_connect_timeout(tmp_path, capsys):
    require_cifar()
    code = cli.main(["client", "--broker", f"mqtt://127.0.0.1:{_closed_port()}",
                     "--id", "d1", "--data", str(CIFAR), "--state", str(tmp_path / "s"),
                     "--connect-timeout", "1", "--quiet"])

    assert code == 17
    assert "Connection refused" in capsys.readouterr().err
