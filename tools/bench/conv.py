"""Benchmark the conv kernels (runtime/kernels/conv.py) against PyTorch CPU.

Usage:  python tools/bench/conv.py [--set r8|r18|all] [--reps 20] [--batch 32]
                                    [--threads 2] [--clock wall|cpu] [--no-torch]

Prints one row per layer shape: our forward, our forward+backward (forward,
grad_weight, grad_input), the same for torch, and ours/torch of fwd+bwd. Every
time is the median of ``--reps`` calls after two warm-up calls.

``--clock cpu --threads 1`` times the process's CPU time instead and takes the
minimum: on a loaded machine (other jobs on both cores) wall-clock medians of
either framework move 2x from run to run, the CPU time of one thread far less.

Torch runs in a separate subprocess (``--torch-worker``): its OpenMP threads spin
after each call and would slow the NumPy/Numba phase down if they shared a
process. Without torch installed, only our columns are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from sparsefedpp.tools.bench.timing import time_ms

# (C, H, O, k, stride, pad) at batch N, square H x H inputs
R8 = [(3, 32, 16, 3, 1, 1), (16, 32, 16, 3, 1, 1), (16, 32, 32, 3, 2, 1),
      (32, 16, 32, 3, 1, 1), (32, 16, 64, 3, 2, 1), (64, 8, 64, 3, 1, 1),
      (16, 32, 32, 1, 2, 0), (32, 16, 64, 1, 2, 0)]
R18 = [(64, 32, 64, 3, 1, 1), (64, 32, 128, 3, 2, 1), (128, 16, 128, 3, 1, 1),
       (128, 16, 256, 3, 2, 1), (256, 8, 256, 3, 1, 1), (256, 8, 512, 3, 2, 1),
       (512, 4, 512, 3, 1, 1)]
SETS = {"r8": R8, "r18": R18, "all": R8 + R18}


def _inputs(shape, batch, rng):
    c, h, o, k, s, p = shape
    oh = (h + 2 * p - k) // s + 1
    x = rng.standard_normal((batch, c, h, h)).astype(np.float32)
    w = (rng.standard_normal((o, c, k, k)) * 0.1).astype(np.float32)
    g = rng.standard_normal((batch, o, oh, oh)).astype(np.float32)
    return x, w, g


def cpu_ms(fn, reps, *, warmup=2):
    """Minimum process CPU time of ``reps`` calls, in ms (one thread: the time the
    call ran, whatever else the machine runs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return min(times) * 1e3


def bench_ours(shapes, batch, reps, timer=time_ms):
    from sparsefedpp.runtime.kernels import conv

    rng = np.random.default_rng(0)
    out = []
    for shape in shapes:
        _, _, _, _, s, p = shape
        x, w, g = _inputs(shape, batch, rng)

        def fwd(x=x, w=w, s=s, p=p):
            conv.conv2d_forward(x, w, s, p)

        def fwd_bwd(x=x, w=w, g=g, s=s, p=p):
            conv.conv2d_forward(x, w, s, p)
            conv.conv2d_grad_weight(x, g, w.shape, s, p)
            conv.conv2d_grad_input(g, w, x.shape, s, p)

        out.append((timer(fwd, reps, warmup=2), timer(fwd_bwd, reps, warmup=2)))
    return out


def bench_torch(shapes, batch, reps, threads, timer=time_ms):
    import torch

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    out = []
    for shape in shapes:
        _, _, _, _, s, p = shape
        x, w, g = (torch.from_numpy(a) for a in _inputs(shape, batch, rng))
        x.requires_grad_(True)
        w.requires_grad_(True)

        def fwd(x=x, w=w, s=s, p=p):
            with torch.no_grad():
                torch.nn.functional.conv2d(x, w, stride=s, padding=p)

        def fwd_bwd(x=x, w=w, g=g, s=s, p=p):
            y = torch.nn.functional.conv2d(x, w, stride=s, padding=p)
            y.backward(g)

        out.append((timer(fwd, reps, warmup=2), timer(fwd_bwd, reps, warmup=2)))
    return out


def _torch_in_subprocess(args):
    try:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            return None
    except (ImportError, ValueError):
        return None
    cmd = [sys.executable, os.path.abspath(__file__), "--torch-worker", "--set",
           args.set, "--reps", str(args.reps), "--batch", str(args.batch),
           "--threads", str(args.threads), "--clock", args.clock]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        print(f"torch worker failed:\n{res.stderr}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=sorted(SETS), default="all")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: median wall time; cpu: minimum process CPU time")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shapes = SETS[args.set]
    timer = cpu_ms if args.clock == "cpu" else time_ms
    if args.torch_worker:
        print(json.dumps(bench_torch(shapes, args.batch, args.reps, args.threads,
                                     timer)))
        return 0
    # torch first, in its own process: nothing of torch ever runs in this one
    theirs = None if args.no_torch else _torch_in_subprocess(args)
    if args.threads:
        import numba

        numba.set_num_threads(args.threads)
    ours = bench_ours(shapes, args.batch, args.reps, timer)
    head = f"{'C':>4} {'H':>3} {'O':>4} {'k':>2} {'s':>2} | {'ours fwd':>9} " \
           f"{'ours f+b':>9}"
    if theirs:
        head += f" | {'torch fwd':>9} {'torch f+b':>9} | {'f+b ratio':>9}"
    what = "minimum CPU time" if args.clock == "cpu" else "median wall time"
    print(f"N={args.batch}, {args.threads} threads, {what} of {args.reps} calls (ms)")
    print(head)
    tot = [0.0, 0.0, 0.0, 0.0]
    for i, shape in enumerate(shapes):
        c, h, o, k, s, _ = shape
        row = f"{c:4d} {h:3d} {o:4d} {k:2d} {s:2d} | {ours[i][0]:9.2f} {ours[i][1]:9.2f}"
        tot[0] += ours[i][0]
        tot[1] += ours[i][1]
        if theirs:
            tf, tfb = theirs[i]
            tot[2] += tf
            tot[3] += tfb
            row += f" | {tf:9.2f} {tfb:9.2f} | {ours[i][1] / tfb:9.2f}"
        print(row)
    row = f"{'sum':>18} | {tot[0]:9.2f} {tot[1]:9.2f}"
    if theirs:
        row += f" | {tot[2]:9.2f} {tot[3]:9.2f} | {tot[1] / tot[3]:9.2f}"
    print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
