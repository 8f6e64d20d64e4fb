"""Cross-architecture check: the same small training step on x86-64 and on aarch64.

``dump OUT.npz`` builds fixed models from fixed seeds, runs one forward + backward on a
fixed batch and writes what the step computed: logits, the gradient of the input, every
parameter gradient, and the wire bytes (runtime/wire/codec.py) of each model's state.
``compare A.npz B.npz`` checks two dumps, e.g. one from the host and one from the
emulated board (.ci/aarch64.sh): every float array must agree to ``RTOL`` times the
largest magnitude of that array (kernels use a restricted fast-math set and other
SIMD widths, so bit equality is not expected), and the codec bytes must be identical
(the wire format is little-endian and exact). Exit code 0 when they agree, 1 when not.

``stage REPO DEST`` is a helper of .ci/aarch64.sh: it lays the project out as the
package ``sparsefedpp`` under DEST (the package-dir mapping of pyproject.toml) by
copying only files whose bytes changed, so the mtimes that Numba's on-disk cache keys
on stay put from one fresh clone to the next.

Run as ``python -m sparsefedpp.tools.cross_arch MODE ...``; ``stage`` also runs as
``python tools/cross_arch.py stage ...`` before the package is importable.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
from pathlib import Path

RTOL = 1e-5  # of the largest magnitude in each array
SEED = 0
#: the models of the dump: (key, build name, width, pruned fraction, kernel)
CASES = (
    ("cnn", "cnn", 0.25, 0.8, "dense"),
    ("cnn_csr", "cnn", 0.25, 0.8, "csr"),
    ("resnet8", "resnet8", 0.25, 0.5, "dense"),
)
BATCH = (4, 3, 16, 16)
ENCODINGS = ("csr", "csr-f16")
#: pyproject.toml's [tool.setuptools.package-dir]: package folder -> repository folder
PACKAGE_DIRS = {"runtime": "runtime", "trainer": "trainer", "server": "server",
                "tools": "tools"}


# ------------------------------------------------------------------------- dump
def _step(case: tuple) -> dict:
    """One case: build, prune, encode the state, then one train-mode forward/backward."""
    import numpy as np
    from sparsefedpp.runtime.losses import softmax_cross_entropy
    from sparsefedpp.runtime.models import build
    from sparsefedpp.runtime.sparsity import pruning
    from sparsefedpp.runtime.wire import codec

    key, name, width, sparsity, kernel = case
    model = build(name, num_classes=10, width=width, seed=SEED)
    pruning.prune(model, sparsity, scope="layer")
    for layer in pruning.prunable_layers(model).values():
        layer.kernel = kernel
    out = {}
    state = model.state_dict()
    for enc in ENCODINGS:
        blob = codec.encode(codec.Message("model", 0, "x", "fedavg", state), enc)
        out[f"codec/{key}/{enc}"] = np.frombuffer(blob, np.uint8)
    rng = np.random.default_rng(SEED + 1)
    x = rng.standard_normal(BATCH).astype(np.float32)
    labels = rng.integers(0, 10, BATCH[0])
    model.zero_grad()
    logits = model.forward(x, train=True)
    loss, grad_logits = softmax_cross_entropy(logits, labels)
    out[f"{key}/logits"] = logits
    out[f"{key}/loss"] = np.array([loss], np.float64)
    out[f"{key}/grad_input"] = model.backward(grad_logits)
    for pname, g in model.grads().items():
        out[f"{key}/grad/{pname}"] = np.array(g, copy=True)
    for bname, b in model.buffers().items():  # BatchNorm running stats after the step
        if b.dtype.kind == "f":
            out[f"{key}/buffer/{bname}"] = np.array(b, copy=True)
    return out


def dump(path) -> dict:
    """Run every case and write the arrays (plus where they came from) to ``path``."""
    import numba
    import numpy as np

    arrays = {}
    for case in CASES:
        arrays.update(_step(case))
    arrays["meta/machine"] = np.array(platform.machine())
    arrays["meta/versions"] = np.array(f"python {platform.python_version()}, numpy "
                                       f"{np.__version__}, numba {numba.__version__}")
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return arrays


# ---------------------------------------------------------------------- compare
def compare(a_path, b_path, rtol: float = RTOL) -> tuple[list[str], list[str]]:
    """(report lines, failures) of dump ``b_path`` against dump ``a_path``."""
    import numpy as np

    with np.load(a_path) as fa, np.load(b_path) as fb:
        a = {k: fa[k] for k in fa.files}
        b = {k: fb[k] for k in fb.files}
    lines, failures = [], []
    for side, path in (("A", a_path), ("B", b_path)):
        meta = (a if side == "A" else b)
        lines.append(f"{side}: {path}: {meta.get('meta/machine', '?')}, "
                     f"{meta.get('meta/versions', '?')}")
    keys = sorted(k for k in set(a) | set(b) if not k.startswith("meta/"))
    worst = 0.0
    for key in keys:
        if key not in a or key not in b:
            failures.append(f"{key}: only in {'A' if key in a else 'B'}")
            continue
        x, y = a[key], b[key]
        if x.shape != y.shape or x.dtype != y.dtype:
            failures.append(f"{key}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}")
            continue
        if key.startswith("codec/"):
            diff = np.flatnonzero(x != y)
            status = "identical" if diff.size == 0 else (
                f"{diff.size} bytes differ, first at offset {diff[0]}")
            lines.append(f"{key}: {x.size} bytes, {status}")
            if diff.size:
                failures.append(f"{key}: {status}")
            continue
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        if not (np.all(np.isfinite(x64)) and np.all(np.isfinite(y64))):
            failures.append(f"{key}: non-finite values")
            continue
        scale = max(np.abs(x64).max(initial=0.0), np.abs(y64).max(initial=0.0))
        err = np.abs(x64 - y64).max(initial=0.0)
        rel = err / scale if scale > 0 else 0.0
        worst = max(worst, rel)
        lines.append(f"{key}: max |diff| {err:.3g}, relative to max |x| {rel:.3g}")
        if rel > rtol:
            failures.append(f"{key}: max |diff| {err:.3g} is {rel:.3g} of the largest "
                            f"magnitude {scale:.3g} (limit {rtol:g})")
    lines.append(f"worst relative difference: {worst:.3g} (limit {rtol:g}) over "
                 f"{len(keys)} arrays")
    return lines, failures


# ------------------------------------------------------------------------ stage
def _sync_file(src: Path, dst: Path) -> bool:
    if dst.is_file() and not dst.is_symlink() and dst.read_bytes() == src.read_bytes():
        return False
    if dst.is_symlink() or dst.is_dir():
        _remove(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def stage(repo, dest) -> int:
    """Mirror the project's package folders as DEST/sparsefedpp; returns files written."""
    repo, root = Path(repo), Path(dest) / "sparsefedpp"
    wanted = {root / "__init__.py": None}
    for package, folder in PACKAGE_DIRS.items():
        base = repo / folder
        for src in base.rglob("*"):
            rel = src.relative_to(base)
            if src.is_file() and "__pycache__" not in rel.parts and src.suffix != ".pyc":
                wanted[root / package / rel] = src
    written = 0
    root.mkdir(parents=True, exist_ok=True)
    init = root / "__init__.py"
    if not init.is_file():
        init.write_text('"""Staged copy of the project for the emulated run."""\n')
        written += 1
    for dst, src in wanted.items():
        if src is not None:
            written += _sync_file(src, dst)
    for path in sorted(root.rglob("*"), reverse=True):  # deepest first
        if "__pycache__" in path.relative_to(root).parts:
            continue
        if path.is_file() and path not in wanted:
            path.unlink()
            written += 1
        elif path.is_dir() and path != root and not any(path.iterdir()):
            path.rmdir()
    return written


# -------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cross_arch", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("dump", help="write the step's arrays and codec bytes to an .npz")
    p.add_argument("out")
    p = sub.add_parser("compare", help="check dump B against dump A")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--rtol", type=float, default=RTOL)
    p = sub.add_parser("stage", help="mirror REPO's packages as DEST/sparsefedpp")
    p.add_argument("repo")
    p.add_argument("dest")
    args = parser.parse_args(argv)
    if args.mode == "dump":
        arrays = dump(args.out)
        print(f"{args.out}: {len(arrays)} arrays from {platform.machine()}")
        return 0
    if args.mode == "compare":
        lines, failures = compare(args.a, args.b, args.rtol)
        print("\n".join(lines))
        for failure in failures:
            print(f"FAIL {failure}")
        print("cross-arch: " + ("agree" if not failures else f"{len(failures)} differ"))
        return 1 if failures else 0
    written = stage(args.repo, args.dest)
    print(f"staged {args.repo} as {args.dest}/sparsefedpp ({written} files changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
