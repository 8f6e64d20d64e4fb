"""The ``sparsefedpp`` command line: wiring only; each command lives in cmd_<name>.py."""

from __future__ import annotations

import argparse
import importlib
import sys

from sparsefedpp.runtime.errors import SparseFedError

COMMANDS = ("train", "evaluate", "simulate", "report", "bench", "bench-sparse", "cost",
            "export", "predict", "partition", "serve", "client", "bench-mqtt", "warmup",
            "bench-memory", "sweep", "bench-link")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsefedpp",
        description="Sparse federated training on small devices (NumPy + Numba).")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = "cmd_" + name.replace("-", "_")
        importlib.import_module(f"sparsefedpp.tools.{module}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except SparseFedError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
