"""``sparsefedpp warmup``: fill Numba's kernel cache once, when a device is provisioned.

Compiles (or loads) every kernel signature (kernels otherwise load at their first
call, runtime/kernels/config.py), then runs one small training step of each
model with the dense, CSR and sparse-activation paths, and reports how many
kernel signatures came from the cache and how many were compiled. Run it with
the same ``NUMBA_CACHE_DIR`` as the device agent (for a read-only install,
point it at a writable folder).
"""

from __future__ import annotations

import json
import time

from .kernel_cache import load_all, process_age
from .progress import say


def add_parser(sub) -> None:
    p = sub.add_parser("warmup", help="compile every kernel into Numba's cache "
                       "(provisioning)",
                       description="Compile or load every Numba kernel and run one "
                       "small train step per model; prints the cache location and "
                       "what was compiled. Set NUMBA_CACHE_DIR for read-only installs.")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=run)


def exercise() -> None:
    """One tiny train step per model, dense and sparse (weights 99 %, activations
    10 %), so every code path a round takes has run once."""
    import numpy as np
    from sparsefedpp.runtime import losses, models
    from sparsefedpp.runtime.sparsity import activation_policy, pruning

    rng = np.random.default_rng(0)
    for name, width in (("cnn", 1.0), ("resnet8", 0.25)):
        for sparse in (False, True):
            model = models.build(name, num_classes=10, width=width, alpha=1.25, seed=0)
            if sparse:
                pruning.prune(model, 0.99, "global")
                activation_policy.fixed(model, 0.9)
            x = rng.random((4, 3, 32, 32), dtype=np.float32)
            y = rng.integers(0, 10, 4)
            model.zero_grad()
            _, grad = losses.softmax_cross_entropy(model.forward(x, train=True), y)
            model.backward(grad, input_grad=False)
            model.forward(x, train=False)


def run(args) -> int:
    loaded = load_all()  # every signature, not only those of the steps below
    imported = process_age()
    start = time.perf_counter()
    exercise()
    total = imported + time.perf_counter() - start
    result = {"kernels": loaded.kernels, "signatures": loaded.signatures,
              "loaded_from_cache": loaded.loaded, "compiled": loaded.compiled,
              "cache_dir": loaded.cache_dir, "start_seconds": round(imported, 2),
              "total_seconds": round(total, 2)}
    if args.json:
        print(json.dumps(result))
    say(f"warmup: {loaded.signatures} kernel signatures ({loaded.kernels} kernels): "
        f"{loaded.loaded} loaded from the cache, {loaded.compiled} compiled now; "
        f"{imported:.1f} s to start, {total:.1f} s with one step per model; cache: "
        f"{loaded.cache_dir}", quiet=args.quiet)
    return 0
