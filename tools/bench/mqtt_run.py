"""Load benchmark of an MQTT federation: one broker, one aggregator, N device processes.

``run_bench`` starts its own Mosquitto on a free port (the shipped config,
anonymous, plain listener only, persistence off, ``sys_interval 1``), shards a dataset over N devices,
starts N ``sparsefedpp client`` processes and one ``sparsefedpp serve`` at the
same moment, and measures, while a paho subscriber watches ``$SYS/broker/...``,
``sfpp/round`` and ``sfpp/status/+`` and a sampler thread reads ``/proc`` every
0.2 s:

- startup: seconds from the spawn until every device's retained status says
  online, and until the first round announcement;
- round latency: the aggregator's ``seconds`` per round (metrics.jsonl). Round 1's
  also counts the wait for the devices to come online; that part is startup, so
  it is cut off at the announcement (seen by the subscriber);
- bytes through the broker per round: ``$SYS/broker/bytes/received|sent`` (and
  ``messages/...``) of the last sample before the first announcement and the first
  after the last round closed, minus the subscriber's own $SYS traffic, over the
  rounds; next to the application's sums (``bytes_up``, ``bytes_down``);
- CPU and peak RSS of the aggregator, the broker and the devices: utime + stime
  from ``/proc/<pid>/stat`` (the last read is of the zombie, so it is the final
  count) and the larger of ``VmHWM`` and every ``VmRSS`` seen in ``/proc/<pid>/status``;
- where a round's time goes, from the timestamps of the device logs: announcement
  to the last upload (download, local training, upload) and last upload to the
  close (aggregation, evaluation, checkpoint).

Every process it starts is killed when it returns or raises. The broker is
``tools/mosquitto.py``'s launcher, the sampler ``proc_sampler.py``, the subscriber
``mqtt_monitor.py`` and the figures and their table ``mqtt_report.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sparsefedpp.runtime.errors import ConfigError, SparseFedError
from sparsefedpp.trainer import data as trainer_data

from ..cmd_serve import config_toml
from ..mosquitto import ANONYMOUS, Mosquitto, require_binary
from .mqtt_monitor import BYTES_SENT, Monitor
from .mqtt_report import summarize
from .proc_sampler import ProcRecord, Sampler

FASHION_MNIST_DIR = Path(trainer_data.FASHION_MNIST_DIR)


class BenchFailed(SparseFedError):
    """A process of the benchmark failed or the run did not finish in time."""

    exit_code = 1


@dataclass(frozen=True)
class MqttBenchConfig:
    """One benchmark run (the defaults are the ``bench-mqtt`` command's)."""

    devices: int = 20
    rounds: int = 5
    data: str | None = None          # None: fashion-mnist if installed
    limit: int = 64                  # training examples per device
    model: str = "cnn"
    method: str = "sparsefedpp"
    sparsity: float = 0.9
    min_clients: int | None = None   # None: 80 % of the devices
    test_limit: int = 200
    lr: float = 0.1
    round_timeout: float = 600.0
    timeout: float = 1800.0          # the whole run
    seed: int = 0

    def __post_init__(self):
        for name in ("devices", "rounds", "limit", "test_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"bench-mqtt {name}: expected an integer >= 1, got "
                                  f"{value!r}")
        if self.min_clients is not None and not 1 <= self.min_clients <= self.devices:
            raise ConfigError(f"bench-mqtt min_clients: expected 1 to {self.devices}, "
                              f"got {self.min_clients}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"bench-mqtt sparsity: expected [0, 1), got "
                              f"{self.sparsity}")
        if not (self.timeout > 0 and self.round_timeout > 0):
            raise ConfigError("bench-mqtt timeout: expected seconds > 0")

    @property
    def quorum(self) -> int:
        if self.min_clients is not None:
            return self.min_clients
        return max(1, int(0.8 * self.devices))

    def dataset(self) -> str:
        if self.data is not None:
            return self.data
        if FASHION_MNIST_DIR.is_dir():
            return "fashion-mnist"
        raise ConfigError(f"bench-mqtt data: expected --data (a CIFAR-10 folder, IDX "
                          f"folder or .npz) since {FASHION_MNIST_DIR} is missing, got "
                          f"none; or apt-get install dataset-fashion-mnist")



def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"



def _write_config(path: Path, cfg: MqttBenchConfig, data: str, devices: list[str],
                  state_dir: Path) -> None:
    fed = {"method": cfg.method, "sparsity": cfg.sparsity, "model": cfg.model,
           "data": data, "rounds": cfg.rounds, "per_round": cfg.devices,
           "min_clients": cfg.quorum, "test_limit": cfg.test_limit,
           "eval_sparsities": [cfg.sparsity], "lr": cfg.lr, "lr_end": cfg.lr / 2,
           "seed": cfg.seed}
    # device_grace: round 1 waits for every device (the start-up is measured)
    dep = {"devices": devices, "state_dir": str(state_dir),
           "round_timeout": cfg.round_timeout, "device_grace": cfg.timeout,
           "offline_grace": 10.0, "publish_timeout": 120.0}
    path.write_text(config_toml(fed, dep))


def _read_events(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    events = []
    for line in text.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:  # a line being written
            break
    return events



def run_bench(cfg: MqttBenchConfig, workdir: str | os.PathLike,
              say: Callable[[str], None] = lambda _m: None, *,
              place_devices: Callable[[list[str], int], object] | None = None) -> dict:
    """Run the benchmark in ``workdir`` (shards, logs, state) and return its result.

    ``place_devices(devices, broker_port)``, when given, returns an object whose
    ``route(device)`` gives that device's command prefix and broker URL (e.g.
    inside a network namespace behind a thin link, tools/bench/link.py), whose
    ``counters()`` go into the result as ``"link"`` and whose ``close()`` runs at
    the end. Raises ConfigError without mosquitto, BenchFailed when the
    aggregator fails or the run exceeds ``cfg.timeout``; every started process is
    killed either way.
    """
    from .. import cli

    require_binary()  # before the shards are written
    data = cfg.dataset()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    wall_start = time.perf_counter()

    say(f"bench-mqtt: sharding {data} over {cfg.devices} devices ({cfg.limit} "
        f"examples each)")
    shard_dir = work / "shards"
    code = cli.main(["partition", "--data", data, "--clients", str(cfg.devices),
                     "--limit", str(cfg.limit * cfg.devices), "--iid", "--out",
                     str(shard_dir), "--seed", str(cfg.seed), "--quiet"])
    if code != 0:
        raise BenchFailed(f"bench-mqtt: partition of {data}: expected exit code 0, got "
                          f"{code}")
    devices = [str(k) for k in range(cfg.devices)]
    state_dir = work / "aggregator"
    if state_dir.exists():  # a federation state would resume instead of starting
        shutil.rmtree(state_dir)
    config_path = work / "fed.toml"
    _write_config(config_path, cfg, data, devices, state_dir)

    # anonymous, plain listener only, persistence off, $SYS every second for the monitor
    broker = Mosquitto(work, settings={**ANONYMOUS, "persistence": False,
                                       "persistence_location": None},
                       append="sys_interval 1\n",
                       log_types=("error", "warning", "notice"))
    sampler: Sampler | None = None
    monitor: Monitor | None = None
    procs: list[subprocess.Popen] = []
    placed = None
    try:
        sampler = Sampler()
        broker_started = time.time()
        sampler.add("broker", broker.start().process, broker.log_path, broker_started)
        monitor = Monitor(broker.port)
        say(f"bench-mqtt: mosquitto on port {broker.port} (pid {broker.process.pid}); "
            f"starting 1 aggregator and {cfg.devices} devices")

        cmd = [sys.executable, "-m", "sparsefedpp.tools.cli"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        device_env = dict(env, NUMBA_NUM_THREADS="1")
        t0 = time.time()

        def spawn(name: str, args: list[str], env: dict,
                  prefix: list[str] = ()) -> ProcRecord:
            log = work / f"{name}.log"
            with open(log, "wb") as f:  # ip netns exec execs: the pid stays the CLI's
                proc = subprocess.Popen([*prefix, *cmd, *args], stdout=f, stderr=f,
                                        env=env, stdin=subprocess.DEVNULL)
            procs.append(proc)
            return sampler.add(name, proc, log, time.time())

        if place_devices is not None:
            placed = place_devices(devices, broker.port)
        routes = {d: placed.route(d) if placed is not None else ([], broker.url)
                  for d in devices}
        server = spawn("aggregator", ["serve", "--broker", broker.url, "--config",
                                      str(config_path), "--reconnect-max", "2"], env)
        device_recs = [
            spawn(f"device-{d}", ["client", "--broker", routes[d][1], "--id", d,
                                  "--data", str(shard_dir / f"client-{d}.npz"),
                                  "--state", str(work / f"state-{d}"),
                                  "--exit-when-finished", "--reconnect-max", "2"],
                  device_env, routes[d][0])
            for d in devices]

        metrics_path = state_dir / "metrics.jsonl"
        _watch(cfg, t0, monitor, server, device_recs, metrics_path, say)
        events = _read_events(metrics_path)
        rounds = [e for e in events if e.get("event") == "round"]
        if len(rounds) != cfg.rounds:
            raise BenchFailed(f"bench-mqtt: expected {cfg.rounds} round events in "
                              f"{metrics_path}, got {len(rounds)}:\n"
                              f"{_tail(server.log)}")
        # a $SYS sample after the last round closed (published every second)
        closed = rounds[-1]["time"]
        wait_until = time.monotonic() + 5
        while monitor.counter(BYTES_SENT, after=closed) is None and \
                time.monotonic() < wait_until:
            time.sleep(0.1)
        broker_rec = sampler.records["broker"]
        sampler.sample(broker_rec)
        if (0, 0) not in monitor.announced:
            raise BenchFailed("bench-mqtt: the subscriber saw no announcement of round 1")
        result = summarize(cfg, data, t0, monitor, sampler, server, device_recs,
                           broker_rec, events, rounds)
        result["machine"] = {"cpus": os.cpu_count(), "loadavg_start": list(load_start),
                             "loadavg_end": list(os.getloadavg()),
                             "mosquitto": monitor.latest("$SYS/broker/version")}
        result["wall_s"] = time.perf_counter() - wall_start
        result["workdir"] = str(work)
        result["pids"] = {name: r.proc.pid for name, r in sampler.records.items()}
        if placed is not None:
            result["link"] = placed.counters()
        return result
    finally:
        if monitor is not None:
            monitor.close()
        if sampler is not None:
            sampler.stop()  # first: it reaps processes, so it must not race kill()
        for proc in procs:
            if proc.returncode is None:
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
        for proc in procs:
            try:
                proc.wait(10)
            except (subprocess.TimeoutExpired, ChildProcessError):
                pass
        broker.stop()
        if placed is not None:
            placed.close()


def _watch(cfg: MqttBenchConfig, t0: float, monitor: Monitor, server: ProcRecord,
           device_recs: list[ProcRecord], metrics_path: Path,
           say: Callable[[str], None]) -> None:
    """Report progress until every process has exited (devices get 60 s after the
    aggregator); BenchFailed if the aggregator or a device fails (a lost device would
    stall round 1 for device_grace, later rounds for offline_grace) or the run
    times out."""
    deadline = time.monotonic() + cfg.timeout
    reported_online = reported_first = False
    rounds_seen = 0
    while server.ended is None or any(r.ended is None for r in device_recs):
        if time.monotonic() > deadline:
            raise BenchFailed(f"bench-mqtt: expected the run to finish within "
                              f"{cfg.timeout:g} s, got {rounds_seen} of {cfg.rounds} "
                              f"rounds; aggregator log:\n{_tail(server.log)}")
        if server.ended is not None and server.proc.returncode != 0:
            raise BenchFailed(f"bench-mqtt: aggregator exited with code "
                              f"{server.proc.returncode}:\n{_tail(server.log)}")
        failed = [r for r in device_recs if r.ended is not None and r.proc.returncode]
        if failed and server.ended is None:
            raise BenchFailed(f"bench-mqtt: {failed[0].name} exited with code "
                              f"{failed[0].proc.returncode} while the federation ran:"
                              f"\n{_tail(failed[0].log)}")
        if server.ended is not None and time.time() - server.ended > 60:
            return  # devices that did not hear "finished" are killed by the caller
        if not reported_online and len(monitor.online) >= cfg.devices:
            reported_online = True
            say(f"bench-mqtt: {cfg.devices} devices online after "
                f"{max(monitor.online.values()) - t0:.1f} s")
        if not reported_first and (0, 0) in monitor.announced:
            reported_first = True
            say(f"bench-mqtt: round 1 announced after "
                f"{monitor.announced[(0, 0)] - t0:.1f} s")
        rounds = [e for e in _read_events(metrics_path) if e.get("event") == "round"]
        for e in rounds[rounds_seen:]:
            say(f"bench-mqtt: round {e['round']}/{cfg.rounds}: "
                f"{len(e['accepted'])}/{len(e['selected'])} updates, "
                f"{e['seconds']:.1f} s (aggregator)")
        rounds_seen = len(rounds)
        time.sleep(0.2)

