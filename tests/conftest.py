"""Shared test settings: the hypothesis profile and the CI rule for optional imports.

Locally hypothesis runs 50 examples per property; under ``CI=true`` it runs 200,
derandomized so a red build reproduces; under emulation (``SFPP_EMULATED=1``, set by
.ci/aarch64.sh) it runs 25, derandomized. ``deadline=None`` because the first call
of a Numba kernel compiles (or loads its cache), which would trip any deadline.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

ON_CI = os.environ.get("CI") == "true"
EMULATED = os.environ.get("SFPP_EMULATED") == "1"

settings.register_profile("local", deadline=None, max_examples=50)
settings.register_profile("ci", deadline=None, max_examples=200, derandomize=True)
settings.register_profile("emulated", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("emulated" if EMULATED else "ci" if ON_CI else "local")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """Under CI=true a module skipped by ``pytest.importorskip`` fails instead.

    CI installs every extra (torch, ...), so a missing import there is a broken
    environment, not a reason to skip (STYLE.md, "Tests"). Locally the skip stays.
    """
    outcome = yield
    report = outcome.get_result()
    if not (ON_CI and report.skipped):
        return
    message = str(report.longrepr[-1] if isinstance(report.longrepr, tuple)
                  else report.longrepr)
    if "could not import" in message:
        report.outcome = "failed"
        report.longrepr = f"CI=true forbids this skip: {message}; install the extra"


# --- MQTT: real Mosquitto brokers (tests/mosquitto.py) -------------------------------


@pytest.fixture
def mosquitto(tmp_path):
    """An anonymous broker on a free plain port, with the shipped persistence and
    limits; for tests that do not care about security. Skips without mosquitto
    (fails under CI=true)."""
    from mosquitto import Mosquitto, require_mosquitto  # tests/mosquitto.py

    require_mosquitto()
    with Mosquitto(tmp_path / "mosquitto", auth=False, tls=False) as broker:
        yield broker


@pytest.fixture(scope="session")
def mosquitto_certs(tmp_path_factory):
    """One test PKI (``tests/mosquitto.py::Certs``) for every broker of the session."""
    from mosquitto import make_certs

    return make_certs(tmp_path_factory.mktemp("mosquitto-certs"))


@pytest.fixture
def secure_mosquitto(tmp_path, mosquitto_certs):
    """The shipped config: a password file with TEST_USERS (aggregator/agg-secret,
    dev1/pw1, dev2/pw2), the shipped ACL, a TLS listener (``tls_port``, certificates
    in ``certs``) and a localhost plain listener (``port``) with the same users and
    rights."""
    from mosquitto import TEST_USERS, Mosquitto, require_mosquitto

    require_mosquitto()
    with Mosquitto(tmp_path / "mosquitto", auth=True, tls=True, users=TEST_USERS,
                   certs=mosquitto_certs) as broker:
        yield broker


@pytest.fixture
def clients():
    """Connect raw paho Probes (``tests/mosquitto.py``) through ``clients(broker,
    client_id, user=..., ...)``; all are closed at teardown."""
    from mosquitto import connect

    probes = []

    def open_probe(*args, **kwargs):
        probes.append(connect(*args, **kwargs))
        return probes[-1]

    yield open_probe
    for probe in probes:
        probe.close()
