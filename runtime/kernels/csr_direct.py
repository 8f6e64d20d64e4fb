"""The direct path of the CSR conv kernels, for weights of very low density.

Below a few nonzeros per output channel the phase-plane copy of x (or of
grad_out) costs more than the MACs, so ``forward`` / ``grad_input`` here
skip it: prange over the (image, output channel) planes of y, or the (image, input
channel) planes of dL/dx (the nonzeros grouped by input channel with
``csr_transpose.py``, so threads write disjoint planes: no races, a fixed summation
order). Each plane is zeroed, then every nonzero (c, i, j) adds v * x[n, c, a*s -
p + i, b*s - p + j] over its valid (a, b) only (ranges from ``valid``, once per
nonzero: no branch in the loop; stride 1 reads and writes contiguous rows), or
scatters v * grad_out the same way. The MACs executed are exactly the valid taps,
``csr_conv.csr_conv2d_macs`` (forward and grad_input alike): fewer than nnz * N *
OH * OW at borders, 0.96 of it for 3x3 pad 1 at 32x32, 0.92 at 16x16, 0.84 at
8x8. The inner loops index row slices with ``range(length)``: indexing the flat
arrays with a computed offset left the loop scalar (no vector FMA in the assembly,
presumably Numba's negative-index wraparound) and 2-3x slower.

Chosen (``use_direct``): direct when nnz * OH * OW <= ratio x the floats per
image the planes path copies: the phase planes of x (C * min(s,kh) * min(s,kw) *
HQ * WQ), ratio 2, for forward; grad_out (O * OH * OW), ratio 3.5, for
grad_input. The crossovers measured (same setup, ``--path planes|direct``) were,
forward: 16@32x32 3x3 s1 11, s2 3.6; 32@16x16 s1 6.7, s2 2.2; 64@8x8 2.8; 1x1 s2
5-6.5; grad_input: 14, 7.7, 8, 5.5, 4.3, about 4. The ratios sit below the
smallest, so the direct path was not the slower wherever it was chosen (short rows
and stride 2 make it less efficient per MAC than the 8-tap gather loop).
Forward / grad_input ms before (planes) -> after (auto), ``python
tools/bench/csr.py --set r8 --low --reps 15 [--path planes]``:

    layer (C@HxW->O k s p)  density 0.02     0.01             0.001
    16@32x32->16  3 1 1     .69/.69->.63/.28 .60/.60->.17/.17 .45/.43->.10/.11
    16@32x32->32  3 2 1     .65/.62->.25/.30 .59/.54->.16/.20 .50/.43->.07/.11
    32@16x16->32  3 1 1     .51/.49->.45/.48 .53/.49->.46/.20 .38/.36->.07/.08
    32@16x16->64  3 2 1     .46/.44->.42/.38 .42/.39->.20/.21 .37/.29->.06/.08
    64@8x8->64    3 1 1     .36/.36->.33/.33 .32/.32->.30/.30 .27/.27->.07/.07
    16@32x32->32  1 2 0     .24/.40->.09/.13 .25/.36->.07/.12 (nnz 0)
    32@16x16->64  1 2 0     .17/.28->.08/.10 .17/.27->.06/.08 .16/.25->.04/.07

At 0.005 the 3x3 layers run .12-.17 ms each way (from .29-.59).

The floor is writing the output once (1-2 MB: 0.06-0.11 ms). 16@32x32 at
density 0.01 (19 nonzeros of 2304): 0.17 ms each way, from 0.60.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from . import csr_transpose
from .config import JIT, JIT_PARALLEL_FASTMATH, kernel

# conv forward / grad_input take the direct path (no phase planes) when nnz * OH * OW
# is at most this many times the floats per image the planes path would copy (the
# phase planes of x, C*min(s,kh)*min(s,kw)*HQ*WQ; grad_out, O*OH*OW): the smallest
# crossovers measured were 2.2 and 4.3 (module docstring)
_DIRECT_RATIO = {"forward": 2.0, "grad_input": 3.5}


@kernel("UniTuple(i8, 2)(i8, i8, i8, i8, i8)", **JIT)
def valid(i, s, p, size, num):  # pragma: no cover - compiled
    # [a0, a1): the outputs a < num whose input index a*s - p + i lies in [0, size)
    a0 = max(0, -((i - p) // s))
    a1 = min(num, (size - 1 + p - i) // s + 1)
    return a0, max(a0, a1)


# The kernels take flat arrays and loop over row slices with t in
# range(length): a start >= 0 that Numba can see, so the loop has no negative-index
# wraparound and LLVM vectorises it (module docstring).
@kernel("void(f4[::1], i4[::1], i8[::1], f4[::1], i8, i8, i8, i8, i8, i8, i8, i8,"
         " i8, i8, f4[::1], b1, f4[::1])", **JIT_PARALLEL_FASTMATH)
def forward(x, indices, indptr, data, n_img, n_in, h, w, kh, kw, s, p, oh, ow,
            bias, relu, y):  # pragma: no cover - compiled
    # x: (N, C, H, W) flat, y: (N, O, OH, OW) flat. y[n, o] = sum over the
    # nonzeros (c, i, j, v) of row o of v * x[n, c, a*s - p + i, b*s - p + j]
    # over the valid (a, b) only (+ bias[o], added last when bias is not empty;
    # then max(., 0) when relu, NaN kept)
    n_out = indptr.shape[0] - 1
    plane = oh * ow
    for idx in nb.prange(n_img * n_out):
        n = idx // n_out
        o = idx % n_out
        yb = idx * plane
        for t in range(plane):
            y[yb + t] = 0.0
        for k in range(indptr[o], indptr[o + 1]):
            col = indices[k]
            c = col // (kh * kw)
            i = (col // kw) % kh
            j = col % kw
            v = data[k]
            a0, a1 = valid(i, s, p, h, oh)
            b0, b1 = valid(j, s, p, w, ow)
            xb = (n * n_in + c) * h * w + (i - p) * w + j - p
            width = b1 - b0
            if width == 0:
                continue
            for a in range(a0, a1):
                yr = y[yb + a * ow + b0:]
                xr = xb + a * s * w + b0 * s
                if s == 1:
                    xv = x[xr:]
                    for t in range(width):
                        yr[t] += v * xv[t]
                else:
                    xs = x[xr:xr + s * width:s]
                    for t in range(width):
                        yr[t] += v * xs[t]
        if bias.shape[0]:
            bv = bias[o]
            for t in range(plane):
                y[yb + t] += bv
        if relu:
            for t in range(plane):
                if y[yb + t] < 0.0:  # noqa: PLR1730 - max() may drop NaN
                    y[yb + t] = 0.0


@kernel("void(f4[::1], i8[::1], i8[::1], i8[::1], f4[::1], i8, i8, i8, i8, i8, i8,"
         " i8, i8, i8, f4[::1])", **JIT_PARALLEL_FASTMATH)
def _grad_input(g, gptr, grow, gtap, gval, n_img, n_out, oh, ow, kw, s, p, h, w,
                gx):  # pragma: no cover - compiled
    # g: (N, O, OH, OW) flat, gx: (N, C, H, W) flat. gx[n, c] = sum over the
    # nonzeros (o, i, j, v) of input channel c (the CSC group gptr[c]:gptr[c+1],
    # tap = i*kw + j) of gx[n, c, a*s - p + i, b*s - p + j] += v * g[n, o, a, b]
    # over the valid (a, b)
    n_in = gptr.shape[0] - 1
    plane = h * w
    for idx in nb.prange(n_img * n_in):
        n = idx // n_in
        c = idx % n_in
        xb0 = idx * plane
        for t in range(plane):
            gx[xb0 + t] = 0.0
        for e in range(gptr[c], gptr[c + 1]):
            o = grow[e]
            i = gtap[e] // kw
            j = gtap[e] % kw
            v = gval[e]
            a0, a1 = valid(i, s, p, h, oh)
            b0, b1 = valid(j, s, p, w, ow)
            gb = (n * n_out + o) * oh * ow
            xb = xb0 + (i - p) * w + j - p
            width = b1 - b0
            if width == 0:
                continue
            for a in range(a0, a1):
                gr = g[gb + a * ow + b0:]
                xr = xb + a * s * w + b0 * s
                if s == 1:
                    xv = gx[xr:]
                    for t in range(width):
                        xv[t] += v * gr[t]
                else:
                    xs = gx[xr:xr + s * width:s]
                    for t in range(width):
                        xs[t] += v * gr[t]


def use_direct(nnz: int, out_pixels: int, copied: int, op: str) -> bool:
    """True when the direct path is expected to beat the phase planes: nnz * OH * OW
    (at most the MACs per image) <= _DIRECT_RATIO[op] x the floats per image the
    planes path copies (module docstring)."""
    return nnz * out_pixels <= _DIRECT_RATIO[op] * copied


def grad_input(g: np.ndarray, data, indices, indptr, kshape: tuple, in_shape: tuple,
               stride: int, pad: int) -> np.ndarray:
    """csr_conv2d_grad_input on the direct path (checked arguments, nnz > 0)."""
    o, c, kh, kw = kshape
    n, _, h, wd = in_shape
    oh, ow = g.shape[2:]
    # the CSC of w: nonzeros grouped by input channel, each with its tap i*kw + j
    col = np.arange(c * kh * kw)
    gptr, grow, gtap, gval = csr_transpose.transposed(data, indices, indptr,
                                                      col // (kh * kw),
                                                      col % (kh * kw), c)
    grad_x = np.empty((n, c, h, wd), dtype=np.float32)
    _grad_input(g.reshape(-1), gptr, grow, gtap, gval, n, o, oh, ow, kw, stride, pad,
                h, wd, grad_x.reshape(-1))
    return grad_x
