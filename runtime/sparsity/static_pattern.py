"""A conv/linear layer's nonzero pattern, kept fixed while it trains (issue 15).

With Powerprop alpha > 1 an exactly-zero weight gets exactly zero gradient and
weight decay keeps it zero, so during local training the nonzeros of ``v`` can
only shrink (an entry SGD drives to exactly 0 may stay in the pattern: its
dw/dv is 0, so it stays harmless). A layer therefore computes the CSR
structure once (``StaticPattern``), and per step only gathers the values from
v, computes dw/dv, the weight gradient (kernels/sddmm.py) and the SGD update
at the pattern: O(nnz) instead of O(weight size).

The layer owns the pattern and drops it whenever v may change from outside
training (load_state_dict and freeze/unfreeze via ``WeightedLayer.unfreeze``, a new
weight array, a kernel, alpha or weight_keep change). The optimizer finds a
parameter's layer with ``owner_of`` (the optimizer only sees arrays).

Measured (2026-12-03, machine loaded by other jobs, load 6-9 on 2 cores, so only
paired figures mean much; "before" = the same tree with MAX_DENSITY = 0):
``sparsefedpp bench-sparse --models resnet18 --sparsity 0.99 0.999 --repeats 10``
99 %: 0.29x -> 0.14x torch's dense step, peak RSS 445 -> 363 MB; 99.9 %: 0.28x
-> 0.07x, 443 -> 347 MB; ``--models resnet8 --sparsity 0.99``: 0.62x -> 0.23x.
``tools/profile_step.py --model resnet18 --sparsity 0.999 --steps 6``: step
1246 -> 764 ms; grad weight 306 -> 16, weight prep 137 -> 2.5, SGD 83 -> 2.7
ms. One local round's peak RSS (ResNet-18, momentum 0.9, weights loaded): 99 %
466 -> 381 MB, 99.9 % 456 -> 358 MB (momentum 42.6 -> 0.5 MiB).
"""

from __future__ import annotations

import weakref

import numpy as np

from ..kernels import conv, csr_build, sddmm, sparse_grad

#: entries of a layer's weight gradient: "zero" (all zeros), "dense" (anywhere),
#: or a StaticPattern (zero outside it)
ZERO, DENSE = "zero", "dense"

#: a layer builds a pattern at weight densities below this (both kinds; conv
#: layers run the CSR forward there too, kernels/density.py ``prefer_csr``)
MAX_DENSITY = 0.5


class StaticPattern:
    """CSR structure of a weight's nonzeros (O x rest), built once.

    Attributes: ``indices`` (nnz,) i4, ``indptr`` (O+1,) i8 (SciPy names),
    ``flat`` (nnz,) i8 positions in v.ravel(); ``kernel``/``alpha``: the layer's
    settings it was built under; ``macs``: the forward MACs per input shape,
    counted on first use.
    """

    def __init__(self, indices: np.ndarray, indptr: np.ndarray, shape: tuple,
                 kernel: str, alpha: float):
        self.indices, self.indptr, self.shape = indices, indptr, tuple(shape)
        rest = int(np.prod(self.shape[1:]))
        rows = np.repeat(np.arange(self.shape[0], dtype=np.int64), np.diff(indptr))
        self.flat = rows * rest + indices
        self.rows = rows
        self.kernel, self.alpha = kernel, alpha
        self.macs: dict[tuple, int] = {}

    @property
    def nnz(self) -> int:
        return int(self.indices.size)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def values(self, v: np.ndarray):
        """(w, dw/dv) (nnz,) f4 at the pattern, from the layer's v."""
        return sddmm.pattern_values(v, self.flat, self.alpha)

    def __repr__(self) -> str:
        return f"StaticPattern(shape={self.shape}, nnz={self.nnz})"


def build(v: np.ndarray, counts: np.ndarray, kernel: str, alpha: float):
    """The pattern of v's nonzeros (``counts``: csr_build.weight_row_nnz of v)."""
    _, indices, indptr = csr_build.csr_of_weight(v, 1.0, counts)
    return StaticPattern(indices, indptr, v.shape, kernel, alpha)


def support_after_rebuild(grad: np.ndarray, support) -> str:
    """What a new pattern may assume of the gradient that is there already: ZERO
    if it holds only zeros (O(nnz) when it was confined to an older pattern),
    else DENSE."""
    if support is ZERO:
        return ZERO
    if isinstance(support, StaticPattern):
        nonzero = grad.reshape(-1)[support.flat].any()
    else:
        nonzero = grad.any()
    return DENSE if nonzero else ZERO


# ---- which layer owns a parameter array (for the optimizer) --------------------

_OWNERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def register(layer) -> None:
    """Let ``owner_of(layer.weight)`` find ``layer`` (done when it builds a pattern)."""
    _OWNERS[id(layer.weight)] = layer


def owner_of(param: np.ndarray):
    """The layer whose ``weight`` is exactly this array and that has built a
    pattern, else None (an id reused by another array does not match)."""
    layer = _OWNERS.get(id(param))
    if layer is None or layer.weight is not param:
        return None
    return layer


# ---- weight gradients at the pattern ---------------------------------------------

#: ns per multiply-add (or per element) of each way to the gradient at the pattern,
#: single thread, ResNet-18 shapes, batch 32 (measured under load: ratios, not
#: absolute speed): the kept-element pattern kernel and its regrouping by channel;
#: sparse_grad.conv2d_grad_weight_sparse (every weight) and its dense output passes;
#: the dense conv.conv2d_grad_weight and the decompression before it
NS_KEPT, NS_KEPT_PREP = 15.0, 25.0
NS_SPARSE, NS_SPARSE_OUT = 0.5, 1.5
NS_DENSE, NS_TO_DENSE = 0.06, 1.0
#: below this weight density a dense input's gradient is the dense-input pattern
#: kernel (~30x the dense kernel's time per multiply-add), above it the dense
#: kernel over every weight and a gather at the pattern
DENSE_GRAD_DENSITY = 0.03


def conv_grad(pattern: StaticPattern, act, g: np.ndarray, stride: int, pad: int):
    """dL/dw (nnz,) f4 at the pattern and the MACs executed, from the layer's saved
    input ``act`` (dense, or SparseActivations), by the way expected to be fastest:
    a pattern kernel, or a kernel over every weight followed by a gather."""
    kshape = pattern.shape
    _, c, kh, kw = kshape
    dense_macs = int(g.size) * pattern.size // kshape[0]
    if isinstance(act, np.ndarray):
        if pattern.nnz <= DENSE_GRAD_DENSITY * pattern.size:
            return sddmm.conv_grad_pattern_dense(act, g, pattern.indptr,
                                                 pattern.indices, kshape, stride, pad)
        grad_w = conv.conv2d_grad_weight(act, g, kshape, stride, pad)
        return grad_w.reshape(-1)[pattern.flat], dense_macs
    taps = act.kept * -(-kh // stride) * -(-kw // stride)  # an estimate
    cost = {"kept": NS_KEPT * act.kept * pattern.nnz / max(c, 1)
                    + NS_KEPT_PREP * act.kept,
            "sparse": NS_SPARSE * taps * kshape[0] + NS_SPARSE_OUT * pattern.size,
            "dense": NS_DENSE * dense_macs + NS_TO_DENSE * act.size}
    way = min(cost, key=cost.get)
    if way == "kept":
        return sddmm.conv_grad_pattern_kept(act.indices(), act.values, act.shape, g,
                                            pattern.indptr, pattern.indices, kshape,
                                            stride, pad)
    if way == "sparse":
        grad_w, macs = sparse_grad.conv2d_grad_weight_sparse_count(
            act.indices(), act.values, act.shape, g, kshape, stride, pad)
    else:
        grad_w, macs = conv.conv2d_grad_weight(act.to_dense(), g, kshape, stride,
                                               pad), dense_macs
    return grad_w.reshape(-1)[pattern.flat], macs


#: above this density a Linear's pattern gradient is the dense g.T @ x (BLAS) and a
#: gather: the per-entry products would need two (N, nnz) temporaries
LINEAR_DENSE_DENSITY = 0.05


def linear_grad(pattern: StaticPattern, act, g: np.ndarray):
    """dL/dw (nnz,) f4 at the pattern of a Linear weight and the MACs: sum over n of
    g[n, o] x[n, i] per entry, from the gathered columns (NumPy; a Linear weight
    is small), or the dense product and a gather when the pattern is dense."""
    x = act if isinstance(act, np.ndarray) else act.to_dense()
    n = int(g.shape[0])
    if pattern.nnz > LINEAR_DENSE_DENSITY * pattern.size:
        return (g.T @ x).reshape(-1)[pattern.flat], n * pattern.size
    out = np.einsum("ne,ne->e", g[:, pattern.rows], x[:, pattern.indices],
                    dtype=np.float32)
    return np.ascontiguousarray(out, dtype=np.float32), n * pattern.nnz
