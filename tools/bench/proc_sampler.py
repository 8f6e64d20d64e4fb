"""Per-process CPU and memory from /proc, sampled by a thread: what ``bench-mqtt``
reports for the broker, the aggregator and every device.

CPU is utime + stime from ``/proc/<pid>/stat`` (the last read is of the zombie, so it
is the final count); peak memory the larger of ``VmHWM`` and every ``VmRSS`` seen in
``/proc/<pid>/status``. Linux only.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SAMPLE_EVERY = 0.2          # seconds between /proc reads
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (a zombie still has its final counts)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kb(pid: int) -> int:
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


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat minus idle, iowait)."""
    try:
        with open("/proc/stat", "rb") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    return (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS


def step_at(samples: list[tuple[float, float]], t: float) -> float:
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
        return step_at(self.cpu, t) if self.cpu and self.cpu[0][0] <= t else 0.0

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
            record.peak_kb = max(record.peak_kb, memory_kb(pid))
        cpu = cpu_seconds(pid)
        if cpu is not None:
            record.cpu.append((now, cpu))
        if exited:
            record.ended = now
            record.proc.wait()

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            now = time.time()
            self.machine.append((now, machine_busy_s()))
            self.bench.append((now, cpu_seconds(os.getpid()) or 0.0))
            with self._lock:
                records = list(self.records.values())
            for record in records:
                self.sample(record)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

