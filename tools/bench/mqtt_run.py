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

Every process it starts is killed when it returns or raises.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from sparsefedpp.runtime.errors import ConfigError, SparseFedError, TransportError

from ..cmd_serve import config_toml
from ..mosquitto import (
    HOST,
    PLAIN_PORT,
    SHIPPED_CONF,
    TLS_PORT,
    find_binary,
    free_port,
    render_config,
)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
PREFIX = "sfpp"
SAMPLE_EVERY = 0.2          # seconds between /proc reads
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SYS_TOPICS = ("$SYS/broker/bytes/#", "$SYS/broker/messages/#", "$SYS/broker/load/#",
              "$SYS/broker/clients/connected", "$SYS/broker/version")
BYTES_RECEIVED = "$SYS/broker/bytes/received"
BYTES_SENT = "$SYS/broker/bytes/sent"
MESSAGES_RECEIVED = "$SYS/broker/messages/received"
MESSAGES_SENT = "$SYS/broker/messages/sent"


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


# ---------------------------------------------------------------- small helpers

def require_mosquitto() -> str:
    path = find_binary("mosquitto")
    if path is None:
        raise ConfigError("bench-mqtt: expected the mosquitto broker at "
                          "/usr/sbin/mosquitto or on PATH, got none; apt-get install "
                          "mosquitto")
    if not SHIPPED_CONF.is_file():
        raise ConfigError(f"bench-mqtt: expected the shipped broker config at "
                          f"{SHIPPED_CONF}, got none; run it from a source checkout "
                          f"(pip install -e .)")
    return path


def percentile(values, q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q % at or below it
    (with fewer than 100 / (100 - q) values, p95 is the maximum)."""
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)])


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


def _log_time(line: str) -> float | None:
    """The time.time() of a log line starting with logging's asctime, else None."""
    try:
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None


# ---------------------------------------------------------------- /proc sampling

def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (a zombie still has its final counts)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _memory_kb(pid: int) -> int:
    """max(VmHWM, VmRSS) in kB; 0 once the process is gone (or a zombie)."""
    peak = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith((b"VmHWM:", b"VmRSS:")):
                    peak = max(peak, int(line.split()[1]))
    except OSError:
        pass
    return peak


def _machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat minus idle, iowait)."""
    try:
        with open("/proc/stat", "rb") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    return (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS


def _step_at(samples: list[tuple[float, float]], t: float) -> float:
    """The value of the last (time, value) sample at or before t (else the first)."""
    value = samples[0][1] if samples else 0.0
    for ts, v in samples:
        if ts > t:
            break
        value = v
    return value


@dataclass
class ProcRecord:
    """What the sampler saw of one process."""

    name: str
    proc: subprocess.Popen
    log: Path | None
    started: float
    ended: float | None = None
    peak_kb: int = 0
    cpu: list = field(default_factory=list)  # [(time, cpu seconds)]

    @property
    def cpu_s(self) -> float:
        return self.cpu[-1][1] if self.cpu else 0.0

    def cpu_at(self, t: float) -> float:
        """CPU seconds used up to time t (the last sample at or before it)."""
        return _step_at(self.cpu, t) if self.cpu and self.cpu[0][0] <= t else 0.0

    @property
    def wall_s(self) -> float:
        end = self.ended if self.ended is not None else (
            self.cpu[-1][0] if self.cpu else self.started)
        return end - self.started


class Sampler:
    """A thread that reads /proc of every registered process every SAMPLE_EVERY s.

    It is the only one to reap them: ``waitid(WNOWAIT)`` sees an exit without
    reaping, the zombie's stat gives the final CPU count, then ``Popen.wait``.
    ``machine`` and ``bench`` are the busy CPU seconds of the whole machine and of
    this process (the subscriber and the sampler) at the same moments.
    """

    def __init__(self):
        self.records: dict[str, ProcRecord] = {}
        self.machine: list[tuple[float, float]] = []
        self.bench: list[tuple[float, float]] = []
        self._lock = threading.Lock()
        self._sample_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-sampler",
                                        daemon=True)
        self._thread.start()

    def add(self, name: str, proc: subprocess.Popen, log: Path | None,
            started: float) -> ProcRecord:
        record = ProcRecord(name, proc, log, started)
        with self._lock:
            self.records[name] = record
        self.sample(record)
        return record

    def sample(self, record: ProcRecord) -> None:
        with self._sample_lock:
            self._sample(record)

    def _sample(self, record: ProcRecord) -> None:
        if record.ended is not None:
            return
        pid = record.proc.pid
        try:
            exited = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            exited = True
        now = time.time()
        if not exited:
            record.peak_kb = max(record.peak_kb, _memory_kb(pid))
        cpu = _cpu_seconds(pid)
        if cpu is not None:
            record.cpu.append((now, cpu))
        if exited:
            record.ended = now
            record.proc.wait()

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            now = time.time()
            self.machine.append((now, _machine_busy_s()))
            self.bench.append((now, _cpu_seconds(os.getpid()) or 0.0))
            with self._lock:
                records = list(self.records.values())
            for record in records:
                self.sample(record)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------- the broker

class Broker:
    """A Mosquitto on a free localhost port, configured from the shipped
    ``deploy/mosquitto/mosquitto.conf`` (its limits, queues and session settings)
    with the TLS listener, the logins (and so the client id = username rule) and
    persistence off, and $SYS every second for the monitor."""

    def __init__(self, folder: Path, binary: str):
        self.folder = folder
        self.port = free_port()
        self.config_path = folder / "mosquitto.conf"
        self.log_path = folder / "mosquitto.log"
        append = (f"sys_interval 1\nlog_dest file {self.log_path}\n"
                  "log_type error\nlog_type warning\nlog_type notice\n")
        if os.geteuid() == 0:  # as root Mosquitto would switch to the user mosquitto
            append += "user root\n"
        self.config_path.write_text(render_config(
            SHIPPED_CONF.read_text(), listeners={TLS_PORT: None, PLAIN_PORT: self.port},
            allow_anonymous=True, password_file=None, acl_file=None,
            use_username_as_clientid=False, persistence=False,
            persistence_location=None, append=append))
        self.binary = binary
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.port}"

    def start(self) -> subprocess.Popen:
        with open(self.folder / "mosquitto.stderr", "ab") as err:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.config_path)],
                                         stdout=err, stderr=err,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise TransportError(
                    f"mosquitto: expected a running broker, got exit code "
                    f"{self.proc.returncode}:\n"
                    f"{_tail(self.folder / 'mosquitto.stderr')}"
                    f"\n{_tail(self.log_path)}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return self.proc
            except OSError:
                if time.monotonic() > deadline:
                    raise TransportError(f"mosquitto: port {self.port} not open after "
                                         f"10 s:\n{_tail(self.log_path)}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _publish_wire_bytes(topic: str, payload: bytes) -> int:
    """Bytes of an MQTT 3.1.1 QoS 0 PUBLISH: fixed header, topic, payload."""
    remaining = 2 + len(topic.encode()) + len(payload)
    length_bytes = 1 if remaining < 128 else 2 if remaining < 16384 else 3
    return 1 + length_bytes + remaining


class Monitor:
    """A paho subscriber: $SYS counters, round announcements, device statuses.

    ``own_bytes`` counts what the broker sent to this subscriber, so it can be taken
    off ``bytes/sent``.
    """

    def __init__(self, port: int):
        import paho.mqtt.client as mqtt

        self.sys: dict[str, list[tuple[float, str]]] = {}
        self.own: list[tuple[float, int]] = [(time.time(), 0)]
        self.announced: dict[tuple[int, int], float] = {}
        self.online: dict[str, float] = {}
        self.connected = threading.Event()
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"sfpp-bench-monitor-{os.getpid()}",
                                  protocol=mqtt.MQTTv311, clean_session=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect(HOST, port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(10):
            self.close()
            raise TransportError(f"bench monitor: expected to connect to {HOST}:{port} "
                                 f"within 10 s, got no CONNACK")

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        client.subscribe([(t, 0) for t in SYS_TOPICS] +
                         [(f"{PREFIX}/round", 0), (f"{PREFIX}/status/+", 0)])
        self.connected.set()

    def _on_message(self, client, userdata, message):
        now, topic, payload = time.time(), message.topic, bytes(message.payload)
        with self._lock:
            wire = _publish_wire_bytes(topic, payload)
            self.own.append((now, self.own[-1][1] + wire))
            if topic.startswith("$SYS/"):
                value = payload.decode(errors="replace")
                self.sys.setdefault(topic, []).append((now, value))
                return
            try:
                msg = json.loads(payload) if payload else {}
            except ValueError:
                return
            if topic == f"{PREFIX}/round" and "round" in msg:
                key = (int(msg["round"]), int(msg.get("attempt", 0)))
                self.announced.setdefault(key, now)
            elif topic.startswith(f"{PREFIX}/status/") and msg.get("state") not in (
                    None, "offline"):
                self.online.setdefault(topic.rsplit("/", 1)[1], now)

    def counter(self, topic: str, *, before: float | None = None,
                after: float | None = None) -> tuple[float, int] | None:
        """(time, value) of the last sample before ``before`` or the first at or
        after ``after``."""
        with self._lock:
            samples = list(self.sys.get(topic, ()))
        if before is not None:
            hits = [s for s in samples if s[0] < before]
            return (hits[-1][0], int(float(hits[-1][1]))) if hits else None
        hits = [s for s in samples if s[0] >= after]
        return (hits[0][0], int(float(hits[0][1]))) if hits else None

    def own_bytes(self, t: float) -> int:
        with self._lock:
            value = 0
            for ts, total in self.own:
                if ts > t:
                    break
                value = total
            return value

    def latest(self, topic: str) -> str | None:
        with self._lock:
            samples = self.sys.get(topic)
            return samples[-1][1] if samples else None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ---------------------------------------------------------------- the run

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


def _device_times(log: Path) -> dict[int, tuple[float | None, float | None]]:
    """round (1-based) -> (training started, update sent) from a device log."""
    out: dict[int, list] = {}
    for line in _read_lines(log):
        t = _log_time(line)
        if t is None:
            continue
        for marker, slot in ((": training on ", 0), (": update sent", 1)):
            pos = line.find(marker)
            if pos > 0 and " round " in line[:pos]:
                try:
                    rnd = int(line[:pos].rsplit(" round ", 1)[1])
                except ValueError:
                    continue
                out.setdefault(rnd, [None, None])
                if out[rnd][slot] is None:
                    out[rnd][slot] = t
    return {k: tuple(v) for k, v in out.items()}


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def run_bench(cfg: MqttBenchConfig, workdir: str | os.PathLike,
              say: Callable[[str], None] = lambda _m: None) -> dict:
    """Run the benchmark in ``workdir`` (shards, logs, state) and return its result.

    Raises ConfigError without mosquitto, BenchFailed when the aggregator fails or
    the run exceeds ``cfg.timeout``; every started process is killed either way.
    """
    from .. import cli

    binary = require_mosquitto()
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

    broker = Broker(work, binary)
    sampler: Sampler | None = None
    monitor: Monitor | None = None
    procs: list[subprocess.Popen] = []
    try:
        sampler = Sampler()
        broker_started = time.time()
        sampler.add("broker", broker.start(), broker.log_path, broker_started)
        monitor = Monitor(broker.port)
        say(f"bench-mqtt: mosquitto on port {broker.port} (pid {broker.proc.pid}); "
            f"starting 1 aggregator and {cfg.devices} devices")

        cmd = [sys.executable, "-m", "sparsefedpp.tools.cli"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        device_env = dict(env, NUMBA_NUM_THREADS="1")
        t0 = time.time()

        def spawn(name: str, args: list[str], env: dict) -> ProcRecord:
            log = work / f"{name}.log"
            with open(log, "wb") as f:
                proc = subprocess.Popen([*cmd, *args], stdout=f, stderr=f, env=env,
                                        stdin=subprocess.DEVNULL)
            procs.append(proc)
            return sampler.add(name, proc, log, time.time())

        server = spawn("aggregator", ["serve", "--broker", broker.url, "--config",
                                      str(config_path), "--reconnect-max", "2"], env)
        device_recs = [
            spawn(f"device-{d}", ["client", "--broker", broker.url, "--id", d, "--data",
                                  str(shard_dir / f"client-{d}.npz"), "--state",
                                  str(work / f"state-{d}"), "--exit-when-finished",
                                  "--reconnect-max", "2"], device_env)
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
        result = _result(cfg, data, t0, monitor, sampler, server, device_recs,
                         broker_rec, events, rounds)
        result["machine"] = {"cpus": os.cpu_count(), "loadavg_start": list(load_start),
                             "loadavg_end": list(os.getloadavg()),
                             "mosquitto": monitor.latest("$SYS/broker/version")}
        result["wall_s"] = time.perf_counter() - wall_start
        result["workdir"] = str(work)
        result["pids"] = {name: r.proc.pid for name, r in sampler.records.items()}
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


def _result(cfg: MqttBenchConfig, data: str, t0: float, monitor: Monitor,
            sampler: Sampler, server: ProcRecord, device_recs: list[ProcRecord],
            broker_rec: ProcRecord, events: list[dict], rounds: list[dict]) -> dict:
    first_announce = monitor.announced.get((0, 0))
    closed = rounds[-1]["time"]
    if first_announce is None:
        raise BenchFailed("bench-mqtt: the subscriber saw no announcement of round 1")

    # --- round latency (round 1 without the wait for the devices)
    device_times = {r.name: _device_times(r.log) for r in device_recs}
    per_round = []
    for e in rounds:
        rnd = e["round"]
        start = e["time"] - e["seconds"]
        announced = min((t for (r, _a), t in monitor.announced.items() if r == rnd - 1),
                        default=None)
        latency = e["seconds"]
        if rnd == 1:
            latency -= max(0.0, first_announce - start)
        sent = [v[rnd][1] for v in device_times.values() if rnd in v and v[rnd][1]]
        train = [v[rnd][1] - v[rnd][0] for v in device_times.values()
                 if rnd in v and v[rnd][0] and v[rnd][1]]
        per_round.append({
            "round": rnd, "seconds": e["seconds"], "latency_s": latency,
            "selected": len(e["selected"]), "accepted": len(e["accepted"]),
            "rejected": len(e.get("rejected", [])),
            "bytes_up": e["bytes_up"], "bytes_down": e["bytes_down"],
            "announce_to_last_upload_s": (max(sent) - announced)
            if sent and announced else None,
            "last_upload_to_close_s": (e["time"] - max(sent)) if sent else None,
            "device_train_s_median": float(np.median(train)) if train else None,
            "device_train_s_max": max(train) if train else None,
            "accuracy": e.get("eval", {}).get("accuracy"),
        })
    latencies = [r["latency_s"] for r in per_round]

    # --- bytes through the broker
    broker = {}
    for key, topic in (("bytes_received", BYTES_RECEIVED), ("bytes_sent", BYTES_SENT),
                       ("messages_received", MESSAGES_RECEIVED),
                       ("messages_sent", MESSAGES_SENT)):
        before = monitor.counter(topic, before=first_announce)
        after = monitor.counter(topic, after=closed)
        if before is None or after is None:
            broker[key] = None
            continue
        broker[key] = after[1] - before[1]
        if key == "bytes_received":
            broker["window_s"] = after[0] - before[0]
        if key == "bytes_sent":
            own = monitor.own_bytes(after[0]) - monitor.own_bytes(before[0])
            broker["monitor_bytes"] = own
            broker[key] = after[1] - before[1] - own
    for key in ("bytes_received", "bytes_sent", "messages_received", "messages_sent"):
        value = broker.get(key)
        broker[f"{key}_per_round"] = value / cfg.rounds if value is not None else None
    broker.update(_proc_summary(broker_rec, first_announce, closed, cfg.rounds))

    aggregator = _proc_summary(server, first_announce, closed, cfg.rounds)
    aggregator["exit_code"] = server.proc.returncode
    dev = [_proc_summary(r, first_announce, closed, cfg.rounds) for r in device_recs]
    window = closed - first_announce
    devices_cpu_rounds = sum(d["cpu_s_in_rounds"] for d in dev)
    devices = {
        "peak_rss_mb_median": float(np.median([d["peak_rss_mb"] for d in dev])),
        "peak_rss_mb_max": max(d["peak_rss_mb"] for d in dev),
        "cpu_s_median": float(np.median([d["cpu_s"] for d in dev])),
        "cpu_s_in_rounds_total": devices_cpu_rounds,
        "cores_busy_in_rounds": devices_cpu_rounds / window if window > 0 else None,
        "exit_codes": sorted({r.proc.returncode for r in device_recs},
                             key=lambda c: (c is None, c or 0)),
    }
    ours = (devices_cpu_rounds + aggregator["cpu_s_in_rounds"]
            + broker["cpu_s_in_rounds"])
    machine_busy = (_step_at(sampler.machine, closed)
                    - _step_at(sampler.machine, first_announce))
    bench_cpu = (_step_at(sampler.bench, closed)
                 - _step_at(sampler.bench, first_announce))
    cores = {"machine_busy": machine_busy / window, "federation": ours / window,
             "bench_itself": bench_cpu / window,
             "others": (machine_busy - ours - bench_cpu) / window} if window > 0 else {}
    # the same during the start-up (spawn to round 1 announced)
    up = first_announce - t0
    recs = [server, broker_rec, *device_recs]
    # spawned at t0; the broker earlier, so its CPU before t0 is taken off
    ours_up = sum(r.cpu_at(first_announce) for r in recs) - broker_rec.cpu_at(t0)
    machine_up = (_step_at(sampler.machine, first_announce)
                  - _step_at(sampler.machine, t0))
    startup_cores = {"machine_busy": machine_up / up, "federation": ours_up / up}
    online = monitor.online
    all_online = max(online.values()) - t0 if len(online) >= cfg.devices else None
    app_up = sum(e["bytes_up"] for e in rounds)
    app_down = sum(e["bytes_down"] for e in rounds)
    end = next((e for e in events if e.get("event") == "end"), {})
    return {
        "config": {**asdict(cfg), "data": data, "min_clients": cfg.quorum,
                   "per_round": cfg.devices},
        "rounds": per_round,
        "latency_s": {"median": float(np.median(latencies)),
                      "p95": percentile(latencies, 95),
                      "p95_is_max": math.ceil(0.95 * len(latencies)) == len(latencies),
                      "min": min(latencies), "max": max(latencies)},
        "startup_s": {"devices_online": all_online,
                      "first_round": first_announce - t0},
        "rounds_window_s": window,
        "broker": broker,
        "app": {"bytes_up": app_up, "bytes_down": app_down,
                "bytes_up_per_round": app_up / cfg.rounds,
                "bytes_down_per_round": app_down / cfg.rounds,
                "totals": end.get("totals")},
        "aggregator": aggregator,
        "devices": devices,
        "cores_in_rounds": cores,
        "cores_in_startup": startup_cores,
        "final_accuracy": per_round[-1]["accuracy"],
    }


def _proc_summary(rec: ProcRecord, start: float, end: float, rounds: int) -> dict:
    in_rounds = rec.cpu_at(end) - rec.cpu_at(start)
    wall = rec.wall_s
    return {"cpu_s": rec.cpu_s, "wall_s": wall,
            "cpu_percent": 100 * rec.cpu_s / wall if wall > 0 else None,
            "cpu_s_in_rounds": in_rounds, "cpu_s_per_round": in_rounds / rounds,
            "cpu_percent_in_rounds": 100 * in_rounds / (end - start)
            if end > start else None,
            "peak_rss_mb": rec.peak_kb / 1024}


# ---------------------------------------------------------------- the report

def _fmt(value, spec: str = ".1f", scale: float = 1.0, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value / scale:{spec}}{unit}"


def format_table(result: dict, markdown: bool = False) -> str:
    """Per-round rows, then one line per figure."""
    c = result["config"]
    head = (f"{c['devices']} devices, {c['rounds']} rounds, {c['model']} on "
            f"{c['data']}, "
            f"{c['limit']} examples/device, {c['method']} S={c['sparsity']:g}, "
            f"per_round {c['per_round']}, min_clients {c['min_clients']}, "
            f"{result['machine']['cpus']} CPUs, load average at start "
            f"{result['machine']['loadavg_start'][0]:.2f}")
    cols = ["round", "latency s", "aggregator s", "updates", "up kB", "down kB",
            "announce->last upload s", "last upload->close s",
            "device train s (med/max)",
            "accuracy"]
    rows = []
    for r in result["rounds"]:
        rows.append([str(r["round"]), _fmt(r["latency_s"], ".2f"),
                     _fmt(r["seconds"], ".2f"), f"{r['accepted']}/{r['selected']}",
                     _fmt(r["bytes_up"], ".1f", 1e3), _fmt(r["bytes_down"], ".1f", 1e3),
                     _fmt(r["announce_to_last_upload_s"], ".2f"),
                     _fmt(r["last_upload_to_close_s"], ".2f"),
                     (f"{_fmt(r['device_train_s_median'], '.2f')}/"
                      f"{_fmt(r['device_train_s_max'], '.2f')}"),
                     _fmt(r["accuracy"], ".3f")])
    lat, b, app = result["latency_s"], result["broker"], result["app"]
    agg, dev, st = result["aggregator"], result["devices"], result["startup_s"]
    p95 = "round latency p95" + (" (= max: < 20 rounds)" if lat["p95_is_max"] else "")
    figures = [
        ("startup: all devices online", _fmt(st["devices_online"], ".1f", unit=" s")),
        ("startup: round 1 announced", _fmt(st["first_round"], ".1f", unit=" s")),
        ("round latency median", _fmt(lat["median"], ".2f", unit=" s")),
        (p95, _fmt(lat["p95"], ".2f", unit=" s")),
        ("broker bytes received / round", _fmt(b["bytes_received_per_round"], ".1f",
                                                1e3, " kB")),
        ("broker bytes sent / round", _fmt(b["bytes_sent_per_round"], ".1f", 1e3,
                                           " kB")),
        ("broker messages received / sent per round",
         (f"{_fmt(b['messages_received_per_round'], '.0f')} / "
          f"{_fmt(b['messages_sent_per_round'], '.0f')}")),
        ("app bytes up / round (updates)", _fmt(app["bytes_up_per_round"], ".1f", 1e3,
                                                " kB")),
        ("app bytes down / round (model x selected)",
         _fmt(app["bytes_down_per_round"], ".1f", 1e3, " kB")),
        ("aggregator CPU % (whole life)", _fmt(agg["cpu_percent"], ".1f", unit=" %")),
        ("aggregator CPU s (whole life)", _fmt(agg["cpu_s"], ".2f", unit=" s")),
        ("aggregator CPU s / round (during rounds)",
         _fmt(agg["cpu_s_per_round"], ".2f", unit=" s")),
        ("aggregator peak RSS", _fmt(agg["peak_rss_mb"], ".0f", unit=" MB")),
        ("broker CPU % (whole life)", _fmt(b["cpu_percent"], ".1f", unit=" %")),
        ("broker CPU s / round (during rounds)", _fmt(b["cpu_s_per_round"], ".3f",
                                                      unit=" s")),
        ("broker peak RSS", _fmt(b["peak_rss_mb"], ".1f", unit=" MB")),
        ("device peak RSS median / max",
         (f"{_fmt(dev['peak_rss_mb_median'], '.0f')} / "
          f"{_fmt(dev['peak_rss_mb_max'], '.0f')} MB")),
        ("device CPU s median (whole life)", _fmt(dev["cpu_s_median"], ".2f",
                                                  unit=" s")),
        ("devices: cores busy during rounds", _fmt(dev["cores_busy_in_rounds"], ".2f")),
        ("machine: cores busy during rounds (all processes)",
         _fmt(result["cores_in_rounds"].get("machine_busy"), ".2f")),
        ("  of which other users' processes",
         _fmt(result["cores_in_rounds"].get("others"), ".2f")),
        ("run wall time", _fmt(result.get("wall_s"), ".1f", unit=" s")),
    ]
    if markdown:
        out = [f"- {head}", "", "| " + " | ".join(cols) + " |",
               "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        out += ["", "| figure | value |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in figures]
        return "\n".join(out)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(cols)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    width = max(len(k) for k, _ in figures)
    return "\n".join([head, "", fmt.format(*cols), *(fmt.format(*r) for r in rows), "",
                      *(f"{k:<{width}}  {v}" for k, v in figures)])
