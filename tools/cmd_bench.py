"""``sparsefedpp bench``: our engine against PyTorch, the two taking turns.

Measures train-step time (zero_grad + forward + loss + backward + SGD step) and
inference time of ResNet-8 and ResNet-18, the peak RSS of a training process, and
the time to the first train step in a new process with a warm Numba cache; prints
ratios ours/PyTorch next to the issue's targets, with a verdict per row.

Each framework runs in its own ``bench/worker.py`` process: torch's OpenMP threads
keep spinning after each torch call and slow NumPy down in the same process, and
peak RSS has to be per framework. The speed workers persist (``--serve``) and take
turns of ``--block`` steps (``bench.timing.take_turns``, the order rotating), so
a slow spell of the shared machine falls on both; a time ratio is the median over
turns of median(ours) / median(torch) in the turn, with its min-max over the
turns. Peak RSS is a fresh worker's ``VmHWM``: on Linux a child's ``ru_maxrss``
starts at its parent's peak (the kernel carries it over at exec), which would
charge this process's memory to every worker. Both frameworks load the same
weights (our ``state_dict()`` saved to an .npz), run the same random batch, and
the torch worker checks its eval logits against ours.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sparsefedpp.runtime import models
from sparsefedpp.runtime.errors import ConfigError

from .bench.procs import ServingWorker, WorkerFailed, WorkerRun, run_worker, worker_env
from .bench.report import FIRST_STEP_MODEL, build_rows, format_markdown, format_text
from .flags import add_common
from .metrics import MetricsWriter
from .progress import say
from .bench.timing import take_turns

MODELS = ("resnet8", "resnet18")
#: (normal, --quick) defaults of the flags left unset
DEFAULTS = {"repeats": (20, 5), "warmup": (3, 1), "rss_steps": (5, 2),
            "block": (5, 1)}
DEFAULT_THREADS = 2
#: eval logits of the two frameworks further apart than this mean unequal models
LOGITS_TOLERANCE = 1e-3


@dataclass(frozen=True)
class BenchConfig:
    models: tuple[str, ...]
    batch_size: int
    warmup: int
    repeats: int
    rss_steps: int
    block: int
    threads: int
    threads_explicit: bool
    timeout: float
    with_torch: bool
    seed: int


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="train/inference time and memory against PyTorch",
        description="Time a train step and an inference of ResNet-8/18 with our "
        "engine and with PyTorch (same weights, same batch, each in its own "
        "process), measure peak RSS and the first step in a new process, and "
        "print ratios ours/PyTorch against the targets.")
    p.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                   help="resnet8 and/or resnet18 (default both; --quick: resnet8)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=None,
                   help="timed steps per measurement (default 20; --quick: 5)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (default 3; --quick: 1)")
    p.add_argument("--block", type=int, default=None,
                   help="steps per turn of each framework (default 5; --quick: 1)")
    p.add_argument("--rss-steps", type=int, default=None,
                   help="train steps of the peak-RSS worker (default 5; --quick: 2)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"threads of both frameworks (default {DEFAULT_THREADS}; "
                   "without this flag, OPENBLAS/NUMBA/OMP/MKL_NUM_THREADS already "
                   "set in the environment are kept)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds before a worker is killed (default 600)")
    p.add_argument("--no-torch", action="store_true",
                   help="measure our engine only")
    p.add_argument("--quick", action="store_true",
                   help="resnet8 only and fewer steps (smoke tests)")
    p.add_argument("--format", default="text", choices=("text", "markdown"),
                   help="table format (markdown: ready for the README)")
    add_common(p)
    p.set_defaults(run=run)


def make_config(args) -> BenchConfig:
    """Resolve --quick defaults and check every number (ConfigError names the flag)."""
    names = args.models or (["resnet8"] if args.quick else list(MODELS))
    names = [n for item in names for n in item.split(",") if n]
    for name in names:
        if name not in MODELS:
            raise ConfigError(f"--models: expected {' or '.join(MODELS)}, got {name!r}")
    picked = {key: getattr(args, key) if getattr(args, key) is not None
              else DEFAULTS[key][args.quick] for key in DEFAULTS}
    threads = args.threads if args.threads is not None else DEFAULT_THREADS
    for flag, value, low in (("--batch-size", args.batch_size, 1),
                             ("--repeats", picked["repeats"], 1),
                             ("--warmup", picked["warmup"], 0),
                             ("--rss-steps", picked["rss_steps"], 1),
                             ("--block", picked["block"], 1),
                             ("--threads", threads, 1)):
        if value < low:
            raise ConfigError(f"{flag}: expected an integer >= {low}, got {value}")
    if not args.timeout > 0:
        raise ConfigError(f"--timeout: expected seconds > 0, got {args.timeout}")
    return BenchConfig(models=tuple(dict.fromkeys(names)), batch_size=args.batch_size,
                       threads=threads, threads_explicit=args.threads is not None,
                       timeout=float(args.timeout), with_torch=not args.no_torch,
                       seed=args.seed, **picked)


class Session:
    """Runs the workers in order and keeps their records, errors and notes."""

    def __init__(self, config: BenchConfig, tmp: Path, metrics: MetricsWriter, *,
                 quiet: bool):
        self.config, self.tmp, self.metrics, self.quiet = config, tmp, metrics, quiet
        self.env, self.thread_vars = worker_env(config.threads,
                                                force=config.threads_explicit)
        self.with_torch = config.with_torch
        self.results: dict[tuple[str, str, str], dict] = {}
        #: (framework, op, model) -> per-turn times (ms) of the speed workers
        self.turns: dict[tuple[str, str, str], list[list[float]]] = {}
        self.errors: list[WorkerRun] = []
        self.notes: list[str] = []
        self.checks: dict[str, float] = {}
        if not self.with_torch:
            self.notes.append("--no-torch: our engine only")

    def argv(self, framework: str, task: str, model: str, *extra) -> list[str]:
        c = self.config
        return [task, "--framework", framework, "--model", model,
                "--batch-size", str(c.batch_size), "--warmup", str(c.warmup),
                "--repeats", str(c.repeats), "--rss-steps", str(c.rss_steps),
                "--threads", str(c.threads), "--seed", str(c.seed),
                *(str(e) for e in extra)]

    def failed(self, run: WorkerRun) -> None:
        """Record a failed worker, or note that torch is unavailable."""
        if run.unavailable:
            self.with_torch = False
            self.notes.append(f"{run.unavailable} (in a worker process); "
                              "measuring our engine only")
            say(f"bench: {run.unavailable}; measuring our engine only",
                quiet=self.quiet)
            return
        self.errors.append(run)
        say(f"bench: {run.name}: FAILED (the error follows the table)",
            quiet=self.quiet)
        self.metrics.write("error", worker=run.name, wall_s=run.wall_s,
                           message=run.error)

    def worker(self, framework: str, task: str, model: str, *extra) -> dict | None:
        """Run one worker; its record (plus ``wall_s``), or None if it failed."""
        if framework == "torch" and not self.with_torch:
            return None
        name = f"{framework} {task} {model}"
        run = run_worker(name, self.argv(framework, task, model, *extra), env=self.env,
                         timeout=self.config.timeout)
        if not run.ok:
            self.failed(run)
            return None
        say(f"bench: {name}: {run.wall_s:.1f} s", quiet=self.quiet)
        record = {**run.result, "wall_s": run.wall_s}
        self.metrics.write("worker", worker=name, **record)
        return record

    def serving(self, framework: str, model: str, *extra) -> ServingWorker | None:
        """A persistent speed worker, set up (None if it failed or torch is absent)."""
        if framework == "torch" and not self.with_torch:
            return None
        name = f"{framework} speed {model}"
        worker = ServingWorker(name, self.argv(framework, "speed", model, *extra),
                               env=self.env, timeout=self.config.timeout)
        try:
            worker.ready()
        except WorkerFailed as err:
            self.failed(err.run)
            return None
        return worker

    def speed(self, name: str, state: Path, logits: Path) -> None:
        """Train steps, then inferences, of both frameworks in turns."""
        c = self.config
        workers = {"ours": self.serving("ours", name, "--state", state,
                                        "--logits-out", logits)}
        if workers["ours"] is None:
            return
        torch = self.serving("torch", name, "--state", state, "--logits-ref", logits)
        if torch is not None:
            workers["torch"] = torch
            diff = torch.ready().get("max_abs_logit_diff")
            if diff is not None:
                self.checks[name] = diff
                self.metrics.write("check", model=name, max_abs_logit_diff=diff,
                                   tolerance=LOGITS_TOLERANCE)
        try:
            for op in ("train", "infer"):
                turns = take_turns(lambda fw, n, op=op: workers[fw].request(op, n),
                                   list(workers), c.repeats, block=c.block)
                for fw, ts in turns.items():
                    self.turns[(fw, op, name)] = ts
            for fw, worker in workers.items():
                record = worker.close()
                record["train_ms"] = [t for ts in self.turns[(fw, "train", name)]
                                      for t in ts]
                record["infer_ms"] = [t for ts in self.turns[(fw, "infer", name)]
                                      for t in ts]
                self.results[(fw, "speed", name)] = record
                self.metrics.write("worker", worker=f"{fw} speed {name}", **record)
                say(f"bench: {fw} speed {name}: {record['wall_s']:.1f} s",
                    quiet=self.quiet)
        except WorkerFailed as err:
            self.failed(err.run)
        finally:
            for worker in workers.values():
                worker.kill()

    def store(self, framework: str, task: str, model: str, *extra) -> dict | None:
        record = self.worker(framework, task, model, *extra)
        if record is not None:
            self.results[(framework, task, model)] = record
        return record

    def first_step(self) -> None:
        """ResNet-8's first step in a new process, after one run that warms the cache."""
        model = FIRST_STEP_MODEL
        warm = self.worker("ours", "first-step", model)
        if warm is not None:
            self.notes.append(f"Numba cache warm-up run (ours, first step): "
                              f"{warm['wall_s']:.2f} s process wall time")
        self.store("ours", "first-step", model)
        self.store("torch", "first-step", model)

    def model(self, name: str) -> None:
        """Speed and peak RSS of one model, both frameworks on the same weights."""
        state = self.tmp / f"{name}-state.npz"
        np.savez(state, **models.build(name, seed=self.config.seed).state_dict())
        self.speed(name, state, self.tmp / f"{name}-logits.npy")
        self.store("ours", "rss", name, "--state", state)
        self.store("torch", "rss", name, "--state", state)


def run(args) -> int:
    config = make_config(args)
    start = time.perf_counter()
    # JSON lines on stdout (--metrics -) keep stdout machine-readable
    table_out = sys.stderr if args.metrics == "-" else sys.stdout
    with MetricsWriter(args.metrics) as metrics, \
            tempfile.TemporaryDirectory(prefix="sparsefedpp-bench-") as tmp:
        session = Session(config, Path(tmp), metrics, quiet=args.quiet)
        metrics.write("start", command="bench", **asdict(config),
                      thread_vars=session.thread_vars,
                      openblas_coretype=os.environ.get("OPENBLAS_CORETYPE"),
                      python=platform.python_version(), loadavg=os.getloadavg())
        session.first_step()
        for name in config.models:
            session.model(name)
        rows = build_rows(session.results, config.models, session.turns)
        for row in rows:
            metrics.write("bench", **row.record())
        metrics.write("end", elapsed_seconds=time.perf_counter() - start,
                      num_errors=len(session.errors), loadavg=os.getloadavg())
    text = report(session, rows, args.format)
    print(text, file=table_out, flush=True)
    for failed in session.errors:
        print(f"error: worker '{failed.name}' failed: {failed.error}", file=sys.stderr)
    differ = [name for name, diff in session.checks.items()
              if not diff <= LOGITS_TOLERANCE]
    for name in differ:
        print(f"error: {name}: eval logits of ours and torch differ by more than "
              f"{LOGITS_TOLERANCE:g} on the same weights; the comparison is not "
              "like with like", file=sys.stderr)
    return 1 if session.errors or differ else 0


def report(session: Session, rows, fmt: str) -> str:
    """Header lines, the table, then notes (as lists in markdown)."""
    lines = header(session)
    notes = list(session.notes)
    for name, diff in session.checks.items():
        verdict = "same model" if diff <= LOGITS_TOLERANCE else "MODELS DIFFER"
        notes.append(f"{name}: eval logits max |ours - torch| = {diff:.2g} ({verdict})")
    notes += [f"worker '{r.name}' failed (see the error lines)" for r in session.errors]
    if fmt == "markdown":
        return "\n".join([*(f"- {line}" for line in lines), "", format_markdown(rows),
                          "", *(f"- {note}" for note in notes)]).rstrip()
    return "\n".join([*lines, "", format_text(rows), "",
                      *(f"note: {note}" for note in notes)]).rstrip()


def header(session: Session) -> list[str]:
    """Settings, versions and the threads each framework actually used."""
    c = session.config
    ours = next((r for (fw, _, _), r in session.results.items() if fw == "ours"), {})
    torch = next((r for (fw, _, _), r in session.results.items() if fw == "torch"), {})
    lines = [(f"sparsefedpp bench: batch {c.batch_size}, {c.warmup} warm-up + "
              f"{c.repeats} timed steps (median, p90) in turns of {c.block} per "
              "framework; ratio = median over turns of ours/torch [min-max over "
              f"turns]; peak RSS over {c.rss_steps} train steps, seed {c.seed}, "
              f"python {platform.python_version()}")]
    used = (f"threads: ours numba {ours.get('numba_threads', '?')}, openblas "
            f"{ours.get('blas_threads', '?')}")
    if torch:
        used += (f"; torch {torch.get('torch_threads')} (interop "
                 f"{torch.get('torch_interop_threads')})")
    kept = [k for k in session.thread_vars
            if not c.threads_explicit and os.environ.get(k) is not None]
    env = " ".join(f"{k}={v}" for k, v in session.thread_vars.items())
    lines.append(f"{used}; worker env {env}"
                 + (f" ({', '.join(kept)} from the environment)" if kept else ""))
    versions = [f"{k} {d[k]}" for d, k in ((ours, "numpy"), (ours, "numba"),
                                           (torch, "torch")) if d.get(k)]
    if versions or ours.get("blas_config"):
        lines.append(f"versions: {', '.join(versions)}"
                     + (f"; BLAS: {ours['blas_config']}" if ours.get("blas_config")
                        else ""))
    lines.append("load average (1, 5, 15 min) at the end: "
                 + ", ".join(f"{v:.2f}" for v in os.getloadavg())
                 + f" on {os.cpu_count()} CPUs")
    coretype = os.environ.get("OPENBLAS_CORETYPE")
    if coretype is not None:
        lines.append(f"OPENBLAS_CORETYPE={coretype} (from the environment, passed "
                     "to the workers unchanged)")
    return lines
