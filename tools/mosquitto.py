"""A local Mosquitto from the shipped configuration: the one launcher of the tests,
``bench-mqtt`` and ``scripts/mqtt_demo.sh``, and the one place that knows the
config's layout.

``render_config`` replaces settings of ``deploy/mosquitto/mosquitto.conf`` (a
typo is an error, not a silently kept shipped value) and maps or drops its
listeners; the tests check that nothing else changes (tests/test_mosquitto.py).
``Mosquitto`` writes such a config for free 127.0.0.1 ports, starts the broker,
waits until every listener accepts connections and stops it. Run as
``python -m sparsefedpp.tools.mosquitto FOLDER``, it starts an anonymous broker
with persistence in FOLDER, prints its URL once it is ready and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from sparsefedpp.runtime.errors import ConfigError, TransportError

REPO = Path(__file__).resolve().parents[1]  # a source checkout (editable install)
SHIPPED_CONF = REPO / "deploy" / "mosquitto" / "mosquitto.conf"
SHIPPED_ACL = REPO / "deploy" / "mosquitto" / "sfpp.acl"
TLS_PORT = 8883  # the shipped listeners, as keys of render_config(listeners=...)
PLAIN_PORT = 1883
HOST = "127.0.0.1"
START_TIMEOUT = 10.0  # seconds for the broker to open its ports, and to stop

# Settings of an anonymous broker, for runs that do not test security: no logins, and
# so the client ids the clients send (the shipped use_username_as_clientid would
# refuse a client without a username).
ANONYMOUS: Mapping[str, object] = {"allow_anonymous": True, "password_file": None,
                                   "acl_file": None, "use_username_as_clientid": False}

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


def require_binary(name: str = "mosquitto") -> str:
    """Path of a Mosquitto tool; ConfigError that says how to install it if missing."""
    path = find_binary(name)
    if path is None:
        raise ConfigError(f"{name}: expected the Mosquitto tool at /usr/sbin/{name} or "
                          f"on PATH, got none; apt-get install mosquitto")
    return path


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


class Mosquitto:
    """One Mosquitto process on free 127.0.0.1 ports, configured from the shipped config.

    The shipped plain listener serves on ``port``; with ``tls`` the TLS listener serves
    on ``tls_port`` (``settings`` must then name the certificate files), otherwise it
    is dropped. ``settings`` are ``render_config`` replacements (e.g. ``ANONYMOUS``,
    paths); ``append`` adds lines the shipped file lacks. The broker logs the
    ``log_types`` to ``mosquitto.log`` in ``folder``; as root it runs as root (it
    would switch to the user ``mosquitto``, which cannot read root's 0600 files).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        tls: bool = False,
        settings: Mapping[str, object] | None = None,
        append: str = "",
        log_types: Sequence[str] = ("all",),
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.host = HOST
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.log_path = self.folder / "mosquitto.log"
        self.config_path = self.folder / "mosquitto.conf"
        self._stderr_path = self.folder / "mosquitto.stderr"
        self.process: subprocess.Popen | None = None
        if not SHIPPED_CONF.is_file():
            raise ConfigError(f"mosquitto: expected the shipped broker config at "
                              f"{SHIPPED_CONF}, got none; run from a source checkout "
                              f"(pip install -e .)")
        lines = [f"log_dest file {self.log_path}", *(f"log_type {t}" for t in log_types)]
        if os.geteuid() == 0:
            lines.append("user root")
        self.config_text = render_config(
            SHIPPED_CONF.read_text(),
            listeners={TLS_PORT: self.tls_port, PLAIN_PORT: self.port},
            append="\n".join(lines) + "\n" + append,
            **dict(settings or {}),
        )
        self.config_path.write_text(self.config_text)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def tls_url(self) -> str:
        if self.tls_port is None:
            raise ValueError("Mosquitto.tls_url: expected a broker with tls=True")
        return f"mqtts://{self.host}:{self.tls_port}"

    @property
    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> Mosquitto:
        """Start the broker and wait until every listener accepts TCP connections;
        TransportError with the broker's output if it exits or stays closed."""
        if self.is_running:
            raise TransportError("Mosquitto.start: expected a stopped broker, got one "
                                 f"running (pid {self.process.pid})")
        with open(self._stderr_path, "ab") as stderr:
            self.process = subprocess.Popen(
                [require_binary(), "-c", str(self.config_path)],
                stdout=stderr, stderr=stderr, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + START_TIMEOUT
        for port in filter(None, (self.port, self.tls_port)):
            self._wait_for_port(port, deadline)
        return self

    def _wait_for_port(self, port: int, deadline: float) -> None:
        # A bare TCP connect; on the TLS port it logs "unexpected eof", harmless.
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise TransportError(f"mosquitto: expected a running broker, got exit "
                                     f"code {code} at start:\n{self.log_tail()}")
            try:
                with socket.create_connection((self.host, port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise TransportError(f"mosquitto: port {port} not open after "
                                     f"{START_TIMEOUT} s:\n{self.log_tail()}")
            time.sleep(0.02)

    def _end(self, sig: int) -> None:
        if not self.is_running:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        """SIGTERM: a clean shutdown, which also saves the persistence database."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: a crash; only what autosave already wrote to disk survives."""
        self._end(signal.SIGKILL)

    def restart(self, *, kill: bool = False) -> Mosquitto:
        """Stop (or kill) and start again on the same ports and database."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()

    def log_tail(self, num_lines: int = 40) -> str:
        """The last lines of the broker's stderr (config errors) and log file."""
        parts = []
        for path in (self._stderr_path, self.log_path):
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-num_lines:]
                parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts) or "(no broker output)"

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Serve an anonymous broker for a demo until SIGTERM or SIGINT (exit code 0)."""
    parser = argparse.ArgumentParser(
        prog="python -m sparsefedpp.tools.mosquitto",
        description="Start a local Mosquitto from the shipped config (anonymous, "
        "plain listener on a free 127.0.0.1 port, persistence in FOLDER), print its "
        "URL once it accepts connections, stop it on SIGTERM or SIGINT.")
    parser.add_argument("folder", help="folder for the config, log and database")
    args = parser.parse_args(argv)
    folder = Path(args.folder).resolve()
    settings = {**ANONYMOUS, "persistence_location": f"{folder}/"}
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    try:
        broker = Mosquitto(folder, settings=settings,
                           log_types=("error", "warning", "notice")).start()
    except (ConfigError, TransportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(broker.url, flush=True)
    try:
        while not stop and broker.is_running:
            time.sleep(0.2)
    finally:
        broker.stop()
    if not stop:
        print(f"error: mosquitto exited with code {broker.process.returncode}:\n"
              f"{broker.log_tail()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
