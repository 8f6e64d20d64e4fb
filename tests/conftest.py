"""Shared test settings: the hypothesis profile, the CI rule for skips and the data.

Locally hypothesis runs 50 examples per property; under ``CI=true`` it runs 200,
derandomized so a red build reproduces; under emulation (``SFPP_EMULATED=1``, set by
.ci/aarch64.sh) it runs 25, derandomized. ``deadline=None`` because the first call
of a Numba kernel compiles (or loads its cache), which would trip any deadline.

CI installs every extra, the broker and the data sets, so under ``CI=true`` a missing
one is a broken environment, not a reason to skip (STYLE.md, "Tests"): every skip for
something missing goes through ``skip_or_fail`` (``from conftest import skip_or_fail``),
and ``pytest.importorskip`` is turned into a failure by the hook below. The real data
sets come from the fixtures ``cifar_dir``, ``fashion_mnist_dir`` and ``small_dataset``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest
from hypothesis import settings
from sparsefedpp.trainer.data import FASHION_MNIST_DIR

ON_CI = os.environ.get("CI") == "true"
EMULATED = os.environ.get("SFPP_EMULATED") == "1"

settings.register_profile("local", deadline=None, max_examples=50)
settings.register_profile("ci", deadline=None, max_examples=200, derandomize=True)
settings.register_profile("emulated", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("emulated" if EMULATED else "ci" if ON_CI else "local")

# The shared CIFAR-10 python folder beside the checkout (SFPP_CIFAR10 overrides it).
CIFAR_DIR = Path(os.environ.get("SFPP_CIFAR10") or Path(__file__).resolve().parents[1]
                 .parent / "shared" / "data" / "cifar-10-batches-py")
FASHION_DIR = Path(FASHION_MNIST_DIR)  # Debian's dataset-fashion-mnist


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the calling test because something it needs is missing; under ``CI=true``
    fail instead. ``reason`` says what is missing and how to get it."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true forbids this skip: {reason}", pytrace=False)
    pytest.skip(reason)


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


# --- Real data sets ----------------------------------------------------------------


def _data_dir(path: Path, what: str, how_to_get: str) -> Path:
    if not path.is_dir():
        skip_or_fail(f"{what} not at {path} ({how_to_get})")
    return path


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    """The CIFAR-10 python folder (skip without it; fail under CI=true)."""
    return _data_dir(CIFAR_DIR, "CIFAR-10", "the python version from cs.toronto.edu; "
                     "or set SFPP_CIFAR10 to its folder")


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """Debian's Fashion-MNIST folder (skip without it; fail under CI=true)."""
    return _data_dir(FASHION_DIR, "Fashion-MNIST",
                     "sudo apt-get install dataset-fashion-mnist")


@pytest.fixture(scope="session")
def small_dataset() -> str:
    """A ``--data`` value for quick end-to-end runs: ``fashion-mnist`` if installed,
    else the CIFAR-10 folder (skip without either; fail under CI=true)."""
    if FASHION_DIR.is_dir():
        return "fashion-mnist"
    if CIFAR_DIR.is_dir():
        return str(CIFAR_DIR)
    skip_or_fail(f"no dataset: neither {FASHION_DIR} nor {CIFAR_DIR}")


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
