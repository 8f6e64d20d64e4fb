"""The gather kernel of every CSR-weight op (conv and linear, forward and grad_input).

Weights arrive as SciPy-named CSR arrays (``runtime/sparsity/csr.py``): ``data`` f4,
``indices`` i4, ``indptr`` i8, a conv weight (O, C, kh, kw) as the O x (C*kh*kw)
matrix with column ``c*kh*kw + i*kw + j``; ``csr_args`` checks them once per call.

How it works
------------
The CSR ops are the direct convolution of ``conv_planes.py`` (read its docstring)
with the dense tap list replaced by the nonzeros. Above a few nonzeros per output
channel (``csr_direct.py`` below that) everything is one gather kernel,
``gather_taps``: for each group g (an output channel, or an input channel and
phase) and a chunk of images,

    acc[t] = sum over the entries e of group g of
             val[e] * src[plane[q]][start + off[q] + t],   q = tap[e]

over one long contiguous range of t, then acc is copied to its (strided) place in
the output. Eight entries per pass (9 loads, 1 store, 8 FMA per vector), then 4,
then 1: 8 ran 10-20 % faster than 4 (single thread, density 0.3, 16@32x32,
64@8x8, 32@16x16 s2, 256@8x8). prange over (image chunk, group): groups write
disjoint outputs, so there are no races, and every output element is summed in
one fixed order whatever the thread count (results are deterministic).

* conv forward (``csr_conv.py``): groups = rows of the CSR (output channels), src
  = phase planes of x (``conv_planes.planes``), entry = nonzero (o, c, i, j) ->
  plane (c, i%s, j%s), offset (i//s)*WQ + j//s, exactly as
  ``conv_planes.forward_taps`` but in CSR order.
* conv grad_input (``csr_conv.py``): the polyphase form of
  ``conv.conv2d_grad_input``, for every stride: a counting sort (O(nnz),
  ``csr_transpose.py``) regroups the nonzeros by (input channel c, phase i%s,
  j%s), i.e. the CSC of the weight split by phase; each group is a stride-1
  correlation of grad_out written to rows s*a + pi - pad, columns s*b + pj - pad
  of dL/dx; a phase with no nonzero (1x1 stride 2: three of four) writes zeros.
  For stride 1 the grid is the tight (H + kh - 1) x (W + kw - 1) of the dense
  flipped-kernel path.
* linear (``csr_linear.py``): the same kernel with images of one pixel: forward
  reads x.T rows (groups = rows of w), grad_input reads grad_out.T rows (groups =
  columns of w).

Work: an empty group costs only the zero writes of its output; nnz = 0 returns
zeros without touching the input. Zeros are skipped, so a NaN/inf in x that meets
only zero weights does not propagate (the dense kernels give 0 * NaN = NaN); a NaN
weight does. MACs executed are not nnz * N * OH * OW: per nonzero and image chunk
the vector loop runs over the chunk's grid (HQ x WQ for forward, HQ =
ceil((H+2p)/s); grad_input: the phase's rows on a grid widened by (k-1)//s) from
the first to the last output pixel, rounded up to 32 floats. Executed / (nnz * N *
OH * OW) at N=32, forward | grad_input: 3x3 s1 p1 at 32x32 1.06 | 1.06, 16x16
1.25 | 1.25, 8x8 1.55 | 1.55, 4x4 2.25 | 2.25; 3x3 s2 p1 32->16 1.13 | 1.25,
16->8 1.27 | 1.55; 1x1 s2 1.00 | 1.00; linear 1.00 (N a multiple of 32). The
extra is the grid's garbage columns, as in the dense conv.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ..errors import ConfigError, DTypeError
from ..sparsity.csr import check_csr
from . import conv_planes
from .config import JIT_PARALLEL_FASTMATH, kernel
from .conv_planes import VL
from .geometry import cdiv

#: the empty bias: no bias added
NO_BIAS = np.zeros(0, dtype=np.float32)


@kernel("void(f4[:, ::1], i8[::1], i4[::1], i8[::1], i8[::1], f4[::1], i8, i8, i8,"
         " i8, i8[:, ::1], f4[::1], b1, f4[:, :, :, ::1])", **JIT_PARALLEL_FASTMATH)
def gather_taps(src, ptr, tap, plane, off, val, size, wq, nb_img, ds, box, bias,
                relu, out):  # pragma: no cover - compiled
    # group g = ch * n_ph + ph, entries ptr[g]:ptr[g+1], entry e is tap tap[e] (a
    # CSR column: plane and offset are per tap, not per nonzero); box[ph] = (a0,
    # a1, b0, b1, dy, dx). acc[t] = sum_e val[e] * src[plane[q], start + off[q] + t]
    # with q = tap[e],
    # t = image*size + a*wq + b - t0, then out[n, ch, a*ds + dy, b*ds + dx] = acc
    # (+ bias[ch] when bias is not empty: the same float32 add as y += b after;
    # then max(., 0) when relu, NaN kept)
    n_img = out.shape[0]
    n_ph = box.shape[0]
    n_grp = ptr.shape[0] - 1
    n_chunk = (n_img + nb_img - 1) // nb_img
    for idx in nb.prange(n_chunk * n_grp):
        ck = idx // n_grp
        grp = idx % n_grp
        ch = grp // n_ph
        bx = box[grp % n_ph]
        a0 = bx[0]
        a1 = bx[1]
        b0 = bx[2]
        b1 = bx[3]
        dy = bx[4]
        dx = bx[5]
        if a1 <= a0 or b1 <= b0:
            continue
        n_lo = ck * nb_img
        n_hi = min(n_img, n_lo + nb_img)
        bv = bias[ch] if bias.shape[0] else np.float32(0.0)
        k0 = ptr[grp]
        k1 = ptr[grp + 1]
        if k0 == k1:  # empty group: zero (or bias) output, no work
            fill = np.float32(0.0) if relu and bv < 0.0 else bv
            for n in range(n_lo, n_hi):
                for a in range(a0, a1):
                    row = out[n, ch, a * ds + dy]
                    for b in range(b0, b1):
                        row[b * ds + dx] = fill
            continue
        t0 = a0 * wq + b0
        start = n_lo * size + t0
        length = ((n_hi - n_lo - 1) * size + (a1 - 1) * wq + b1 - t0 + VL - 1
                  ) // VL * VL
        acc = np.zeros(length, dtype=np.float32)
        k = k0
        while k + 8 <= k1:
            u0 = val[k]
            u1 = val[k + 1]
            u2 = val[k + 2]
            u3 = val[k + 3]
            u4 = val[k + 4]
            u5 = val[k + 5]
            u6 = val[k + 6]
            u7 = val[k + 7]
            x0 = src[plane[tap[k]]][start + off[tap[k]]:]
            x1 = src[plane[tap[k + 1]]][start + off[tap[k + 1]]:]
            x2 = src[plane[tap[k + 2]]][start + off[tap[k + 2]]:]
            x3 = src[plane[tap[k + 3]]][start + off[tap[k + 3]]:]
            x4 = src[plane[tap[k + 4]]][start + off[tap[k + 4]]:]
            x5 = src[plane[tap[k + 5]]][start + off[tap[k + 5]]:]
            x6 = src[plane[tap[k + 6]]][start + off[tap[k + 6]]:]
            x7 = src[plane[tap[k + 7]]][start + off[tap[k + 7]]:]
            for t in range(length):
                acc[t] += ((u0 * x0[t] + u1 * x1[t] + u2 * x2[t] + u3 * x3[t])
                           + (u4 * x4[t] + u5 * x5[t] + u6 * x6[t] + u7 * x7[t]))
            k += 8
        if k + 4 <= k1:
            u0 = val[k]
            u1 = val[k + 1]
            u2 = val[k + 2]
            u3 = val[k + 3]
            x0 = src[plane[tap[k]]][start + off[tap[k]]:]
            x1 = src[plane[tap[k + 1]]][start + off[tap[k + 1]]:]
            x2 = src[plane[tap[k + 2]]][start + off[tap[k + 2]]:]
            x3 = src[plane[tap[k + 3]]][start + off[tap[k + 3]]:]
            for t in range(length):
                acc[t] += u0 * x0[t] + u1 * x1[t] + u2 * x2[t] + u3 * x3[t]
            k += 4
        while k < k1:
            u0 = val[k]
            x0 = src[plane[tap[k]]][start + off[tap[k]]:]
            for t in range(length):
                acc[t] += u0 * x0[t]
            k += 1
        for n in range(n_lo, n_hi):
            for a in range(a0, a1):
                base = (n - n_lo) * size + a * wq - t0
                row = out[n, ch, a * ds + dy]
                if relu:
                    for b in range(b0, b1):
                        v = acc[base + b] + bv
                        row[b * ds + dx] = np.float32(0.0) if v < 0.0 else v
                elif bias.shape[0]:
                    for b in range(b0, b1):
                        row[b * ds + dx] = acc[base + b] + bv
                else:
                    for b in range(b0, b1):
                        row[b * ds + dx] = acc[base + b]


def chunk(n: int, size: int) -> int:
    """Images per vector loop: about conv_planes.chunk(size), evened out over the
    batch (N=32 at 8x8: 16 + 16, not 20 + 12, which left a thread idle)."""
    return cdiv(n, cdiv(n, conv_planes.chunk(size)))


def each(entries: np.ndarray) -> np.ndarray:
    """tap[e] = e: for regrouped entries, whose plane and offset are per entry."""
    return np.arange(entries.shape[0], dtype=np.int32)


def csr_args(data, indices, indptr, shape: tuple, what: str):
    """(data f4, indices i4, indptr i8), C-contiguous and writable, bounds-checked."""
    out = []
    for name, arr, kinds, dtype in (("data", data, "f", np.float32),
                                    ("indices", indices, "iu", np.int32),
                                    ("indptr", indptr, "iu", np.int64)):
        arr = np.asarray(arr)
        if arr.dtype.kind not in kinds:
            raise DTypeError(f"{what}: expected {name} of dtype {np.dtype(dtype)}, "
                             f"got {arr.dtype}; use .astype(np.{np.dtype(dtype)})")
        if (kinds == "iu" and arr.dtype != dtype and arr.size
                and arr.max() > np.iinfo(dtype).max):  # would wrap when narrowed
            raise ConfigError(f"{what}: expected {name} below 2**31, got "
                              f"{arr.max()}")
        out.append(np.require(arr, dtype, ["C", "W"]))
    check_csr(*out, shape, check_sorted=False)
    return out
