"""The shipped Mosquitto configuration, rendered for a broker started on this
machine (tests, ``bench-mqtt``): the one place that knows its layout.

``render_config`` replaces settings of ``deploy/mosquitto/mosquitto.conf`` (a
typo is an error, not a silently kept shipped value) and maps or drops its
listeners; the tests check that nothing else changes (tests/test_mosquitto.py).
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # a source checkout (editable install)
SHIPPED_CONF = REPO / "deploy" / "mosquitto" / "mosquitto.conf"
SHIPPED_ACL = REPO / "deploy" / "mosquitto" / "sfpp.acl"
TLS_PORT = 8883  # the shipped listeners, as keys of render_config(listeners=...)
PLAIN_PORT = 1883
HOST = "127.0.0.1"

# Options that belong to the listener above them; dropped with that listener.
_LISTENER_KEYS = frozenset(
    {"cafile", "capath", "certfile", "keyfile", "crlfile", "ciphers",
     "ciphers_tls1.3", "dhparamfile", "require_certificate", "tls_version",
     "tls_engine", "tls_keyform", "use_identity_as_username",
     "use_subject_as_username", "psk_hint", "protocol", "mount_point",
     "bind_interface", "max_connections", "socket_domain", "http_dir",
     "use_username_as_clientid"}
)


def find_binary(name: str) -> str | None:
    """Path of a Mosquitto tool; /usr/sbin is often missing from a user's PATH."""
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _format(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render_config(
    text: str,
    *,
    listeners: Mapping[int, int | None] | None = None,
    append: str = "",
    **settings: object,
) -> str:
    """Return the shipped config ``text`` with the given values replaced.

    Parameters
    ----------
    text : the shipped mosquitto.conf.
    listeners : shipped port -> test port (bound to 127.0.0.1), or None to drop that
        listener together with its TLS options. Unnamed listeners stay as shipped.
    append : lines added at the end (settings the shipped file lacks, e.g. ``user``).
    **settings : key -> new value for keys of the shipped file (bool -> true/false,
        None removes the line), on every line of that key (listener options such as
        ``use_username_as_clientid`` appear once per listener). A key missing from
        the shipped file is an error, so a typo cannot silently leave the shipped
        value in force.
    """
    listeners = dict(listeners or {})
    missing = set(settings)
    out: list[str] = []
    dropping = False  # inside a listener block that is being dropped
    for line in text.splitlines():
        key, value = _split(line)
        if key == "listener":
            shipped_port = int(value.split()[0])
            dropping = shipped_port in listeners and listeners[shipped_port] is None
            if shipped_port in listeners:
                line = f"listener {listeners.pop(shipped_port)} {HOST}"
        elif key and key not in _LISTENER_KEYS:
            dropping = False
        if key in settings:
            missing.discard(key)
            line = None if settings[key] is None else f"{key} {_format(settings[key])}"
        if not (dropping and key) and line is not None:
            out.append(line)
    if missing or listeners:
        raise KeyError(f"render_config: not in the shipped config: "
                       f"{sorted(missing)} {sorted(listeners)}")
    return "\n".join(out) + "\n" + append


def _split(line: str) -> tuple[str | None, str]:
    """``(key, value)`` of a setting line; ``(None, "")`` for comments and blanks."""
    parts = line.strip().split(None, 1)
    if not parts or parts[0].startswith("#"):
        return None, ""
    return parts[0], parts[1].strip() if len(parts) > 1 else ""


def parse_config(text: str) -> list[tuple[str, str]]:
    """``(key, value)`` for every setting line, in order (comments dropped)."""
    return [pair for pair in map(_split, text.splitlines()) if pair[0]]
