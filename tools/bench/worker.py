"""One ``sparsefedpp bench`` measurement in a fresh process; prints one JSON line.

``python -m sparsefedpp.tools.bench.worker TASK --framework ours|torch ...`` where
TASK is ``speed`` (train-step and inference times), ``rss`` (RSS after imports and
peak RSS of a few train steps), ``first-step`` (import + build + one train step)
or ``sparse`` (our engine at a given weight/activation sparsity).

With ``--serve`` (tasks ``speed`` and ``sparse``) the worker sets up, prints a
``ready`` line, then times what the parent asks for, one JSON request a line on
stdin: ``{"op": "train", "n": 5}`` runs one untimed and 5 timed calls and answers
``{"ok": true, "op": "train", "times_ms": [...]}``; ``{"op": "done"}`` ends with
the final record (peak RSS). So two persistent workers, ours and torch, can take
turns (``bench.timing.take_turns``) and every turn has a partner to divide by.

One framework per process, because torch's OpenMP threads keep spinning after a
torch call and add a floor of milliseconds to every NumPy call made in the same
process, and because peak RSS must be per framework. So this module imports only
the standard library at the top: numpy, the engine and torch are imported inside
the task that needs them, and torch never in an engine worker.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import sys
import time

_T0 = time.perf_counter()  # before any framework import: the first-step clock

#: exit code of a torch worker whose ``import torch`` failed
TORCH_MISSING = 3
#: SGD of every train step (PyTorch's rule on both sides)
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4


def proc_status_mb(key: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process from /proc/self/status in MB (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def ru_maxrss_mb() -> float:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in MB (kB on Linux, bytes on macOS).

    On Linux a child started by fork/vfork + exec inherits its parent's peak here
    (the kernel folds the parent's high-water mark in at exec), so ``VmHWM`` is the
    per-process peak we report; this is kept for reference.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def peak_rss_mb() -> float:
    """Peak RSS of this process image in MB: VmHWM, else ru_maxrss."""
    hwm = proc_status_mb("VmHWM")
    return hwm if hwm is not None else ru_maxrss_mb()


def blas_info() -> dict:
    """OpenBLAS threads and build config of the BLAS loaded by NumPy, if it is one.

    Found like threadpoolctl does: the shared object in /proc/self/maps, then its
    (possibly prefixed) ``openblas_get_num_threads`` / ``openblas_get_config``.
    """
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:
        return {}
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_", ""):
            for suffix in ("64_", ""):
                threads = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
                config = getattr(lib, f"{prefix}openblas_get_config{suffix}", None)
                if threads is None:
                    continue
                info = {"blas_threads": int(threads())}
                if config is not None:
                    config.restype = ctypes.c_char_p
                    info["blas_config"] = config().decode("ascii", "replace").strip()
                return info
    return {}


def make_batch(batch_size: int, seed: int):
    """The same random batch in every worker: x (B, 3, 32, 32) f4, labels (B,) i8."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch_size, 3, 32, 32), dtype=np.float32)
    return x, rng.integers(0, 10, size=batch_size)


# ---- the two frameworks: import, build, one train step, one inference -------------


class Ours:
    """The NumPy + Numba engine."""

    name = "ours"

    def __init__(self, threads: int):
        import numpy  # noqa: F401  (part of the import cost)
        from sparsefedpp import runtime

        self.rt = runtime

    def info(self) -> dict:
        import numba
        import numpy

        return {"numpy": numpy.__version__, "numba": numba.__version__,
                "numba_threads": numba.get_num_threads(), **blas_info()}

    def build(self, model: str, state_path: str | None, seed: int, width: float = 1.0):
        self.model = self.rt.build(model, width=width, seed=seed)
        if state_path:
            import numpy as np

            with np.load(state_path) as state:
                self.model.load_state_dict(dict(state))
        self.opt = self.rt.SGD(self.model.params(), self.model.grads(), LR,
                               momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def batch(self, x, y):
        return x, y

    def train_step(self, x, y) -> None:
        self.model.zero_grad()
        logits = self.model.forward(x, train=True)
        _, grad = self.rt.softmax_cross_entropy(logits, y)
        self.model.backward(grad, input_grad=False)
        self.opt.step()

    def infer(self, x):
        return self.model.forward(x, train=False)

    def logits(self, x):
        return self.infer(x)


class Torch:
    """PyTorch on the CPU with the same architecture (``bench/torch_models.py``)."""

    name = "torch"

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(threads)
        from . import torch_models as bench_torch

        self.torch, self.bench_torch = torch, bench_torch
        self.loss = torch.nn.functional.cross_entropy

    def info(self) -> dict:
        import numpy

        return {"torch": self.torch.__version__, "numpy": numpy.__version__,
                "torch_threads": self.torch.get_num_threads(),
                "torch_interop_threads": self.torch.get_num_interop_threads()}

    def build(self, model: str, state_path: str | None, seed: int, width: float = 1.0):
        if state_path:
            import numpy as np

            with np.load(state_path) as state:
                self.model = self.bench_torch.from_state_dict(model, dict(state),
                                                              width=width)
        else:
            self.torch.manual_seed(seed)
            self.model = self.bench_torch.build(model, width=width)
        self.opt = self.torch.optim.SGD(self.model.parameters(), lr=LR,
                                        momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def batch(self, x, y):
        return self.torch.from_numpy(x), self.torch.from_numpy(y)

    def train_step(self, x, y) -> None:
        self.model.train()
        self.opt.zero_grad()
        loss = self.loss(self.model(x), y)
        loss.backward()
        self.opt.step()

    def infer(self, x):
        self.model.eval()
        with self.torch.inference_mode():
            return self.model(x)

    def logits(self, x):
        return self.infer(x).numpy()


def load_framework(name: str, threads: int):
    """Import the framework (timed by the caller); torch missing exits TORCH_MISSING."""
    if name == "ours":
        return Ours(threads)
    try:
        return Torch(threads)
    except (ImportError, OSError) as err:  # OSError: a broken shared library
        emit({"ok": False, "unavailable": f"torch is not importable: {err}"})
        sys.exit(TORCH_MISSING)


# ---- tasks ------------------------------------------------------------------------


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - start) * 1e3


def task_speed(fw, args) -> dict:
    """Warm-up, then ``repeats`` timed train steps and inferences (ms each)."""
    import numpy as np

    fw.build(args.model, args.state, args.seed)
    x, y = fw.batch(*make_batch(args.batch_size, args.seed))
    out = {}
    # eval logits before any update: the parent checks both sides agree
    logits = np.asarray(fw.logits(x), dtype=np.float32)
    if args.logits_out:
        np.save(args.logits_out, logits)
    if args.logits_ref and os.path.exists(args.logits_ref):
        out["max_abs_logit_diff"] = float(np.abs(logits - np.load(args.logits_ref)).max())
    for _ in range(args.warmup):
        fw.train_step(x, y)
    out["train_ms"] = [timed(fw.train_step, x, y) for _ in range(args.repeats)]
    for _ in range(args.warmup):
        fw.infer(x)
    out["infer_ms"] = [timed(fw.infer, x) for _ in range(args.repeats)]
    return out


def task_rss(fw, args) -> dict:
    """Peak RSS of building the model and ``rss_steps`` train steps."""
    fw.build(args.model, args.state, args.seed)
    x, y = fw.batch(*make_batch(args.batch_size, args.seed))
    for _ in range(args.rss_steps):
        fw.train_step(x, y)
    return {"peak_rss_mb": peak_rss_mb(), "ru_maxrss_mb": ru_maxrss_mb(),
            "rss_steps": args.rss_steps}


def task_first_step(fw, args) -> dict:
    """Build the model and do one train step; times from before the first import."""
    t_import = time.perf_counter()
    fw.build(args.model, None, args.seed)
    x, y = fw.batch(*make_batch(args.batch_size, args.seed))
    t_build = time.perf_counter()
    fw.train_step(x, y)
    end = time.perf_counter()
    return {"import_s": t_import - _T0, "build_s": t_build - t_import,
            "step_s": end - t_build, "in_process_s": end - _T0}


def task_sparse(fw, args) -> dict:
    """Our engine at weight/activation sparsity S (``bench-sparse``).

    Every conv/linear layer is pruned to S on its own (uniform sparsity, so no layer
    vanishes) with Powerprop alpha (default 1.25; its zeros stay zero through the
    SGD steps) and keeps the top 1 - S of its input activations for backward.
    Times train steps and inference (kernels picked automatically, then forced
    dense), and reads the cost report of one step and the peak RSS.
    """
    from sparsefedpp.runtime import accounting
    from sparsefedpp.runtime.sparsity import pruning

    s = args.sparsity
    x, y = prepare_sparse(fw, args)
    for _ in range(args.warmup):
        fw.train_step(x, y)
    out = {"train_ms": [timed(fw.train_step, x, y) for _ in range(args.repeats)]}
    totals = accounting.cost_report(fw.model).totals
    out["cost"] = totals
    out["weight_sparsity"] = pruning.global_sparsity(fw.model)
    for _ in range(args.warmup):
        fw.infer(x)
    out["infer_ms"] = [timed(fw.infer, x) for _ in range(args.repeats)]
    layers = pruning.prunable_layers(fw.model).values()
    for layer in layers:
        layer.kernel = "dense"
    for _ in range(args.warmup):
        fw.infer(x)
    out["infer_dense_ms"] = [timed(fw.infer, x) for _ in range(args.repeats)]
    out["peak_rss_mb"] = peak_rss_mb()
    out["sparsity"] = s
    out["alpha"] = args.alpha
    return out


def setup_speed(fw, args) -> tuple[dict, dict]:
    """``--serve speed``: the model and batch, the logits check and the warm-up;
    returns the timed operations and the ready record."""
    import numpy as np

    fw.build(args.model, args.state, args.seed, args.width)
    x, y = fw.batch(*make_batch(args.batch_size, args.seed))
    ready = {}
    logits = np.asarray(fw.logits(x), dtype=np.float32)
    if args.logits_out:
        np.save(args.logits_out, logits)
    if args.logits_ref and os.path.exists(args.logits_ref):
        ready["max_abs_logit_diff"] = float(np.abs(logits - np.load(args.logits_ref))
                                            .max())
    for _ in range(args.warmup):
        fw.train_step(x, y)
    for _ in range(args.warmup):
        fw.infer(x)
    return {"train": lambda: fw.train_step(x, y), "infer": lambda: fw.infer(x)}, ready


def prepare_sparse(fw, args):
    """Our model at sparsity S as ``task_sparse`` describes; returns the batch."""
    rt = fw.rt
    from sparsefedpp.runtime.sparsity import activation_policy, pruning

    s = args.sparsity
    fw.model = rt.build(args.model, alpha=args.alpha, width=args.width,
                        seed=args.seed)
    fw.opt = rt.SGD(fw.model.params(), fw.model.grads(), LR, momentum=MOMENTUM,
                    weight_decay=WEIGHT_DECAY)
    if s > 0:
        pruning.prune(fw.model, s, scope="layer")
        activation_policy.fixed(fw.model, s, refresh_every=10, first_layer_dense=False,
                                weights=False)
    return make_batch(args.batch_size, args.seed)


def setup_sparse(fw, args) -> tuple[dict, dict]:
    """``--serve sparse``: train, inference with the automatic kernels and with the
    dense ones (``infer_dense`` switches every conv/linear to its dense kernel for
    the call); the ready record holds the cost report of one train step."""
    from sparsefedpp.runtime import accounting
    from sparsefedpp.runtime.sparsity import pruning

    x, y = prepare_sparse(fw, args)
    for _ in range(max(1, args.warmup)):
        fw.train_step(x, y)
    ready = {"cost": accounting.cost_report(fw.model).totals,
             "weight_sparsity": pruning.global_sparsity(fw.model),
             "sparsity": args.sparsity, "alpha": args.alpha}
    layers = list(pruning.prunable_layers(fw.model).values())

    def infer_dense():
        kernels = [layer.kernel for layer in layers]
        for layer in layers:
            layer.kernel = "dense"
        try:
            fw.infer(x)
        finally:
            for layer, kernel in zip(layers, kernels, strict=True):
                layer.kernel = kernel

    for _ in range(args.warmup):
        fw.infer(x)
        infer_dense()
    return {"train": lambda: fw.train_step(x, y), "infer": lambda: fw.infer(x),
            "infer_dense": infer_dense}, ready


SETUPS = {"speed": setup_speed, "sparse": setup_sparse}


def serve(fw, args, requests=None) -> dict:
    """Set up, print the ready line, answer timing requests until ``done``."""
    if args.task not in SETUPS:
        raise SystemExit(f"--serve: expected task {' or '.join(SETUPS)}, got "
                         f"{args.task!r}")
    ops, ready = SETUPS[args.task](fw, args)
    emit({"ok": True, "ready": True, "ops": sorted(ops), **ready})
    for line in requests if requests is not None else sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        op = request.get("op")
        if op == "done":
            break
        if op not in ops:
            emit({"ok": False, "error": f"unknown op {op!r}; expected one of "
                  f"{', '.join(sorted(ops))} or done"})
            continue
        fn = ops[op]
        fn()  # untimed: the first call after the other worker's turn
        emit({"ok": True, "op": op,
              "times_ms": [timed(fn) for _ in range(int(request.get("n", 1)))]})
    return {"peak_rss_mb": peak_rss_mb(), **ready}


TASKS = {"speed": task_speed, "rss": task_rss, "first-step": task_first_step,
         "sparse": task_sparse}


def emit(record: dict) -> None:
    """The result: one JSON line on stdout (the parent reads the last such line)."""
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sparsefedpp.tools.bench.worker")
    p.add_argument("task", choices=tuple(TASKS))
    p.add_argument("--framework", required=True, choices=("ours", "torch"))
    p.add_argument("--model", default="resnet8")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--rss-steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier")
    p.add_argument("--state", default=None, help="npz of our model's state_dict")
    p.add_argument("--sparsity", type=float, default=0.0, help="task sparse: S")
    p.add_argument("--alpha", type=float, default=1.25, help="task sparse: Powerprop")
    p.add_argument("--logits-out", default=None, help="save eval logits (.npy)")
    p.add_argument("--logits-ref", default=None, help="compare eval logits (.npy)")
    p.add_argument("--serve", action="store_true",
                   help="speed/sparse: answer timing requests on stdin (see above)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    fw = load_framework(args.framework, args.threads)
    rss_after_import = proc_status_mb("VmRSS")
    import_s = time.perf_counter() - _T0
    result = serve(fw, args) if args.serve else TASKS[args.task](fw, args)
    emit({"ok": True, "task": args.task, "framework": args.framework,
          "model": args.model, "batch_size": args.batch_size,
          "rss_after_import_mb": rss_after_import, "import_s": import_s,
          **fw.info(), **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
