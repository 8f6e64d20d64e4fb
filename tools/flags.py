"""Command-line flags and helpers that several commands share, in one place.

``add_common`` (seed, quiet, metrics) is taken by every command; the broker flags
and the log set-up by ``serve`` and ``client``; ``onnx_exporter`` by ``export`` and
``predict``. A command module imports from here, never from another command.
"""

from __future__ import annotations

import argparse
import logging

from sparsefedpp.runtime.wire.broker import MQTT_VERSIONS, BrokerSettings
from sparsefedpp.runtime.errors import ConfigError


def add_common(p: argparse.ArgumentParser) -> None:
    """Flags every command takes: seed, quiet, metrics output."""
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--metrics", default=None,
                   help="JSON-lines metrics file ('-' for stdout)")


def add_broker_flags(p: argparse.ArgumentParser, *, default_user: str | None) -> None:
    p.add_argument("--broker", required=True,
                   help="mqtt://HOST[:1883] or mqtts://HOST[:8883] (TLS)")
    p.add_argument("--username", default=None,
                   help=f"MQTT user name (default: {default_user or 'none'})")
    p.add_argument("--password-file", default=None,
                   help="file whose first line is the MQTT password")
    p.add_argument("--ca", default=None, help="CA certificate (PEM) to verify the "
                   "broker with (mqtts://; default: the system's CAs)")
    p.add_argument("--cert", default=None, help="client certificate (PEM), optional")
    p.add_argument("--key", default=None, help="client key (PEM) for --cert")
    p.add_argument("--keepalive", type=int, default=30, help="seconds (default 30)")
    p.add_argument("--reconnect-max", type=float, default=60.0,
                   help="longest wait between reconnect attempts, seconds (backoff "
                   "doubles from 1 s up to this; default 60)")
    p.add_argument("--mqtt-version", default=None, choices=MQTT_VERSIONS,
                   help="MQTT protocol version (default 5; 3.1.1 for brokers without "
                   "v5, e.g. RabbitMQ 3.10)")


def broker_settings(args, username: str | None = None,
                    mqtt_version: str | None = None) -> BrokerSettings:
    """Settings from the broker flags; ``--mqtt-version`` wins over ``mqtt_version``
    (e.g. serve's TOML), which wins over the default 5."""
    return BrokerSettings.from_url(
        args.broker, username=args.username or username,
        password_file=args.password_file, ca_file=args.ca, cert_file=args.cert,
        key_file=args.key, keepalive=args.keepalive,
        reconnect_max=max(1.0, args.reconnect_max),
        mqtt_version=getattr(args, "mqtt_version", None) or mqtt_version or "5")


def setup_logging(quiet: bool, debug: bool = False) -> None:
    """Human log lines on stderr: what the service does and why it dropped a message."""
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", force=True)
    # paho's own chatter ("Client is not connected" on every reconnect attempt);
    # the service and the agent log disconnects and what they do about them
    logging.getLogger("sparsefedpp.runtime.wire.broker").setLevel(
        logging.DEBUG if debug else logging.CRITICAL)


def onnx_exporter():
    """The ``onnx_export`` module, imported on first use: it needs the onnx package,
    which only ``export`` and ``predict --engine onnx`` want; ConfigError without it."""
    try:
        from . import onnx_export
    except ImportError as err:
        raise ConfigError(f"export: expected the onnx package, got ImportError ({err}); "
                          "pip install onnx") from None
    return onnx_export
