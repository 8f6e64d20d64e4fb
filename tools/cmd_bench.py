"""``sparsefedpp bench``: placeholder until the benchmark lands."""


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks against PyTorch")
    p.set_defaults(run=lambda args: 0)
