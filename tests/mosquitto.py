"""Real Mosquitto brokers for tests (``tools/mosquitto.py``), from the shipped config.

The broker config under test is ``deploy/mosquitto/mosquitto.conf`` itself.
``render_config`` changes only what a test machine must change, and
``TEST_OVERRIDES`` names those keys, so that ``test_mosquitto.py`` can check that
everything else is the shipped setting:

- listener ports (free ports instead of 8883/1883, bound to 127.0.0.1; the TLS
  listener is dropped when a test needs no TLS);
- the paths ``cafile``, ``certfile``, ``keyfile``, ``password_file``,
  ``acl_file``, ``persistence_location`` (files in the test's tmp folder);
- ``user root`` when the tests run as root: Mosquitto started as root switches to
  the user ``mosquitto``, which cannot read a 0600 password file owned by root;
- ``log_dest file`` and ``log_type all`` for debugging (``Mosquitto.log_tail``).

A test may override more (``require_certificate``, ``message_size_limit``,
``autosave_interval``, ``allow_anonymous``); it then says so in its arguments.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from conftest import skip_or_fail
from paho.mqtt.properties import Properties

from sparsefedpp.tools import mosquitto as launcher
from sparsefedpp.tools.mosquitto import (  # noqa: F401 - re-exported for tests
    ANONYMOUS,
    HOST,
    PLAIN_PORT,
    SHIPPED_ACL,
    SHIPPED_CONF,
    TLS_PORT,
    find_binary,
    free_port,
    parse_config,
    render_config,
)

# The users of the secure_mosquitto fixture (username -> password).
TEST_USERS = {"aggregator": "agg-secret", "dev1": "pw1", "dev2": "pw2"}

# Keys that render_config replaces for every test broker (paths only).
TEST_OVERRIDES = frozenset(
    {"cafile", "certfile", "keyfile", "password_file", "acl_file",
     "persistence_location"}
)


def require_mosquitto() -> None:
    """Skip the calling test without mosquitto; under ``CI=true`` fail instead."""
    if not (find_binary("mosquitto") and find_binary("mosquitto_passwd")):
        skip_or_fail("mosquitto not found; apt-get install mosquitto")


@dataclass(frozen=True)
class Certs:
    """PEM files: a CA, a server and a client certificate signed by it, and a second,
    unrelated CA that signed neither."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    wrong_ca_cert: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _make_ca(folder: Path, name: str, common_name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    _openssl("req", "-x509", *_EC_KEY, "-keyout", key, "-out", cert, "-days", "2",
             "-subj", f"/CN={common_name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def _make_leaf(folder: Path, name: str, ca: tuple[Path, Path], extensions: str):
    cert, key, csr = (folder / f"{name}.{ext}" for ext in ("crt", "key", "csr"))
    ext_file = folder / f"{name}.ext"
    ext_file.write_text(extensions + "\nbasicConstraints=CA:FALSE\n"
                        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    _openssl("req", "-new", *_EC_KEY, "-keyout", key, "-out", csr,
             "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1],
             "-CAcreateserial", "-CAserial", folder / "ca.srl", "-days", "2",
             "-extfile", ext_file, "-out", cert)
    return cert, key


def make_certs(folder: str | os.PathLike) -> Certs:
    """Create a test PKI in ``folder`` with the openssl CLI (EC P-256 keys, 2 days)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(folder, "ca", "sfpp test CA")
    wrong_ca_cert, _ = _make_ca(folder, "wrong-ca", "wrong CA")
    usage = "keyUsage=critical,digitalSignature\nextendedKeyUsage="
    server = _make_leaf(folder, "server", ca, usage + "serverAuth\n"
                        "subjectAltName=IP:127.0.0.1,DNS:localhost")
    client = _make_leaf(folder, "client", ca, usage + "clientAuth")
    return Certs(ca[0], ca[1], *server, *client, wrong_ca_cert)


class Mosquitto(launcher.Mosquitto):
    """The test broker: ``tools/mosquitto.py``'s launcher with the test's users, PKI
    and persistence folder.

    A plain listener on ``port`` is always there (most tests avoid the TLS
    handshake); with ``tls`` a TLS listener on ``tls_port`` as well. With ``auth``
    both use the shipped password/ACL settings (``per_listener_settings false``),
    with ``users`` written to a password file and the ACL copied from
    ``deploy/mosquitto/sfpp.acl``. Without ``auth`` the broker is anonymous
    (``ANONYMOUS``), for tests that do not care about security, but keeps every other
    shipped setting (persistence, limits). ``overrides`` are further
    ``render_config`` settings. ``certs`` reuses a ``make_certs`` result (0.1-0.3 s
    saved per broker).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        auth: bool,
        tls: bool,
        users: Mapping[str, str] | None = None,
        require_certificate: bool = False,
        message_size_limit: int | None = None,
        overrides: Mapping[str, object] | None = None,
        extra: str = "",
        certs: Certs | None = None,
    ) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if tls and certs is None:
            certs = make_certs(folder / "certs")
        self.certs = certs if tls else None
        self.db_path = folder / "db" / "mosquitto.db"
        self.db_path.parent.mkdir(exist_ok=True)
        settings: dict[str, object] = {
            "persistence_location": f"{self.db_path.parent}/"}
        settings.update(_write_auth_files(folder, users or {}) if auth else ANONYMOUS)
        if tls:
            settings.update(cafile=certs.ca_cert, certfile=certs.server_cert,
                            keyfile=certs.server_key,
                            require_certificate=require_certificate)
        if message_size_limit is not None:
            settings["message_size_limit"] = message_size_limit
        settings.update(overrides or {})
        super().__init__(folder, tls=tls, settings=settings, append=extra)


def _write_auth_files(folder: Path, users: Mapping[str, str]) -> dict[str, object]:
    """A hashed password file for ``users`` and a copy of the shipped ACL in ``folder``;
    the render_config settings that point at them."""
    password_file = folder / "sfpp.passwd"
    password_file.write_text("".join(f"{u}:{p}\n" for u, p in users.items()))
    password_file.chmod(0o600)
    # -U hashes a plain "user:password" file in place: one call for all users.
    subprocess.run([find_binary("mosquitto_passwd"), "-U", str(password_file)],
                   check=True, capture_output=True)
    acl_file = folder / "sfpp.acl"
    shutil.copyfile(SHIPPED_ACL, acl_file)
    return {"password_file": password_file, "acl_file": acl_file}


# --- Raw paho clients for broker tests ---------------------------------------------

TIMEOUT = 5.0  # for anything expected to happen
V311, V5 = mqtt.MQTTv311, mqtt.MQTTv5


class Probe:
    """A paho client whose callbacks only record; tests wait on what was recorded."""

    def __init__(self, client_id: str, protocol: int = V5) -> None:
        # A probe never reconnects: each test says which connections it makes.
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=protocol, reconnect_on_failure=False)
        self.settled = threading.Event()  # CONNACK received or connection closed
        self.closed = threading.Event()
        self.reason_code: mqtt.ReasonCode | None = None  # of the CONNACK
        self.disconnect_reason: mqtt.ReasonCode | None = None
        self.session_present: bool | None = None
        self.connack_properties: Properties | None = None
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.acks: dict[int, mqtt.ReasonCode] = {}
        self._acked = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = lambda client, userdata, msg: self.messages.put(msg)
        self.client.on_publish = self._on_ack
        self.client.on_subscribe = self._on_ack

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.reason_code = reason_code
        self.session_present = flags.session_present
        self.connack_properties = properties
        self.settled.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.disconnect_reason = reason_code
        with self._acked:  # wakes ``answers``
            self.closed.set()
        self.settled.set()

    def _on_ack(self, client, userdata, mid, reason_code, properties=None):
        with self._acked:  # SUBACK brings a list of codes, PUBACK one code
            self.acks[mid] = reason_code
            self._acked.notify_all()

    def _wait_ack(self, mid: int):
        with self._acked:
            assert self._acked.wait_for(lambda: mid in self.acks, TIMEOUT), "no ack"
            return self.acks.pop(mid)

    def subscribe(self, topic: str) -> list[mqtt.ReasonCode]:
        """Subscribe at QoS 1; the SUBACK's reason codes."""
        with self._acked:  # hold the lock so the ack cannot land before we wait
            _, mid = self.client.subscribe(topic, qos=1)
        return self._wait_ack(mid)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False):
        """Publish at QoS 1; the PUBACK's reason code."""
        with self._acked:
            info = self.client.publish(topic, payload, qos=1, retain=retain)
        return self._wait_ack(info.mid)

    def answers(self, topic: str) -> bool:
        """Is this connection still up? A QoS 1 publish on ``topic`` (one the user
        may write): True on its PUBACK, False when the connection closes first.
        A broker that kicks a client closes its socket before it answers anything
        else, so a PUBACK proves the client was not kicked before this call."""
        with self._acked:
            info = self.client.publish(topic, b"ping", qos=1)
            self._acked.wait_for(
                lambda: info.mid in self.acks or self.closed.is_set(), TIMEOUT)
            return self.acks.pop(info.mid, None) is not None

    def received(self, count: int, *, timeout: float = TIMEOUT) -> dict[str, bytes]:
        """Topic -> payload of the first ``count`` messages, plus any already queued
        behind them (so an unexpected extra shows up), waiting ``timeout`` s at most.
        Tests send at most one message per topic, so the dict loses nothing.

        Mosquitto delivers one publisher's messages in order, so publishing the
        forbidden messages before an allowed one and waiting for the allowed one
        is enough to know that the forbidden ones were not delivered.
        """
        got, deadline = {}, time.monotonic() + timeout
        while len(got) < count and (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.messages.get(timeout=left)
            except queue.Empty:
                break
            got[msg.topic] = msg.payload
        while not self.messages.empty():
            msg = self.messages.get()
            got[msg.topic] = msg.payload
        return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connect(broker: Mosquitto, client_id: str, *, user: str | None = None,
            password: str | None = None, protocol: int = V5, tls: dict | None = None,
            **connect_kwargs) -> Probe:
    """Connect a Probe and wait for the CONNACK or a close.

    ``password`` defaults to the user's password in TEST_USERS.
    ``tls`` holds ``tls_set`` arguments and selects the TLS listener. Errors raised
    by ``connect()`` itself (a failed TLS handshake) propagate. A connection closed
    without CONNACK leaves ``probe.reason_code`` None.
    """
    probe = Probe(client_id, protocol)
    if user is not None:
        probe.client.username_pw_set(user, password or TEST_USERS[user])
    if tls is not None:
        probe.client.tls_set(**tls)
    port = broker.port if tls is None else broker.tls_port
    probe.client.connect(broker.host, port, keepalive=10, **connect_kwargs)
    probe.client.loop_start()
    assert probe.settled.wait(TIMEOUT), "neither CONNACK nor close"
    return probe
