"""Run ``bench/worker.py`` subprocesses: one-shot (its JSON line, error or timeout) or
persistent (``ServingWorker``: timed turns on request)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from sparsefedpp.runtime.kernels.config import WAIT_SET_HERE

from .worker import TORCH_MISSING

#: the thread-count variables a worker gets (OpenBLAS and Numba for our engine,
#: OpenMP and MKL for torch; setting all four for both is harmless)
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS", "OMP_NUM_THREADS",
               "MKL_NUM_THREADS")
STDERR_TAIL_LINES = 8


@dataclass
class WorkerRun:
    """What one worker process gave back.

    ``result`` is its JSON record (None on failure), ``error`` says why it failed
    (exit code or timeout, then the tail of its stderr), ``unavailable`` is set
    when a torch worker could not import torch, ``wall_s`` is the process's wall
    time seen from the parent (interpreter start-up and exit included).
    """

    name: str
    result: dict | None
    wall_s: float
    error: str | None = None
    unavailable: str | None = None

    @property
    def ok(self) -> bool:
        return self.result is not None


def worker_env(threads: int, *, force: bool) -> tuple[dict, dict]:
    """The environment of a worker and the thread variables it ends up with.

    Each of THREAD_VARS is set to ``threads`` unless the user's environment
    already sets it and ``force`` (an explicit ``--threads``) is False. Everything
    else, OPENBLAS_CORETYPE included, passes through unchanged.
    """
    env = dict(os.environ)
    for key, value in WAIT_SET_HERE.items():  # each framework keeps its own default
        if env.get(key) == value:
            del env[key]
    for key in THREAD_VARS:
        if force or key not in env:
            env[key] = str(threads)
    return env, {key: env[key] for key in THREAD_VARS}


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


def _tail(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return "\n".join(lines[-STDERR_TAIL_LINES:]) or "(no stderr)"


def _last_json(stdout: str) -> dict | None:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def run_worker(name: str, argv: list[str], *, env: dict, timeout: float) -> WorkerRun:
    """Run ``python -m sparsefedpp.tools.bench.worker *argv`` and parse its result.

    Never raises for a failing worker: a non-zero exit, a missing result line or a
    timeout (the process is killed) comes back as ``WorkerRun.error``.
    """
    cmd = [sys.executable, "-m", "sparsefedpp.tools.bench.worker", *argv]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, env=env, timeout=timeout,
                              capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        wall = time.perf_counter() - start
        return WorkerRun(name, None, wall, error=f"timed out after {timeout:g} s "
                         f"(killed); stderr tail:\n{_tail(_text(err.stderr))}")
    wall = time.perf_counter() - start
    record = _last_json(proc.stdout)
    if proc.returncode == TORCH_MISSING and record and record.get("unavailable"):
        return WorkerRun(name, None, wall, unavailable=record["unavailable"])
    if proc.returncode != 0:
        return WorkerRun(name, None, wall, error=f"exit code {proc.returncode}; "
                         f"stderr tail:\n{_tail(proc.stderr)}")
    if record is None or not record.get("ok"):
        return WorkerRun(name, None, wall, error="no JSON result line on stdout; "
                         f"stderr tail:\n{_tail(proc.stderr)}")
    return WorkerRun(name, record, wall)


class WorkerFailed(Exception):
    """A serving worker died, timed out or answered an error; ``run`` says which."""

    def __init__(self, run: WorkerRun):
        super().__init__(run.error or run.unavailable)
        self.run = run


class ServingWorker:
    """A persistent ``worker --serve`` process: set up once, then timed turns
    on request (``request``), so the parent can alternate it with another worker.

    stdout is read by a thread into a queue (a bounded wait per answer); stderr goes
    to a temporary file, whose tail explains a failure.
    """

    def __init__(self, name: str, argv: list[str], *, env: dict, timeout: float):
        self.name, self.timeout = name, timeout
        self.start = time.perf_counter()
        self._stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8",
                                              errors="replace")
        cmd = [sys.executable, "-m", "sparsefedpp.tools.bench.worker", *argv, "--serve"]
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr,
                                     text=True, bufsize=1)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self._ready: dict | None = None

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _fail(self, why: str, unavailable: str | None = None) -> WorkerFailed:
        self.kill()
        self._stderr.seek(0)
        run = WorkerRun(self.name, None, time.perf_counter() - self.start,
                        error=None if unavailable else
                        f"{why}; stderr tail:\n{_tail(self._stderr.read())}",
                        unavailable=unavailable)
        return WorkerFailed(run)

    def _answer(self) -> dict:
        """The next JSON line of the worker (other stdout lines are skipped)."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise self._fail(f"timed out after {self.timeout:g} s (killed)") from None
            if line is None:
                code = self.proc.wait()
                raise self._fail(f"exit code {code} before it answered")
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            if record.get("unavailable"):
                raise self._fail("", unavailable=record["unavailable"])
            if not record.get("ok"):
                raise self._fail(f"worker error: {record.get('error')}")
            return record

    def ready(self) -> dict:
        """The ready record (set-up results such as the logits check), once."""
        if self._ready is None:
            self._ready = self._answer()
        return self._ready

    def _send(self, request: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._fail("its stdin closed (it exited)") from None

    def request(self, op: str, n: int) -> list[float]:
        """One turn: an untimed then ``n`` timed calls of ``op``; their times (ms)."""
        self.ready()
        self._send({"op": op, "n": n})
        return self._answer()["times_ms"]

    def close(self) -> dict:
        """End the worker; its final record (peak RSS, versions) plus ``wall_s``."""
        self.ready()
        self._send({"op": "done"})
        record = self._answer()
        self.proc.wait(timeout=self.timeout)
        self._stderr.close()
        return {**record, "wall_s": time.perf_counter() - self.start}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
