"""Run one ``bench_worker`` subprocess and collect its JSON line, error or timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from sparsefedpp.runtime.kernels.config import WAIT_SET_HERE

from .bench_worker import TORCH_MISSING

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
    """Run ``python -m sparsefedpp.tools.bench_worker *argv`` and parse its result.

    Never raises for a failing worker: a non-zero exit, a missing result line or a
    timeout (the process is killed) comes back as ``WorkerRun.error``.
    """
    cmd = [sys.executable, "-m", "sparsefedpp.tools.bench_worker", *argv]
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
