"""Benchmark sparse-activation weight gradients (SWAT) against the dense kernel.

Usage:  NUMBA_NUM_THREADS=2 python tools/bench/sparse_grad.py [--reps 15]
            [--batch 32] [--keep 1,0.5,0.1,0.05,0.01,0.001]

For every ResNet-8 conv shape (as ``tools/bench/conv.py --set r8`` without the
3-channel stem) and keep fraction, on x = ReLU(standard normal) (about half zeros;
keep 1.0 keeps every nonzero):

* ``compress``: ``ActivationSparsifier(keep)(x)`` after its refresh call, i.e. the
  per-batch cost with the threshold reused;
* ``sparse gw``: ``conv2d_grad_weight_sparse`` from those kept elements
  (``indices()`` decoded from the bitmap when that encoding was chosen);
* ``dense gw``: ``conv.conv2d_grad_weight(x, ...)`` (the same for all keeps);
* ratio = (compress + sparse gw) / dense gw; kept bytes against 4 * x.size.

Also per shape: the dense forward and the refresh cost (``topk_threshold``).
Every time is the median of ``--reps`` calls after two warm-up calls, in ms.
"""

from __future__ import annotations

import argparse

import numpy as np
from sparsefedpp.tools.bench.timing import time_ms

# (C, H, O, k, stride, pad) at batch N, square H x H inputs
R8 = [(16, 32, 16, 3, 1, 1), (16, 32, 32, 3, 2, 1), (32, 16, 32, 3, 1, 1),
      (32, 16, 64, 3, 2, 1), (64, 8, 64, 3, 1, 1), (16, 32, 32, 1, 2, 0),
      (32, 16, 64, 1, 2, 0)]
KEEPS = (1.0, 0.5, 0.1, 0.05, 0.01, 0.001)


def bench_shape(shape, batch: int, keeps, reps: int, rng) -> list[str]:
    """Table rows (strings) of one conv shape."""
    from sparsefedpp.runtime.kernels import conv, geometry, sparse_grad
    from sparsefedpp.runtime.sparsity.activations import (
        ActivationSparsifier,
        topk_threshold,
    )

    c, h, o, k, s, p = shape
    oh = geometry.out_size(h, k, s, p)
    x = np.maximum(rng.standard_normal((batch, c, h, h)), 0).astype(np.float32)
    w = (rng.standard_normal((o, c, k, k)) * 0.1).astype(np.float32)
    g = rng.standard_normal((batch, o, oh, oh)).astype(np.float32)
    kshape = w.shape
    fwd = time_ms(lambda: conv.conv2d_forward(x, w, s, p), reps, warmup=2)
    dense = time_ms(lambda: conv.conv2d_grad_weight(x, g, kshape, s, p), reps, warmup=2)
    name = f"{c}@{h}->{o} k{k} s{s}"
    refresh = time_ms(lambda: topk_threshold(x, 0.1), reps, warmup=2)
    head = (f"{name:<18} fwd {fwd:6.2f}  dense gw {dense:6.2f}  "
            f"refresh(topk) {refresh:5.2f}")
    rows = [head]
    for keep in keeps:
        sparsifier = ActivationSparsifier(keep)
        act = sparsifier(x)  # the refresh call; the timed calls reuse the threshold
        t_comp = time_ms(lambda sp=sparsifier: sp(x), reps, warmup=2)

        def grad(a=act):
            sparse_grad.conv2d_grad_weight_sparse(a.indices(), a.values, x.shape, g,
                                                  kshape, s, p)

        t_grad = time_ms(grad, reps, warmup=2)
        macs = sparse_grad.conv2d_grad_weight_sparse_macs(act.indices(), x.shape,
                                                          g.shape, kshape, s, p)
        dense_macs = g.size * c * k * k
        ratio = (t_comp + t_grad) / dense
        rows.append(f"  keep {keep:<6} kept {act.kept / x.size:6.4f} "
                    f"{act.encoding:<7} | compress {t_comp:6.3f} sparse gw "
                    f"{t_grad:7.3f} | ratio {ratio:5.2f} | MACs {macs / dense_macs:6.4f}"
                    f" | bytes {act.nbytes:>9} / {act.dense_nbytes} "
                    f"({act.nbytes / act.dense_nbytes:5.3f})")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--keep", default=",".join(str(k) for k in KEEPS),
                        help="comma-separated keep fractions")
    args = parser.parse_args(argv)
    import numba

    keeps = [float(k) for k in args.keep.split(",")]
    rng = np.random.default_rng(0)
    print(f"batch {args.batch}, {numba.get_num_threads()} Numba threads, medians of "
          f"{args.reps} calls, ms; ratio = (compress + sparse gw) / dense gw")
    for shape in R8:
        for row in bench_shape(shape, args.batch, keeps, args.reps, rng):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
