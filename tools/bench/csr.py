"""Benchmark the CSR kernels (runtime/kernels/csr_conv.py, csr_linear.py) against the
dense ones.

Usage:  NUMBA_NUM_THREADS=2 python tools/bench/csr.py [--set r8|r18|all]
            [--reps 5] [--batch 32] [--densities 1,0.5,0.2,0.1,0.05,0.01,0.001]
            [--low] [--path auto|planes|direct] [--stat median|min]

``--low`` measures the low densities (0.05-0.001) where the conv kernels switch
to their direct path; ``--path`` forces the conv path (default: the kernels'
own choice, csr_direct.use_direct).

For each layer shape and weight density (uniformly random mask), prints the
medians (ms, after one warm-up call) of dense forward, dense grad_input (conv.py
for conv, NumPy matmul for linear), CSR forward, CSR grad_input, and dense/CSR of
forward + grad_input (> 1: CSR is faster). The last line of each shape is the
crossover: the density at which the ratio crosses 1, interpolated in log(density)
between measured points; a summary table of all shapes ends the output. Before
timing, every CSR call's output is checked against its NumPy twin
(``runtime/kernels/reference.py``), so a fast but wrong kernel stops the run.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import numpy as np
from sparsefedpp.tools.bench.timing import time_ms

# conv: (C, H, O, k, stride, pad) on square H x H inputs; linear: (in, out)
R8 = [(16, 32, 16, 3, 1, 1), (16, 32, 32, 3, 2, 1), (32, 16, 32, 3, 1, 1),
      (32, 16, 64, 3, 2, 1), (64, 8, 64, 3, 1, 1), (16, 32, 32, 1, 2, 0),
      (32, 16, 64, 1, 2, 0), (64, 10)]
R18 = [(64, 32, 64, 3, 1, 1), (128, 16, 128, 3, 1, 1), (256, 8, 256, 3, 1, 1),
       (512, 4, 512, 3, 1, 1), (512, 10)]
SETS = {"r8": R8, "r18": R18, "all": R8 + R18}
DENSITIES = "1,0.5,0.2,0.1,0.05,0.01,0.001"
LOW_DENSITIES = "0.05,0.02,0.01,0.005,0.002,0.001"


STAT = {"median": np.median, "min": np.min}


def _sparse_weight(shape, density, rng):
    w = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    w[rng.random(shape) >= density] = 0.0
    return w


def _conv_calls(shape, batch, rng, path="auto"):
    """(dense fwd, dense grad_input, csr fwd maker, csr grad_input maker, weight
    shape, reference maker)."""
    from sparsefedpp.runtime.kernels import conv, csr_conv, reference

    c, h, o, k, s, p = shape
    oh = (h + 2 * p - k) // s + 1
    x = rng.standard_normal((batch, c, h, h)).astype(np.float32)
    g = rng.standard_normal((batch, o, oh, oh)).astype(np.float32)
    kshape = (o, c, k, k)
    w = _sparse_weight(kshape, 1.0, rng)

    def fwd(m):
        return lambda: csr_conv._conv_forward(x, m.data, m.indices, m.indptr, kshape,
                                              s, p, path)

    def gin(m):
        return lambda: csr_conv._conv_grad_input(g, m.data, m.indices, m.indptr,
                                                 kshape, x.shape, s, p, path)

    def ref(m):
        args = (m.data.astype(np.float64), m.indices, m.indptr, kshape)
        return (reference.csr_conv2d_forward(x.astype(np.float64), *args, s, p),
                reference.csr_conv2d_grad_input(g.astype(np.float64), *args, x.shape,
                                                s, p))

    return (lambda: conv.conv2d_forward(x, w, s, p),
            lambda: conv.conv2d_grad_input(g, w, x.shape, s, p), fwd, gin, kshape, ref)


def _linear_calls(shape, batch, rng, path="auto"):
    from sparsefedpp.runtime.kernels import csr_linear, reference

    k, o = shape
    x = rng.standard_normal((batch, k)).astype(np.float32)
    g = rng.standard_normal((batch, o)).astype(np.float32)
    w = _sparse_weight((o, k), 1.0, rng)

    def fwd(m):
        return lambda: csr_linear.csr_linear_forward(x, m.data, m.indices, m.indptr, o)

    def gin(m):
        return lambda: csr_linear.csr_linear_grad_input(g, m.data, m.indices,
                                                        m.indptr, k)

    def ref(m):
        args = (m.data.astype(np.float64), m.indices, m.indptr)
        return (reference.csr_linear_forward(x.astype(np.float64), *args, o),
                reference.csr_linear_grad_input(g.astype(np.float64), *args, k))

    return lambda: x @ w.T, lambda: g @ w, fwd, gin, (o, k), ref


def check_outputs(got: tuple, want: tuple, what: str) -> None:
    """Raise AssertionError unless each float32 output is within 1e-4 of its float64
    reference, relative to the reference's largest magnitude."""
    for out, ref, name in zip(got, want, ("forward", "grad_input"), strict=True):
        scale = max(float(np.abs(ref).max(initial=0.0)), 1.0)
        err = float(np.abs(out - ref).max(initial=0.0))
        if err > 1e-4 * scale:
            raise AssertionError(f"{what}: CSR {name} is off its NumPy reference by "
                                 f"{err:.3g} (scale {scale:.3g})")


def _crossover(densities, ratios) -> str:
    """Density where dense/CSR crosses 1 (log-interpolated), as text."""
    pts = sorted(zip(densities, ratios), reverse=True)  # densest first
    if pts[0][1] >= 1.0:
        return f">= {pts[0][0]:g} (CSR faster at every measured density)"
    for (d_hi, r_hi), (d_lo, r_lo) in itertools.pairwise(pts):
        if r_lo >= 1.0:
            f = np.log(r_hi) / (np.log(r_hi) - np.log(r_lo))
            return f"{np.exp(np.log(d_hi) + f * (np.log(d_lo) - np.log(d_hi))):.3g}"
    return f"< {pts[-1][0]:g} (dense faster at every measured density)"


def bench_shape(shape, batch, reps, densities, rng, stat="median", path="auto"):
    from sparsefedpp.runtime.sparsity.csr import to_csr

    make = _conv_calls if len(shape) == 6 else _linear_calls
    dense_f, dense_g, csr_f, csr_g, wshape, ref = make(shape, batch, rng, path)
    df, dg = time_ms(dense_f, reps, stat=STAT[stat]), time_ms(dense_g, reps, stat=STAT[stat])
    rows = []
    for d in densities:
        m = to_csr(_sparse_weight(wshape, d, rng))
        check_outputs((csr_f(m)(), csr_g(m)()), ref(m), f"{shape} density {d:g}")
        cf, cg = time_ms(csr_f(m), reps, stat=STAT[stat]), time_ms(csr_g(m), reps, stat=STAT[stat])
        rows.append((d, m.nnz, cf, cg, (df + dg) / (cf + cg)))
    return df, dg, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=sorted(SETS), default="all")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--densities", default=DENSITIES)
    ap.add_argument("--low", action="store_true",
                    help=f"densities {LOW_DENSITIES} (overrides --densities)")
    ap.add_argument("--path", choices=["auto", "planes", "direct"], default="auto",
                    help="conv path of the CSR kernels (auto: their own choice)")
    ap.add_argument("--stat", choices=sorted(STAT), default="median",
                    help="min is a noise check on a shared machine")
    args = ap.parse_args(argv)
    import numba

    densities = [float(d) for d in (LOW_DENSITIES if args.low
                                    else args.densities).split(",")]
    rng = np.random.default_rng(0)
    summary = []
    print(f"N={args.batch}, numba threads={numba.get_num_threads()}, {args.stat} of "
          f"{args.reps} (ms), conv path {args.path}; ratio = dense(f+g) / csr(f+g), "
          f"> 1: CSR faster")
    for shape in SETS[args.set]:
        if len(shape) == 6:
            c, h, o, k, s, p = shape
            name = f"conv {c}@{h}x{h}->{o} k{k} s{s} p{p}"
        else:
            name = f"linear {shape[0]}->{shape[1]}"
        df, dg, rows = bench_shape(shape, args.batch, args.reps, densities, rng,
                                   args.stat, args.path)
        print(f"{name}: dense fwd {df:.3f}  grad_in {dg:.3f}")
        print(f"  {'density':>8} {'nnz':>8} {'csr fwd':>9} {'csr g_in':>9} "
              f"{'ratio':>7}")
        for d, nnz, cf, cg, r in rows:
            print(f"  {d:8g} {nnz:8d} {cf:9.3f} {cg:9.3f} {r:7.2f}")
        cross = _crossover(densities, [r[4] for r in rows])
        print(f"  crossover: {cross}")
        sys.stdout.flush()
        summary.append((name, df + dg, [r[4] for r in rows], cross.split(" (")[0]))
    print("\nsummary: dense f+g (ms), then dense/CSR of f+g at each density")
    print(f"{'layer':34} {'dense':>7} " + " ".join(f"{d:>6g}" for d in densities)
          + "  crossover")
    for name, dense, ratios, cross in summary:
        print(f"{name:34} {dense:7.2f} " + " ".join(f"{r:6.2f}" for r in ratios)
              + f"  {cross}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
