"""What a train step really costs: executed multiply-accumulates, bytes held for
backward and weight bytes (dense vs CSR), per layer and per model.

Every layer keeps a ``cost`` (LayerCost) that its forward/backward overwrite with
the figures of the last call; ``cost_report(model)`` gathers them after a step.
"Dense" columns are what the dense engine would do for the same shapes, so the
ratios show what sparsity saved. MACs count what the kernels execute (a CSR conv
multiplies each nonzero weight with every output position, padding included).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

_INT32, _F32, _INT64 = 4, 4, 8


@dataclass
class LayerCost:
    """Figures of a layer's last forward/backward (zeros until it ran)."""

    macs_forward: int = 0
    macs_grad_input: int = 0
    macs_grad_weight: int = 0
    dense_macs_forward: int = 0
    dense_macs_grad_input: int = 0
    dense_macs_grad_weight: int = 0
    held_bytes: int = 0          # activation bytes kept from forward for backward
    dense_held_bytes: int = 0    # what a dense backward would keep
    kernel: str = ""             # "dense" or "csr" (conv/linear forward and grad_input)
    act_keep: float = 1.0        # fraction of input activations kept for backward


def csr_nbytes(nnz: int, rows: int) -> int:
    """Bytes of a CSR matrix: float32 values, int32 column indices, int64 row pointers."""
    return nnz * (_F32 + _INT32) + (rows + 1) * _INT64


def nbytes_of(obj) -> int:
    """Bytes of the arrays in a (nested) cache: tuples, arrays, objects with .nbytes."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return 0
    if isinstance(obj, (tuple, list)):
        return sum(nbytes_of(o) for o in obj)
    return int(getattr(obj, "nbytes", 0))


@dataclass
class LayerRow:
    name: str
    kind: str
    cost: LayerCost
    weight_size: int = 0
    weight_nnz: int = 0
    weight_dense_bytes: int = 0
    weight_csr_bytes: int = 0


@dataclass
class CostReport:
    """Per-layer rows and model totals of one train step (see cost_report)."""

    rows: list[LayerRow] = field(default_factory=list)

    def total(self, attr: str) -> int:
        """Sum of a LayerCost field or a LayerRow field over all layers."""
        return sum(getattr(r.cost, attr) if hasattr(r.cost, attr) else getattr(r, attr)
                   for r in self.rows)

    @property
    def totals(self) -> dict:
        keys = ("macs_forward", "macs_grad_input", "macs_grad_weight",
                "dense_macs_forward", "dense_macs_grad_input", "dense_macs_grad_weight",
                "held_bytes", "dense_held_bytes", "weight_size", "weight_nnz",
                "weight_dense_bytes", "weight_csr_bytes")
        out = {k: self.total(k) for k in keys}
        weighted = [r for r in self.rows if r.weight_size]
        out["conv_linear_held_bytes"] = sum(r.cost.held_bytes for r in weighted)
        out["conv_linear_dense_held_bytes"] = sum(r.cost.dense_held_bytes for r in weighted)
        return out

    def to_dict(self) -> dict:
        """JSON-ready: {"layers": [...], "totals": {...}}."""
        layers = []
        for r in self.rows:
            d = {"name": r.name, "kind": r.kind, **asdict(r.cost)}
            d.update(weight_size=r.weight_size, weight_nnz=r.weight_nnz,
                     weight_dense_bytes=r.weight_dense_bytes,
                     weight_csr_bytes=r.weight_csr_bytes)
            layers.append(d)
        return {"layers": layers, "totals": self.totals}

    def format(self) -> str:
        """A fixed-width table: one line per layer, then the totals and ratios."""
        def ratio(a, b):
            return f"{a / b:6.3f}x" if b else "      -"

        head = (f"{'layer':<24}{'kind':<12}{'kernel':<7}{'w nnz':>9}{'act keep':>9}"
                f"{'MACs fwd':>12}{'MACs gin':>12}{'MACs gw':>12}{'held KB':>10}"
                f"{'w KB dense':>11}{'w KB CSR':>9}")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            c = r.cost
            if not (r.weight_size or c.held_bytes or c.dense_held_bytes):
                continue
            nnz = f"{r.weight_nnz:,}" if r.weight_size else ""
            keep = f"{c.act_keep:.3f}" if r.weight_size else ""
            lines.append(
                f"{r.name:<24.24}{r.kind:<12.12}{c.kernel:<7}{nnz:>9}{keep:>9}"
                f"{c.macs_forward:>12,}{c.macs_grad_input:>12,}{c.macs_grad_weight:>12,}"
                f"{c.held_bytes / 1024:>10.1f}"
                f"{r.weight_dense_bytes / 1024 if r.weight_size else 0:>11.1f}"
                f"{r.weight_csr_bytes / 1024 if r.weight_size else 0:>9.1f}")
        t = self.totals
        lines += [
            "-" * len(head),
            (f"weights: {t['weight_nnz']:,} of {t['weight_size']:,} nonzero; "
            f"{t['weight_dense_bytes'] / 1024:.1f} KB dense, "
            f"{t['weight_csr_bytes'] / 1024:.1f} KB CSR "
            f"({ratio(t['weight_csr_bytes'], t['weight_dense_bytes']).strip()})"),
            ("MACs vs dense: forward "
            f"{ratio(t['macs_forward'], t['dense_macs_forward']).strip()}, grad_input "
            f"{ratio(t['macs_grad_input'], t['dense_macs_grad_input']).strip()}, "
            "grad_weight "
            f"{ratio(t['macs_grad_weight'], t['dense_macs_grad_weight']).strip()}"),
            ("held for backward: conv/linear inputs "
            f"{t['conv_linear_held_bytes'] / 2**20:.2f} MB vs "
            f"{t['conv_linear_dense_held_bytes'] / 2**20:.2f} MB dense "
            f"({ratio(t['conv_linear_held_bytes'], t['conv_linear_dense_held_bytes']).strip()});"
            f" all layers {t['held_bytes'] / 2**20:.2f} MB vs "
            f"{t['dense_held_bytes'] / 2**20:.2f} MB "
            f"({ratio(t['held_bytes'], t['dense_held_bytes']).strip()})"),
        ]
        return "\n".join(lines)


def cost_report(model) -> CostReport:
    """Collect every leaf layer's last-step cost and its weight storage."""
    report = CostReport()
    for name, layer in model.named_layers().items():
        if not hasattr(layer, "cost"):
            continue
        if layer.children() and not ("_cost" in layer.__dict__
                                     and layer.cost.held_bytes):
            continue  # a container holds nothing itself, unless it recomputes
        row = LayerRow(name=name, kind=type(layer).__name__, cost=layer.cost)
        weight = getattr(layer, "weight", None)
        if weight is not None and hasattr(layer, "effective_weight"):
            rows = weight.shape[0]
            nnz = int(np.count_nonzero(weight))
            row.weight_size = int(weight.size)
            row.weight_nnz = nnz
            row.weight_dense_bytes = int(weight.size) * _F32
            row.weight_csr_bytes = csr_nbytes(nnz, rows)
        report.rows.append(row)
    return report
