"""How to reach the MQTT broker: URL, credentials, TLS, and a paho client built from them.

The aggregator (server/) and the devices (trainer/) must connect the same way
(MQTT 5 by default or 3.1.1 for brokers without v5 such as RabbitMQ 3.10; a
durable session created with clean_start/clean_session=False from the first
connect, TLS with server verification), so the one place that builds a paho
client lives here; paho is imported only when a client is built.
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import ConfigError, TransportError

logger = logging.getLogger(__name__)

SESSION_EXPIRY = 7 * 24 * 3600  # seconds the broker keeps a session while offline
CONNECTED = "\0connected"  # a queue event after each (re)connect, never a topic
MQTT_VERSIONS = ("5", "3.1.1")


def check_mqtt_version(value: str, option: str = "--mqtt-version") -> str:
    """The version as given, or ConfigError naming ``option`` and the choices."""
    if value not in MQTT_VERSIONS:
        raise ConfigError(f"{option}: expected one of {', '.join(MQTT_VERSIONS)}, got "
                          f"{value!r}; use 3.1.1 for brokers without MQTT 5")
    return value


@dataclass(frozen=True)
class BrokerSettings:
    """Where the broker is and how to authenticate.

    ``mqtt://host[:1883]`` is plain TCP, ``mqtts://host[:8883]`` is TLS verified
    against ``ca_file`` (else the system's CAs); ``cert_file``/``key_file`` add a
    client certificate. ``password_file`` holds the password on its first line.
    """

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password_file: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: int = 30
    reconnect_min: float = 1.0
    reconnect_max: float = 60.0
    mqtt_version: str = "5"

    def __post_init__(self):
        check_mqtt_version(self.mqtt_version)

    @property
    def v5(self) -> bool:
        return self.mqtt_version == "5"

    @classmethod
    def from_url(cls, url: str, **options) -> BrokerSettings:
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ConfigError(f"broker URL: expected mqtt://HOST[:PORT] or "
                              f"mqtts://HOST[:PORT], got {url!r}")
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            raise ConfigError(f"broker URL: bad port in {url!r}") from None
        return cls(parts.hostname, port, tls, **options)

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def password(self) -> str | None:
        if self.password_file is None:
            return None
        try:
            return Path(self.password_file).read_text(encoding="utf-8").splitlines()[0]
        except (OSError, IndexError, UnicodeDecodeError) as e:
            raise ConfigError(f"password file {self.password_file}: expected a readable "
                              f"file with the password on its first line, got {e!r}"
                              ) from None

    def check_files(self) -> None:
        """Fail early, naming the option, when a TLS or password file is missing."""
        for option, path in (("--password-file", self.password_file),
                             ("--ca", self.ca_file), ("--cert", self.cert_file),
                             ("--key", self.key_file)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{option} {path}: expected an existing file, got "
                                  f"none; check the path")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("client certificate: expected both --cert and --key, got "
                              "only one")
        if not self.tls and (self.ca_file or self.cert_file):
            raise ConfigError(f"broker {self.url}: TLS files given for a plain "
                              f"connection; use mqtts://")


def make_client(settings: BrokerSettings, client_id: str, *,
                will_topic: str | None = None, will_payload: bytes = b"",
                reconnect: bool = True):
    """A paho client (MQTT 5, or 3.1.1 with clean_session=False) with credentials
    and TLS set, a retained QoS 1 last will when ``will_topic`` is given, and
    reconnect backoff (or, with ``reconnect=False``, none: a one-off check); not
    yet connected."""
    import paho.mqtt.client as mqtt

    settings.check_files()
    # 3.1.1 chooses the durable session here, MQTT 5 on connect (durable_session)
    options = {"protocol": mqtt.MQTTv5} if settings.v5 else {
        "protocol": mqtt.MQTTv311, "clean_session": False}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         reconnect_on_failure=reconnect, **options)
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password())
    if settings.tls:
        client.tls_set(ca_certs=settings.ca_file, certfile=settings.cert_file,
                       keyfile=settings.key_file, cert_reqs=ssl.CERT_REQUIRED,
                       tls_version=ssl.PROTOCOL_TLS_CLIENT)
    client.enable_logger(logger)
    if will_topic is not None:
        client.will_set(will_topic, will_payload, qos=1, retain=True)
    client.reconnect_delay_set(settings.reconnect_min, settings.reconnect_max)
    return client


def durable_session(settings: BrokerSettings) -> dict:
    """The keyword arguments of paho's connect for a durable session: MQTT 5's
    clean_start=False and ``SESSION_EXPIRY``; none under 3.1.1, whose client
    already asked for clean_session=False (make_client) and whose broker keeps
    the session as its own policy says."""
    if not settings.v5:
        return {}
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = SESSION_EXPIRY
    return {"clean_start": False, "properties": props}


def connect(client, settings: BrokerSettings) -> None:
    """Start connecting in the background (paho retries with backoff until it
    succeeds), to a durable session from the first connect (durable_session)."""
    client.connect_async(settings.host, settings.port, keepalive=settings.keepalive,
                         **durable_session(settings))
    client.loop_start()


class ConnectWaiter:
    """Set from ``on_connect``; ``wait`` turns a refusal or a timeout into a
    TransportError that says what to fix."""

    def __init__(self, settings: BrokerSettings):
        self.settings = settings
        self._event = threading.Event()
        self.reason: str | None = None

    def connected(self, reason_code) -> None:
        self.reason = None if not reason_code.is_failure else str(reason_code)
        self._event.set()

    def wait(self, timeout: float | None) -> None:
        if not self._event.wait(timeout):
            problem = probe(self.settings) or "no CONNACK"
            raise TransportError(f"broker {self.settings.url}: no connection after "
                                 f"{timeout:g} s ({problem}); is Mosquitto running "
                                 f"there? check --broker, --ca and the firewall")
        if self.reason is not None:
            fix = ("check --username and --password-file"
                   if "authori" in self.reason.lower() or "password" in
                   self.reason.lower() else "see the broker's log")
            raise TransportError(f"broker {self.settings.url} refused the connection: "
                                 f"{self.reason}; {fix}")


def probe(settings: BrokerSettings, timeout: float = 5.0) -> str | None:
    """Open a TCP (and TLS) connection to the broker once; the problem, or None.

    paho retries failed connects quietly, so this names the cause: refused,
    unreachable, or the TLS certificate check that failed.
    """
    try:
        with socket.create_connection((settings.host, settings.port), timeout) as sock:
            if settings.tls:
                ctx = ssl.create_default_context(cafile=settings.ca_file)
                if settings.cert_file:
                    ctx.load_cert_chain(settings.cert_file, settings.key_file)
                with ctx.wrap_socket(sock, server_hostname=settings.host):
                    pass
    except ssl.SSLError as e:
        return f"TLS: {e.reason or e}"
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return None


def publish_confirmed(client, connected: threading.Event, topic: str, payload: bytes,
                      *, retain: bool = False, timeout: float = 60.0) -> None:
    """Publish at QoS 1 and wait for the broker's PUBACK, waiting out a reconnect.

    A publish cut by a lost connection is sent again after the reconnect (the
    receiver ignores duplicates); no PUBACK within ``timeout`` is a TransportError.
    """
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not connected.wait(left):
            break
        info = client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != 0:  # not connected after all: wait for the reconnect
            time.sleep(0.05)
            continue
        try:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        except RuntimeError:
            continue
        if info.is_published():
            return
    raise TransportError(f"publish to {topic}: no PUBACK within {timeout:g} s; the "
                         f"broker is unreachable or refuses this client")


class QueuedClient:
    """The aggregator's and the device's connection: a paho client whose callbacks
    only record. Each message goes to ``events`` as (topic, payload, retained);
    each (re)connect renews ``subscriptions`` (QoS 1), runs ``on_connected(paho)``
    and, once the broker has granted the subscriptions, queues (CONNECTED, b"",
    False), so the owner's one thread does all the work. ``connected`` is set while the
    connection is up; ``log`` is the owner's logger (connects, refusals, lost
    connections).

    ``watched`` subscriptions are made with the MQTT 5 options no-local (the
    owner does not get back what it publishes there, e.g. the empty message
    that clears a retained one) and retain-as-published (``retained`` is true
    for a live message published with the retain flag too, not only for one
    delivered from the broker's store): for topics that must never hold a
    retained message, so that the owner sees and clears one at once.

    Under MQTT 3.1.1 these options do not exist: the owner gets its own
    publishes back (on watched topics only the empty clears, which the owner
    ignores) and a live message arrives with retained false even when published
    with the retain flag (one from the broker's store is still flagged, so a
    stray retained message is seen and cleared on the next (re)subscribe)."""

    def __init__(self, settings: BrokerSettings, client_id: str,
                 subscriptions: list[str], log: logging.Logger, *,
                 will_topic: str | None = None, will_payload: bytes = b"",
                 on_connected=None, watched: tuple[str, ...] = ()):
        self.settings = settings
        self.events: queue.Queue = queue.Queue()
        self.connected = threading.Event()
        self._subscriptions = list(subscriptions)
        self._watched = set(watched)
        self._log = log
        self._on_connected = on_connected
        self._stopping = False
        self._waiter = ConnectWaiter(settings)
        self.paho = make_client(settings, client_id, will_topic=will_topic,
                                will_payload=will_payload)
        self.paho.on_connect = self._on_connect
        self.paho.on_disconnect = self._on_disconnect
        self.paho.on_message = self._on_message
        self.paho.on_subscribe = self._on_subscribe
        self._suback_mid: int | None = None

    def start(self, timeout: float | None) -> None:
        """Connect in the background; with a timeout, wait for the first CONNACK
        (TransportError that says what to fix)."""
        connect(self.paho, self.settings)
        if timeout is not None:
            self._waiter.wait(timeout)

    def publish_confirmed(self, topic: str, payload: bytes, *, retain: bool = False,
                          timeout: float = 60.0) -> None:
        publish_confirmed(self.paho, self.connected, topic, payload, retain=retain,
                          timeout=timeout)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False):
        """Publish at QoS 1 without waiting for the PUBACK (paho's MessageInfo)."""
        return self.paho.publish(topic, payload, qos=1, retain=retain)

    def subscribe(self, topic: str) -> None:
        """Subscribe at QoS 1 for this connection (not renewed on a reconnect)."""
        self.paho.subscribe(topic, qos=1)

    def unsubscribe(self, topic: str) -> None:
        self.paho.unsubscribe(topic)

    def stop(self) -> None:
        self._stopping = True
        self.paho.disconnect()
        self.paho.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self._waiter.connected(reason_code)
        if reason_code.is_failure:
            self._log.error("broker refused the connection: %s", reason_code)
            return
        from paho.mqtt.subscribeoptions import SubscribeOptions

        v5 = self.settings.v5
        # ready on the SUBACK, not before: a message another client publishes
        # meanwhile would otherwise arrive from the retained store, flagged retained
        self._suback_mid = None
        if self._subscriptions:
            _, self._suback_mid = client.subscribe([
                (topic, SubscribeOptions(qos=1, noLocal=True, retainAsPublished=True)
                 if topic in self._watched else SubscribeOptions(qos=1))
                if v5 else (topic, 1)  # paho takes no SubscribeOptions under 3.1.1
                for topic in self._subscriptions])
        if self._on_connected is not None:
            self._on_connected(client)
        if self._suback_mid is None:
            self._ready()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        if mid != self._suback_mid:
            return  # a later subscribe of the owner's (``subscribe``)
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        if refused:
            self._log.error("broker refused subscriptions %s: %s",
                            self._subscriptions, ", ".join(refused))
        self._ready()

    def _ready(self) -> None:
        self.connected.set()
        self.events.put((CONNECTED, b"", False))
        self._log.info("connected to %s", self.settings.url)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        if reason_code != 0 and not self._stopping:
            self._log.warning("disconnected from %s (%s); reconnecting with backoff",
                              self.settings.url, reason_code)

    def _on_message(self, client, userdata, message):
        self.events.put((message.topic, bytes(message.payload), bool(message.retain)))
