"""``sparsefedpp sweep``: methods x sparsities x seeds of ``simulate``, resumable.

Example (the grid of docs/results.md; run the same command again after an
interruption and it goes on where it stopped)::

    sparsefedpp sweep --methods sparsefedpp zerofl topk fedavg \\
        --sparsities 0.9 0.95 0.99 0.999 --seeds 0 1 2 --out runs/sweep -- \\
        --model resnet8 --data cifar10 --rounds 100 --clients 100 --per-round 10

Everything after ``--`` goes to every point's ``simulate`` (not --method,
--sparsity, --seed, --out, --resume, --metrics: the sweep sets those).
"""

from __future__ import annotations

from pathlib import Path

from .progress import say
from .sweep import check_common, grid, run_sweep


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="a resumable grid of simulate runs",
                       description="Run simulate for every method x sparsity x seed "
                       "into its own folder; finished points are skipped, "
                       "unfinished ones resumed; prints the time left and writes "
                       "OUT/summary.jsonl.")
    p.add_argument("--methods", nargs="+", required=True,
                   help="sparsefedpp, zerofl, topk, fedavg (dense: one point per seed)")
    p.add_argument("--sparsities", nargs="*", type=float, default=[],
                   help="target sparsities of the sparse methods")
    p.add_argument("--seeds", nargs="+", type=int, default=[0],
                   help="seeds (default 0)")
    p.add_argument("--out", required=True, help="folder of the point folders")
    p.add_argument("--dry-run", action="store_true",
                   help="list the points and their state, run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("common", nargs="*", metavar="-- SIMULATE_FLAGS",
                   help="flags for every point's simulate, after --")
    p.set_defaults(run=run)


def _rounds(common: list[str]) -> int:
    """The rounds of the points (and a check of the common flags before hours of
    running): simulate's own parser and config."""
    from .cli import build_parser
    from .cmd_simulate import make_config

    args = build_parser().parse_args(["simulate", *common])
    return make_config(args).rounds


def run(args) -> int:
    common = check_common(args.common)
    points = grid(args.methods, args.sparsities, args.seeds)
    rounds = _rounds(common)
    if args.dry_run:
        from .sweep import point_state

        for p in points:
            state = point_state(Path(args.out) / p.name)
            done = "finished" if state["end"] else f"{state['rounds_done']}/{rounds}"
            say(f"{p.name}: {done}", quiet=False)
        return 0
    return run_sweep(points, common, Path(args.out), rounds=rounds, quiet=args.quiet)
