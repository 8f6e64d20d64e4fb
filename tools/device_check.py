"""``sparsefedpp client --check``: is this device ready to join the federation?

Checks, in order, without starting a round: the settings, the state folder,
the data, the kernel cache, the credential and TLS files, the broker's
reachability (TCP and the TLS certificate check) and a real login with the
credentials. Each line says ok, WARN or FAIL, and what to do about a failure.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from sparsefedpp.runtime.wire.broker import (
    BrokerSettings,
    durable_session,
    make_client,
    probe,
)
from sparsefedpp.runtime.errors import SparseFedError


def _line(status: str, what: str, text: str) -> str:
    return f"{status:<4} {what}: {text}"


def check_state_dir(path: str) -> tuple[bool, str]:
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe_file = Path(path) / ".write-check"
        probe_file.write_bytes(b"")
        probe_file.unlink()
    except OSError as e:
        return False, (f"{path} is not writable ({e.strerror}); fix: create it and "
                       f"give the service user write access, or pass --state")
    return True, f"{path} is writable"


def check_data(spec: str) -> tuple[bool, str]:
    from sparsefedpp.trainer.data import load_dataset

    try:
        data = load_dataset(spec, "train")
    except SparseFedError as e:
        return False, f"{e}"
    if len(data) == 0:
        return False, (f"{spec} holds no training examples; fix: point --data at "
                       f"this device's shard")
    return True, (f"{len(data)} examples, {len(data.classes)} classes, images "
                  f"{tuple(data.images.shape[1:])} ({spec})")


def check_kernels() -> tuple[bool | None, str]:
    from .kernel_cache import report

    r = report()
    where = os.environ.get("NUMBA_CACHE_DIR") or r.cache_dir
    if r.compiled:
        return None, (f"{r.compiled} of {r.signatures} kernel signatures were compiled at "
                      f"start (cache cold or stale; now filled in {where}); run "
                      f"`sparsefedpp warmup` when provisioning, with the agent's "
                      f"NUMBA_CACHE_DIR")
    return True, f"all {r.signatures} kernel signatures loaded from the cache ({where})"


def check_login(settings: BrokerSettings, device_id: str,
                timeout: float) -> tuple[bool, str]:
    """Log in once and report the broker's answer, leaving the agent's durable
    session as it was.

    The shipped broker config names every session after its username, so this
    login resumes the agent's own session whatever client id it sends (and
    kicks a running agent off for a moment; it reconnects). Hence: clean_start
    False and the agent's session expiry, so that the session is neither wiped
    nor expired, and no acks, so that queued messages stay queued for the agent.
    """
    done = threading.Event()
    answer: list = []

    def on_connect(client, userdata, flags, reason_code, properties):
        answer.append(reason_code)
        done.set()

    client = make_client(settings, f"sfpp-check-{device_id}", reconnect=False)
    client.on_connect = on_connect
    client.manual_ack_set(True)  # never PUBACK: the broker redelivers to the agent
    try:
        client.connect(settings.host, settings.port, keepalive=10,
                       **durable_session(settings))
    except OSError as e:
        return False, f"cannot connect: {e}"
    client.loop_start()
    try:
        if not done.wait(timeout):
            return False, f"no answer from {settings.url} within {timeout:g} s"
        code = answer[0]
        if code.is_failure:
            return False, (f"the broker refused user {settings.username!r}: {code}; "
                           f"fix: check --username/--password-file against the "
                           f"broker's password file")
        return True, f"logged in as {settings.username or '(anonymous)'}"
    finally:
        client.disconnect()
        client.loop_stop()


def run_checks(*, device_id: str, data: str, state_dir: str, settings_of,
               timeout: float = 10.0, print_fn=print) -> int:
    """Run every check, print one line each; 0 if none failed, else 1.
    ``settings_of()`` builds the BrokerSettings (it may raise a ConfigError)."""
    failed = False

    def report(what: str, result: tuple) -> None:
        nonlocal failed
        ok, text = result
        failed |= ok is False
        print_fn(_line({True: "ok", False: "FAIL", None: "WARN"}[ok], what, text))

    try:
        settings = settings_of()
    except SparseFedError as e:
        report("settings", (False, str(e)))
        settings = None
    else:
        report("settings", (True, f"device {device_id}, broker {settings.url}"))
    report("state", check_state_dir(state_dir))
    report("data", check_data(data))
    report("kernels", check_kernels())
    if settings is not None:
        try:
            settings.check_files()
            settings.password()
        except SparseFedError as e:
            report("files", (False, str(e)))
            return 1
        given = [o for o, f in (("--password-file", settings.password_file),
                                ("--ca", settings.ca_file), ("--cert", settings.cert_file),
                                ("--key", settings.key_file)) if f]
        report("files", (True, (f"{', '.join(given)} readable" if given else
                                "no password or TLS files given")))
        problem = probe(settings, timeout)
        if problem:
            fix = ("check --ca: it must be the CA that signed the broker's certificate"
                   if problem.startswith("TLS") else
                   "is the broker running and reachable? check --broker and firewalls")
            report("broker", (False, f"{settings.url}: {problem}; fix: {fix}"))
            return 1
        tls = " (TLS certificate verified)" if settings.tls else ""
        report("broker", (True, f"{settings.url} reachable{tls}"))
        report("login", check_login(settings, device_id, timeout))
    return 1 if failed else 0
