"""Run an MQTT federation of real processes (``sparsefedpp serve`` / ``client``) in tests.

Shared by the end-to-end, fault and security tests: shard the CIFAR-10 subset,
write the federation TOML, start the aggregator and device processes with
their logs in files, wait for log lines, compare with the in-process simulation.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import CIFAR_DIR, skip_or_fail
from sparsefedpp.runtime.wire import codec
from sparsefedpp.tools import cli
from sparsefedpp.tools.cmd_serve import config_toml
from sparsefedpp.tools.metrics import read_metrics
from sparsefedpp.tools.simulate import SimConfig, Simulation

CIFAR = CIFAR_DIR   # the one data path, from tests/conftest.py
LIMIT = 400          # training examples split over the devices
TEST_LIMIT = 200
FED = dict(method="sparsefedpp", sparsity=0.9, model="cnn", test_limit=TEST_LIMIT,
           lr=0.1, lr_end=0.05, eval_sparsities=(0.9,), seed=0)


def require_cifar() -> None:
    """Skip (fail under CI=true) when the CIFAR-10 folder is missing."""
    if not CIFAR.is_dir():
        skip_or_fail(f"CIFAR-10 not at {CIFAR} (the python version from "
                     "cs.toronto.edu; or set SFPP_CIFAR10 to its folder)")


def make_shards(out: Path, clients: int, limit: int = LIMIT) -> list[Path]:
    assert cli.main(["partition", "--data", str(CIFAR), "--clients", str(clients),
                     "--limit", str(limit), "--out", str(out), "--quiet"]) == 0
    return [out / f"client-{k}.npz" for k in range(clients)]


def write_config(path: Path, devices: list[str], *, rounds: int, per_round: int,
                 min_clients: int, **deployment) -> Path:
    fed = dict(FED, data=str(CIFAR), rounds=rounds, per_round=per_round,
               min_clients=min_clients)
    dep = dict(devices=devices, state_dir=str(path.parent / "aggregator"),
               round_timeout=60, device_grace=30, offline_grace=2, publish_timeout=60)
    dep.update(deployment)
    path.write_text(config_toml(fed, dep))
    return path


def simulate(rounds: int, clients: int, per_round: int, min_clients: int) -> dict:
    """The in-process simulation of the same federation: its final global tensors.

    With the devices' Numba thread count (1): parallel sums in other thread
    counts round differently in the last bit of float32.
    """
    import numba

    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        sim = Simulation(SimConfig(**FED, data=str(CIFAR), clients=clients,
                                   per_round=per_round, min_clients=min_clients,
                                   rounds=rounds, train_limit=LIMIT))
        for rnd in range(rounds):
            sim.run_round(rnd)
        return sim.global_tensors
    finally:
        numba.set_num_threads(threads)


def state_tensors(state_dir: Path) -> tuple[int, dict]:
    msg = codec.decode((state_dir / "federation.sfpp").read_bytes())
    return msg.meta["next_round"], msg.tensors


def assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    diffs = {k: float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a}
    assert all(d == 0.0 for d in diffs.values()), {k: d for k, d in diffs.items() if d}


class Federation:
    """Processes of one test federation; ``close()`` kills what is left."""

    def __init__(self, folder: Path, broker_url: str, *, extra_args: tuple = ()):
        self.folder = folder
        self.url = broker_url
        self.extra = list(extra_args)
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, NUMBA_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def _spawn(self, name: str, args: list[str], debug: bool = False) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "ab")  # noqa: SIM115 - closed by the OS
        cli_args = ["--debug", *args] if debug else args
        proc = subprocess.Popen([sys.executable, "-m", "sparsefedpp.tools.cli", *cli_args],
                                stdout=log, stderr=log, env=self.env,
                                stdin=subprocess.DEVNULL)
        self.procs[name] = proc
        return proc

    def server(self, config: Path, *args: str) -> subprocess.Popen:
        return self._spawn("server", ["serve", "--broker", self.url, "--config",
                                      str(config), "--reconnect-max", "2",
                                      *self.extra, *args])

    def device(self, device_id: str, shard: Path, *args: str,
               debug: bool = False) -> subprocess.Popen:
        """A device agent; ``debug`` logs its debug lines (and paho's) too."""
        return self._spawn(f"device-{device_id}", [
            "client", "--broker", self.url, "--id", device_id, "--data", str(shard),
            "--state", str(self.folder / f"state-{device_id}"), "--exit-when-finished",
            "--reconnect-max", "2", "--ack-timeout", "10", *self.extra, *args],
            debug=debug)

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for_log(self, name: str, text: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None and text not in self.log(name):
                raise AssertionError(f"{name} exited ({proc.returncode}) before "
                                     f"logging {text!r}:\n{self.log(name)[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} did not log {text!r} within {timeout} s:"
                                     f"\n{self.log(name)[-3000:]}")
            time.sleep(0.1)

    def wait(self, name: str, timeout: float = 180.0) -> int:
        try:
            return self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running after {timeout} s:\n"
                                 f"{self.log(name)[-3000:]}") from None

    def kill(self, name: str) -> None:
        self.procs[name].kill()
        self.procs[name].wait()

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def metrics(self) -> list[dict]:
        return read_metrics(self.folder / "aggregator" / "metrics.jsonl")

    def rounds(self) -> list[dict]:
        return [e for e in self.metrics() if e["event"] == "round"]
