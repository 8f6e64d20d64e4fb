"""``sparsefedpp export``: write a checkpoint as an ONNX inference graph."""

from __future__ import annotations

import json
from pathlib import Path

from sparsefedpp.runtime import checkpoint
from sparsefedpp.runtime.errors import ConfigError

from .flags import add_common, onnx_exporter
from .metrics import MetricsWriter
from .progress import say

DEFAULT_OPSET = 17


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="write a checkpoint as an ONNX inference graph",
        description="Export the eval-mode model (Powerprop effective weights, running "
        "BatchNorm statistics) as ONNX: input 'input' float32 NCHW, output 'logits', "
        "dynamic batch; checked with onnx.checker.")
    p.add_argument("checkpoint", help="a model.npz written by train or simulate")
    p.add_argument("--onnx", required=True, metavar="OUT.onnx", help="output file")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--sparse-initializers", action="store_true",
                   help="store sparse conv/linear weights as ONNX sparse initializers "
                   "(smaller file; onnxruntime densifies them when it loads)")
    p.add_argument("--fold-bn", action="store_true",
                   help="fold each BatchNorm into the convolution before it")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_common(p)
    p.set_defaults(run=run)


def _onnxruntime_refuses(blob: bytes) -> str | None:
    """Why onnxruntime cannot load ``blob`` (None if it can, or if it is missing)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    try:
        ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - any load failure means: fall back
        return f"{type(err).__name__}: {str(err)[:300]}"
    return None


def export(model, meta: dict, out, *, opset: int = DEFAULT_OPSET,
           sparse_initializers: bool = False, fold_bn: bool = False) -> dict:
    """Build, check and write the ONNX file; returns a summary with "notes".

    Sparse initializers fall back to dense per tensor where they would not be
    smaller, and for the whole file if onnxruntime refuses to load the sparse one.
    """
    onnx_export = onnx_exporter()
    kwargs = {"opset": opset, "fold_bn": fold_bn}
    proto, report = onnx_export.build_onnx(
        model, meta, sparse_initializers=sparse_initializers, **kwargs)
    notes = []
    if report.dense_fallback:
        notes.append(f"{len(report.dense_fallback)} weight(s) written dense because a "
                     "sparse initializer would be larger: "
                     + ", ".join(f"{k} ({v})" for k, v in
                                 list(report.dense_fallback.items())[:4])
                     + (" ..." if len(report.dense_fallback) > 4 else ""))
    blob = proto.SerializeToString()
    if report.sparse:
        refused = _onnxruntime_refuses(blob)
        if refused is not None:
            notes.append("onnxruntime does not load the sparse initializers "
                         f"({refused}); wrote every weight dense instead")
            proto, report = onnx_export.build_onnx(model, meta, **kwargs)
            blob = proto.SerializeToString()
        else:
            notes.append(f"{len(report.sparse)} sparse initializer(s): they shrink the "
                         "file; onnxruntime densifies them at load, so inference "
                         "runs dense")
    onnx_export.check(proto)
    out = Path(out)
    checkpoint.write_atomic(out, lambda f: f.write(blob))
    return {"onnx": str(out), "bytes": len(blob), "opset": opset,
            "nodes": len(proto.graph.node), "sparse_initializers": len(report.sparse),
            "dense_initializers": len(proto.graph.initializer),
            "folded_bn": len(report.folded), "notes": notes}


def run(args) -> int:
    out = Path(args.onnx)
    if out.is_dir():
        raise ConfigError(f"export --onnx: expected a file path, got the folder {out}")
    model, meta = checkpoint.load(args.checkpoint)
    result = export(model, meta, out, opset=args.opset,
                    sparse_initializers=args.sparse_initializers, fold_bn=args.fold_bn)
    with MetricsWriter(args.metrics) as metrics:
        metrics.write("export", checkpoint=args.checkpoint, **result)
    for note in result["notes"]:
        say(f"note: {note}", quiet=args.quiet)
    if args.json:
        print(json.dumps(result))
    else:
        say(f"wrote {out} ({result['bytes'] / 1e6:.3f} MB, opset {args.opset}, "
            f"{result['nodes']} nodes, {result['sparse_initializers']} sparse "
            f"initializers)", quiet=args.quiet)
    return 0
