"""Sparse (CSR-weight) kernels for conv and linear layers: forward and grad_input.

Weights arrive as SciPy-named CSR arrays (``runtime/sparse.py``): ``data`` f4,
``indices`` i4, ``indptr`` i8, a conv weight (O, C, kh, kw) as the O x (C*kh*kw)
matrix with column ``c*kh*kw + i*kw + j``.

How they work
-------------
Both are the direct convolution of ``kernels/conv.py`` (read its docstring) with the
dense tap list replaced by the nonzeros. Everything is one gather kernel,
``_gather_taps``: for each group g (an output channel, or an input channel and
phase) and a chunk of images,

    acc[t] = sum over the entries e of group g of
             val[e] * src[plane[q]][start + off[q] + t],   q = tap[e]

over one long contiguous range of t, then acc is copied to its (strided) place in
the output. Eight entries per pass (9 loads, 1 store, 8 FMA per vector), then 4,
then 1: 8 ran 10-20 % faster than 4 (single thread, density 0.3, 16@32x32,
64@8x8, 32@16x16 s2, 256@8x8). prange over (image chunk, group): groups write
disjoint outputs, so there are no races, and every output element is summed in
one fixed order whatever the thread count (results are deterministic).

* conv forward: groups = rows of the CSR (output channels), src = phase planes of
  x (``conv._planes``), entry = nonzero (o, c, i, j) -> plane (c, i%s, j%s),
  offset (i//s)*WQ + j//s, exactly as ``conv._forward_taps`` but in CSR order.
* conv grad_input: the polyphase form of ``conv.conv2d_grad_input``, for every
  stride: a counting sort (O(nnz), ``_group_entries``) regroups the
  nonzeros by (input channel c, phase i%s, j%s), i.e. the CSC of the weight split
  by phase; each group is a stride-1 correlation of grad_out written to rows
  s*a + pi - pad, columns s*b + pj - pad of dL/dx; a phase with no nonzero (1x1
  stride 2: three of four) writes zeros. For stride 1 the grid is the tight
  (H + kh - 1) x (W + kw - 1) of conv.py's flipped-kernel path.
* linear: the same kernel with images of one pixel: forward reads x.T rows
  (groups = rows of w), grad_input reads grad_out.T rows (groups = columns of w).

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

Measured (``NUMBA_NUM_THREADS=2 python tools/bench_csr.py --reps 11``, batch 32,
2-core Xeon with FMA, quiet machine, random masks): dense forward + grad_input
(ms, conv.py; NumPy matmul for linear), then dense/CSR of forward + grad_input
(> 1: CSR faster) at each weight density:

    layer (C@HxW->O k s p)   dense     1   0.5   0.2   0.1  0.05  0.01 0.001  cross
    16@32x32->16  3 1 1       2.77  0.73  1.11  1.51  1.80  2.12  2.49  3.50  0.59
    16@32x32->32  3 2 1       2.26  0.75  1.03  1.41  1.64  1.79  2.20  2.71  0.54
    32@16x16->32  3 1 1       2.89  0.73  1.19  1.86  2.45  2.84  3.59  4.93  0.64
    32@16x16->64  3 2 1       2.63  0.93  1.36  2.09  2.64  2.95  3.59  4.34  0.87
    64@8x8->64    3 1 1       3.59  0.82  1.41  2.50  3.47  4.45  6.06  7.79  0.77
    16@32x32->32  1 2 0       0.90  1.08  1.19  1.28  1.35  1.38  1.63  1.71  >= 1
    32@16x16->64  1 2 0       0.60  0.90  1.04  1.20  1.27  1.30  1.44  1.62  0.60
    linear 64->10            0.002  0.04  0.04  0.04  0.05  0.05  0.05  0.11  never
    64@32x32->64  3 1 1      35.76  0.78  1.34  2.48  3.69  5.03  7.19 10.44  0.73
    128@16x16->128 3 1 1     40.87  0.74  1.34  2.67  4.14  6.15 10.75 15.04  0.70
    256@8x8->256  3 1 1      62.36  0.91  1.63  3.27  5.93  9.32 20.20 29.90  0.89
    512@4x4->512  3 1 1      91.60  0.71  1.38  2.61  5.31  9.69 27.93 49.86  0.70
    linear 512->10           0.008  0.05  0.05  0.07  0.07  0.08  0.09  0.08  never

Single-threaded the 3x3 crossovers are 0.57-0.71 and the 1x1 stride-2 ones
0.04-0.07 (their dense grad_input is cheap; at two threads it pays for four
parallel phase calls). At density 0.001 the phase-plane copy and the output writes
took 0.3-0.5 ms at ResNet-8 sizes: hence the direct path below. The Linear
layers here take 1-8 us as a BLAS matmul, against 10-130 us of CSR call overhead
(validation, transposes, a parallel launch), so CSR never pays for them. Chosen
(``_CROSSOVER``): conv
below density 0.5 (every conv layer above is >= 1.03x there at two threads),
linear never.

Direct path (conv, low density)
-------------------------------
Below a few nonzeros per output channel the phase-plane copy of x (or of
grad_out) costs more than the MACs, so ``_direct_forward`` / ``_direct_grad_input``
skip it: prange over the (image, output channel) planes of y, or the (image, input
channel) planes of dL/dx (the nonzeros grouped by input channel with
``_group_entries``, so threads write disjoint planes: no races, a fixed summation
order). Each plane is zeroed, then every nonzero (c, i, j) adds v * x[n, c, a*s -
p + i, b*s - p + j] over its valid (a, b) only (ranges from ``_valid``, once per
nonzero: no branch in the loop; stride 1 reads and writes contiguous rows), or
scatters v * grad_out the same way. The MACs executed are exactly the valid taps,
``csr_conv2d_macs`` (forward and grad_input alike): fewer than nnz * N * OH * OW
at borders, 0.96 of it for 3x3 pad 1 at 32x32, 0.92 at 16x16, 0.84 at 8x8. The
inner loops index row slices with ``range(length)``: indexing the flat arrays
with a computed offset left the loop scalar (no vector FMA in the assembly,
presumably Numba's negative-index wraparound) and 2-3x slower.

Chosen (``_use_direct``): direct when nnz * OH * OW <= ratio x the floats per
image the planes path copies: the phase planes of x (C * min(s,kh) * min(s,kw) *
HQ * WQ), ratio 2, for forward; grad_out (O * OH * OW), ratio 3.5, for
grad_input. The crossovers measured (same setup, ``--path planes|direct``) were,
forward: 16@32x32 3x3 s1 11, s2 3.6; 32@16x16 s1 6.7, s2 2.2; 64@8x8 2.8; 1x1 s2
5-6.5; grad_input: 14, 7.7, 8, 5.5, 4.3, about 4. The ratios sit below the
smallest, so the direct path was not the slower wherever it was chosen (short rows
and stride 2 make it less efficient per MAC than the 8-tap gather loop).
Forward / grad_input ms before (planes) -> after (auto), ``python
tools/bench_csr.py --set r8 --low --reps 15 [--path planes]``:

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

Plans, fused bias and ReLU (inference)
--------------------------------------
``plan_conv2d_forward`` does once what every forward call otherwise repeats:
validate the CSR, pick the path, lay out the taps' planes and offsets. Frozen
layers (``runtime/inference.py``) keep one per input shape and call
``ConvForwardPlan.run``; ResNet-18 at 99 % (global), batch 1: the 256@8x8 ->
512 1x1 stride-2 layer (45k nonzeros) took 0.53 ms a call, of which 0.12 ms
was the kernel; the rest was checks and a per-nonzero gather of plane and
offset, which the kernel now reads per tap (CSR column) instead. The bias is
added, and a following ReLU applied (max(v, 0) with NaN kept), as the kernels
write each output: one pass over the activations fewer for each. Whole eval
forward, frozen, batch 1: 4.4 ms -> 2.2-2.3 ms (with the BasicBlock's last ReLU
in place, ``python tools/bench_onnx.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import numba as nb
import numpy as np

from ..arrays import as_f32, check_ndim
from ..errors import ConfigError, DTypeError, ShapeError
from ..sparse import check_csr
from . import conv
from .config import JIT, JIT_PARALLEL, JIT_PARALLEL_FASTMATH, kernel

_VL = 32  # vector loops are rounded up to this many floats (as in conv.py)
_PARALLEL_NNZ = 1 << 17  # transposes of fewer nonzeros run serially (~1 ms)

# Density below which CSR forward + grad_input beats the dense kernels (conv.py for
# conv, NumPy matmul for linear), measured at batch 32, two threads: module docstring
_CROSSOVER = {"conv": 0.5, "linear": 0.0}
# conv forward / grad_input take the direct path (no phase planes) when nnz * OH * OW
# is at most this many times the floats per image the planes path would copy (the
# phase planes of x, C*min(s,kh)*min(s,kw)*HQ*WQ; grad_out, O*OH*OW): the smallest
# crossovers measured were 2.2 and 4.3 (module docstring, "Direct path")
_DIRECT_RATIO = {"forward": 2.0, "grad_input": 3.5}


@kernel("void(f4[:, ::1], i8[::1], i4[::1], i8[::1], i8[::1], f4[::1], i8, i8, i8,"
         " i8, i8[:, ::1], f4[::1], b1, f4[:, :, :, ::1])", **JIT_PARALLEL_FASTMATH)
def _gather_taps(src, ptr, tap, plane, off, val, size, wq, nb_img, ds, box, bias,
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
        length = ((n_hi - n_lo - 1) * size + (a1 - 1) * wq + b1 - t0 + _VL - 1
                  ) // _VL * _VL
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


@kernel("UniTuple(i8, 2)(i8, i8, i8, i8, i8)", **JIT)
def _valid(i, s, p, size, num):  # pragma: no cover - compiled
    # [a0, a1): the outputs a < num whose input index a*s - p + i lies in [0, size)
    a0 = max(0, -((i - p) // s))
    a1 = min(num, (size - 1 + p - i) // s + 1)
    return a0, max(a0, a1)


# The direct kernels take flat arrays and loop over row slices with t in
# range(length): a start >= 0 that Numba can see, so the loop has no negative-index
# wraparound and LLVM vectorises it (module docstring, "Direct path").
@kernel("void(f4[::1], i4[::1], i8[::1], f4[::1], i8, i8, i8, i8, i8, i8, i8, i8,"
         " i8, i8, f4[::1], b1, f4[::1])", **JIT_PARALLEL_FASTMATH)
def _direct_forward(x, indices, indptr, data, n_img, n_in, h, w, kh, kw, s, p, oh,
                    ow, bias, relu, y):  # pragma: no cover - compiled
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
            a0, a1 = _valid(i, s, p, h, oh)
            b0, b1 = _valid(j, s, p, w, ow)
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
def _direct_grad_input(g, gptr, grow, gtap, gval, n_img, n_out, oh, ow, kw, s, p, h,
                       w, gx):  # pragma: no cover - compiled
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
            a0, a1 = _valid(i, s, p, h, oh)
            b0, b1 = _valid(j, s, p, w, ow)
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


@kernel("void(i4[::1], i8[::1], i8[::1], i8[:, ::1], i8)", **JIT)
def _count_block(indices, indptr, col_group, fill, b):  # pragma: no cover - compiled
    # fill[b, g] += number of nonzeros in group g among the rows of block b
    n_part = fill.shape[0]
    n_row = indptr.shape[0] - 1
    cnt = fill[b]
    for r in range(b * n_row // n_part, (b + 1) * n_row // n_part):
        for k in range(indptr[r], indptr[r + 1]):
            cnt[col_group[indices[k]]] += 1


@kernel("void(i8[:, ::1], i8[::1])", **JIT)
def _scan_blocks(fill, gptr):  # pragma: no cover - compiled
    # counts -> first slot of block b in group g (groups in order, then blocks)
    n_part, n_grp = fill.shape
    total = 0
    for g in range(n_grp):
        gptr[g] = total
        for b in range(n_part):
            num = fill[b, g]
            fill[b, g] = total
            total += num
    gptr[n_grp] = total


@kernel("void(i4[::1], i8[::1], f4[::1], i8[::1], i8[::1], i8[:, ::1], i8, i8[::1],"
         " i8[::1], f4[::1])", **JIT)
def _fill_block(indices, indptr, data, col_group, col_off, fill, b, grow, goff,
                gval):  # pragma: no cover - compiled
    # the entries of the rows of block b, to their groups' slots in row order
    n_part = fill.shape[0]
    n_row = indptr.shape[0] - 1
    pos = fill[b]
    for r in range(b * n_row // n_part, (b + 1) * n_row // n_part):
        for k in range(indptr[r], indptr[r + 1]):
            col = indices[k]
            e = pos[col_group[col]]
            grow[e] = r
            goff[e] = col_off[col]
            gval[e] = data[k]
            pos[col_group[col]] = e + 1


_GROUP_SIG = ("void(i4[::1], i8[::1], f4[::1], i8[::1], i8[::1], i8[:, ::1], i8[::1],"
              " i8[::1], i8[::1], f4[::1])")


@kernel(_GROUP_SIG, **JIT)
def _group_entries(indices, indptr, data, col_group, col_off, fill, gptr, grow, goff,
                   gval):  # pragma: no cover - compiled
    # counting sort of the nonzeros by col_group[column] (the CSR -> CSC step):
    # group g gets entries gptr[g]:gptr[g+1] in row order, each with its row (grow),
    # col_off[column] (goff) and value (gval); fill (n_blocks, n_groups) is zeroed
    for b in range(fill.shape[0]):
        _count_block(indices, indptr, col_group, fill, b)
    _scan_blocks(fill, gptr)
    for b in range(fill.shape[0]):
        _fill_block(indices, indptr, data, col_group, col_off, fill, b, grow, goff,
                    gval)


@kernel(_GROUP_SIG, **JIT_PARALLEL)
def _group_entries_parallel(indices, indptr, data, col_group, col_off, fill, gptr,
                            grow, goff, gval):  # pragma: no cover - compiled
    # _group_entries with prange over the row blocks (one per thread)
    for b in nb.prange(fill.shape[0]):
        _count_block(indices, indptr, col_group, fill, b)
    _scan_blocks(fill, gptr)
    for b in nb.prange(fill.shape[0]):
        _fill_block(indices, indptr, data, col_group, col_off, fill, b, grow, goff,
                    gval)


def _transposed(data, indices, indptr, col_group, col_off, n_group: int):
    """(gptr, rows, offsets, values) of the entries grouped by col_group[column]."""
    nnz = data.shape[0]
    # a parallel region costs a thread wake-up (a scheduler quantum, ~10 ms, when
    # the cores are busy): only worth it for large matrices
    is_parallel = nnz >= _PARALLEL_NNZ and nb.get_num_threads() > 1
    n_part = min(indptr.shape[0] - 1, nb.get_num_threads()) if is_parallel else 1
    fill = np.zeros((n_part, n_group), dtype=np.int64)
    gptr = np.empty(n_group + 1, dtype=np.int64)
    grow = np.empty(nnz, dtype=np.int64)
    goff = np.empty(nnz, dtype=np.int64)
    gval = np.empty(nnz, dtype=np.float32)
    kernel = _group_entries_parallel if is_parallel else _group_entries
    kernel(indices, indptr, data, np.array(col_group, np.int64),
           np.array(col_off, np.int64), fill, gptr, grow, goff, gval)
    return gptr, grow, goff, gval


def _chunk(n: int, size: int) -> int:
    """Images per vector loop: about conv._chunk(size), evened out over the batch
    (N=32 at 8x8: 16 + 16, not 20 + 12, which left a thread idle)."""
    num = -(-n // conv._chunk(size))
    return -(-n // num)


def _csr_args(data, indices, indptr, shape: tuple, what: str):
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


def _kshape(kshape, what: str) -> tuple:
    if len(kshape) != 4 or min(kshape) < 0 or min(kshape[2:]) < 1:
        raise ConfigError(f"{what}: expected kshape (O, C, kh, kw) with kh, kw >= 1, "
                          f"got {tuple(kshape)}")
    return tuple(int(k) for k in kshape)


def _geometry(h: int, w: int, kh: int, kw: int, stride, pad, what: str):
    """(oh, ow) of the conv; ConfigError for a stride, pad or kernel that cannot run."""
    if int(stride) != stride or stride < 1 or int(pad) != pad or pad < 0:
        raise ConfigError(f"{what}: expected integer stride >= 1 and pad >= 0, got "
                          f"stride={stride}, pad={pad}")
    if h + 2 * pad < kh or w + 2 * pad < kw:
        raise ConfigError(f"{what}: expected a padded input of at least {kh}x{kw}, "
                          f"got {h}x{w} with pad {pad}; lower the kernel or pad more")
    return conv.out_size(h, kh, stride, pad), conv.out_size(w, kw, stride, pad)


def csr_conv2d_forward(x: np.ndarray, data, indices, indptr, kshape: tuple,
                       stride: int, pad: int, bias: np.ndarray | None = None
                       ) -> np.ndarray:
    """y = conv(x, w) (+ b) with w in CSR; same result as ``conv.conv2d_forward``
    followed by ``y += b``.

    Wraps ``_direct_forward`` at low density (``_use_direct``), else
    ``_gather_taps`` on phase planes (groups = output channels); the bias is added
    as each output is written, not in a second pass. A caller that runs the same
    weights on the same input shape again keeps a ``ConvForwardPlan`` instead.

    Parameters
    ----------
    x : (N, C, H, W) float32 (converted once if not C-contiguous float32)
    data, indices, indptr : CSR of w as the O x (C*kh*kw) matrix (f4, i4, i8)
    kshape : (O, C, kh, kw), the dense weight shape
    stride, pad : ints, stride >= 1, pad >= 0 (both axes)
    bias : (O,) float32 or None

    Returns
    -------
    y : (N, O, OH, OW) float32
    """
    return _conv_forward(x, data, indices, indptr, kshape, stride, pad, "auto", bias)


def _conv_forward(x, data, indices, indptr, kshape, stride, pad, path: str,
                  bias=None):
    """csr_conv2d_forward on a given path: "auto", "planes" or "direct"."""
    what = "csr_conv2d_forward"
    # writable: conv._phases has no read-only signature (decoded buffers are read-only)
    x = np.require(as_f32(x, f"{what}: x"), requirements=["W"])
    check_ndim(x, 4, what, "(N, C, H, W)")
    plan = plan_conv2d_forward(data, indices, indptr, kshape, x.shape, stride, pad,
                               path)
    return plan.run(x, None if bias is None else as_f32(bias, f"{what}: bias"))


class ConvForwardPlan(NamedTuple):
    """A CSR conv forward for one weight and one input shape, validated and laid
    out once: the checks, the path choice and the tap layout cost 0.1-0.4 ms a
    call at batch 1 (ResNet-18, 99 %), more than the MACs; frozen inference
    layers keep one per input shape (``plan_conv2d_forward``)."""

    in_shape: tuple
    out_shape: tuple
    kshape: tuple
    stride: int
    pad: int
    path: str  # "zeros" (no nonzero or an empty shape), "direct" or "planes"
    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    taps: tuple  # planes path: (sph, spw, hq, wq, plane and offset per tap, box)

    def run(self, x: np.ndarray, bias: np.ndarray | None = None,
            relu: bool = False) -> np.ndarray:
        """y (N, O, OH, OW) f4 of x, which must have ``in_shape`` (f4, C-contiguous,
        writable: ``np.require(x, np.float32, ["C", "W"])``); ``relu`` applies
        max(y, 0) as y is written (NaN kept, as np.maximum)."""
        what = "csr_conv2d_forward"
        if x.shape != self.in_shape or x.dtype != np.float32 or \
                not x.flags.c_contiguous or not x.flags.writeable:
            raise ShapeError(f"{what}: expected a writable C-contiguous float32 x of "
                             f"shape {self.in_shape} (the plan's), got {x.dtype} "
                             f"{x.shape}")
        o = self.kshape[0]
        if bias is None:
            bias = _NO_BIAS
        elif bias.shape != (o,) or bias.dtype != np.float32:
            raise ShapeError(f"{what}: expected a float32 bias of shape ({o},), got "
                             f"{bias.dtype} {bias.shape}")
        if self.path == "zeros":  # every output is its channel's bias (or 0)
            if not bias.shape[0]:
                return np.zeros(self.out_shape, dtype=np.float32)
            y = np.empty(self.out_shape, dtype=np.float32)
            y[...] = (np.maximum(bias, np.float32(0.0)) if relu else bias)[
                None, :, None, None]
            return y
        n, c, h, wd = self.in_shape
        _, _, kh, kw = self.kshape
        s, p = self.stride, self.pad
        y = np.empty(self.out_shape, dtype=np.float32)
        oh, ow = self.out_shape[2:]
        if self.path == "direct":
            _direct_forward(x.reshape(-1), self.indices, self.indptr, self.data, n, c,
                            h, wd, kh, kw, s, p, oh, ow, bias, relu, y.reshape(-1))
            return y
        sph, spw, hq, wq, plane, off, box = self.taps
        xs = conv._planes(x, s, sph, spw, p, p, hq, wq)
        size = hq * wq
        _gather_taps(xs, self.indptr, self.indices, plane, off, self.data, size, wq,
                     _chunk(n, size), 1, box, bias, relu, y)
        return y


_NO_BIAS = np.zeros(0, dtype=np.float32)


def _each(entries: np.ndarray) -> np.ndarray:
    """tap[e] = e: for regrouped entries, whose plane and offset are per entry."""
    return np.arange(entries.shape[0], dtype=np.int32)


def plan_conv2d_forward(data, indices, indptr, kshape: tuple, in_shape: tuple,
                        stride: int, pad: int, path: str = "auto") -> ConvForwardPlan:
    """The ``ConvForwardPlan`` of w (CSR, as ``csr_conv2d_forward``) on inputs of
    ``in_shape`` (N, C, H, W); ``path`` "auto" (``_use_direct``), "planes" or
    "direct". Raises as csr_conv2d_forward does for bad arguments."""
    what = "csr_conv2d_forward"
    if path not in ("auto", "planes", "direct"):
        raise ConfigError(f"{what}: expected path auto, planes or direct, got {path!r}")
    o, c, kh, kw = _kshape(kshape, what)
    if len(in_shape) != 4 or in_shape[1] != c:
        raise ShapeError(f"{what}: expected x with C={c} channels (kshape {kshape}), "
                         f"got {tuple(in_shape)}")
    data, indices, indptr = _csr_args(data, indices, indptr, (o, c * kh * kw), what)
    n, _, h, wd = (int(d) for d in in_shape)
    oh, ow = _geometry(h, wd, kh, kw, stride, pad, what)
    s, p = int(stride), int(pad)
    shapes = ((n, c, h, wd), (n, o, oh, ow), (o, c, kh, kw), s, p)
    if data.shape[0] == 0 or n == 0 or o == 0:
        return ConvForwardPlan(*shapes, "zeros", data, indices, indptr, ())
    hq, wq = -(-(h + 2 * p) // s), -(-(wd + 2 * p) // s)
    if path == "auto":
        copied = c * min(s, kh) * min(s, kw) * hq * wq  # phase planes, per image
        path = ("direct" if _use_direct(data.shape[0], oh * ow, copied, "forward")
                else "planes")
    if path == "direct":
        return ConvForwardPlan(*shapes, "direct", data, indices, indptr, ())
    sph, spw, plane, off, order = conv._forward_taps(c, kh, kw, s, wq)
    tap_plane = np.empty_like(plane)
    tap_off = np.empty_like(off)
    tap_plane[order] = plane  # back to the (c, i, j) column order of the CSR
    tap_off[order] = off
    box = np.array([[0, oh, 0, ow, 0, 0]], dtype=np.int64)
    taps = (sph, spw, hq, wq, tap_plane, tap_off, box)
    return ConvForwardPlan(*shapes, "planes", data, indices, indptr, taps)


def csr_conv2d_grad_input(grad_out: np.ndarray, data, indices, indptr,
                          kshape: tuple, in_shape: tuple, stride: int,
                          pad: int) -> np.ndarray:
    """dL/dx (N, C, H, W) f4 from grad_out and w in CSR; = ``conv.conv2d_grad_input``.

    Wraps ``_group_entries`` (the transpose), then ``_direct_grad_input`` at low
    density (``_use_direct``), else ``_gather_taps`` polyphase (module docstring).

    Parameters
    ----------
    grad_out : (N, O, OH, OW) float32
    data, indices, indptr : CSR of w as the O x (C*kh*kw) matrix (f4, i4, i8)
    kshape : (O, C, kh, kw); in_shape : (N, C, H, W) of the layer input
    stride, pad : as in the forward call
    """
    return _conv_grad_input(grad_out, data, indices, indptr, kshape, in_shape, stride,
                            pad, "auto")


def _conv_grad_input(grad_out, data, indices, indptr, kshape, in_shape, stride, pad,
                     path: str):
    """csr_conv2d_grad_input on a given path: "auto", "planes" or "direct"."""
    what = "csr_conv2d_grad_input"
    g = np.require(as_f32(grad_out, f"{what}: grad_out"), requirements=["W"])
    o, c, kh, kw = _kshape(kshape, what)
    if len(in_shape) != 4 or in_shape[1] != c:
        raise ShapeError(f"{what}: expected in_shape (N, {c}, H, W), got {in_shape}")
    n, _, h, wd = (int(d) for d in in_shape)
    oh, ow = _geometry(h, wd, kh, kw, stride, pad, what)
    if g.shape != (n, o, oh, ow):
        raise ShapeError(f"{what}: expected grad_out of shape {(n, o, oh, ow)}, got "
                         f"{g.shape}")
    data, indices, indptr = _csr_args(data, indices, indptr, (o, c * kh * kw), what)
    s, p = int(stride), int(pad)
    if data.shape[0] == 0 or n * c * h * wd == 0:
        return np.zeros((n, c, h, wd), dtype=np.float32)
    if path == "auto":
        path = ("direct" if _use_direct(data.shape[0], oh * ow, o * oh * ow,
                                        "grad_input") else "planes")
    if path == "direct":
        # the CSC of w: nonzeros grouped by input channel, each with its tap i*kw + j
        col = np.arange(c * kh * kw)
        gptr, grow, gtap, gval = _transposed(data, indices, indptr, col // (kh * kw),
                                             col % (kh * kw), c)
        grad_x = np.empty((n, c, h, wd), dtype=np.float32)
        _direct_grad_input(g.reshape(-1), gptr, grow, gtap, gval, n, o, oh, ow, kw, s,
                           p, h, wd, grad_x.reshape(-1))
        return grad_x
    # rows a of phase pi of the padded dL/dx that land inside x: [r0, r1); the
    # grid starts at the first such row of any phase (a - rmin), so that stride 1
    # gets the tight (H + kh - 1) x (W + kw - 1) grid of conv.py's flipped-kernel
    # path, not the padded (H + 2p + kh - 1) one
    hq, wq = -(-(h + 2 * p) // s), -(-(wd + 2 * p) // s)
    rows = [_phase_range(pi, s, p, h, hq) for pi in range(s)]
    cols = [_phase_range(pj, s, p, wd, wq) for pj in range(s)]
    rmin, rmax = min(r[0] for r in rows), max(r[1] for r in rows)
    qmin, qmax = min(q[0] for q in cols), max(q[1] for q in cols)
    box = np.array([(r0 - rmin, r1 - rmin, q0 - qmin, q1 - qmin,
                     s * rmin + pi - p, s * qmin + pj - p)
                    for pi, (r0, r1) in enumerate(rows)
                    for pj, (q0, q1) in enumerate(cols)], dtype=np.int64)
    # phase row a reads grad_out row a - i//s: grid row a - rmin + dr - i//s
    dr, dc = (kh - 1) // s, (kw - 1) // s
    hg, wg = rmax - rmin + dr, qmax - qmin + dc
    gs = conv._planes(g, 1, 1, 1, dr - rmin, dc - qmin, hg, wg)  # < 0 pads crop
    ii = np.arange(kh)[None, :, None]
    jj = np.arange(kw)[None, None, :]
    group = np.arange(c)[:, None, None] * (s * s) + (ii % s) * s + jj % s
    col_off = np.broadcast_to((dr - ii // s) * wg + (dc - jj // s), group.shape)
    gptr, grow, goff, gval = _transposed(data, indices, indptr, group.ravel(),
                                         col_off.ravel(), c * s * s)
    grad_x = np.empty((n, c, h, wd), dtype=np.float32)
    size = hg * wg
    _gather_taps(gs, gptr, _each(gval), grow, goff, gval, size, wg, _chunk(n, size), s,
                 box, _NO_BIAS, False, grad_x)
    return grad_x


def _use_direct(nnz: int, out_pixels: int, copied: int, op: str) -> bool:
    """True when the direct path is expected to beat the phase planes: nnz * OH * OW
    (at most the MACs per image) <= _DIRECT_RATIO[op] x the floats per image the
    planes path copies (module docstring, "Direct path")."""
    return nnz * out_pixels <= _DIRECT_RATIO[op] * copied


def csr_conv2d_macs(indices, indptr, kshape: tuple, in_shape: tuple, stride: int,
                    pad: int, n_images: int) -> int:
    """Multiply-adds the direct path executes for one call (forward or grad_input).

    Exactly the valid taps: sum over the nonzeros (o, c, i, j) of n_images *
    rows(i) * cols(j), rows(i) = #{a < OH : 0 <= a*s - p + i < H} (cols alike), so
    border taps count less than OH * OW. ``in_shape`` ends with (H, W).
    """
    _, _, kh, kw = _kshape(kshape, "csr_conv2d_macs")
    h, wd = (int(d) for d in in_shape[-2:])
    oh, ow = _geometry(h, wd, kh, kw, stride, pad, "csr_conv2d_macs")
    s, p = int(stride), int(pad)
    rows = np.array([np.subtract(*_valid(i, s, p, h, oh)[::-1]) for i in range(kh)])
    cols = np.array([np.subtract(*_valid(j, s, p, wd, ow)[::-1]) for j in range(kw)])
    col = np.asarray(indices, dtype=np.int64)[:int(np.asarray(indptr)[-1])]
    per_image = rows[col // kw % kh] * cols[col % kw]
    return int(n_images) * int(per_image.sum())


def _phase_range(pi: int, s: int, p: int, size: int, num: int) -> tuple:
    """[a0, a1): the rows s*a + pi of a padded axis (of num phase rows) inside x."""
    a0 = max(0, -(-(p - pi) // s))
    return a0, max(a0, min(num, (size - 1 + p - pi) // s + 1))


def _rows_padded(a: np.ndarray) -> np.ndarray:
    """a.T (K, N) with _VL zero floats after every row (the vector loops overrun)."""
    out = np.zeros((a.shape[1], a.shape[0] + _VL), dtype=np.float32)
    out[:, :a.shape[0]] = a.T
    return out


_ONE_PIXEL = np.array([[0, 1, 0, 1, 0, 0]], dtype=np.int64)


def csr_linear_forward(x: np.ndarray, data, indices, indptr,
                       out_features: int) -> np.ndarray:
    """y = x @ w.T (N, O) f4 with w (O, I) in CSR; wraps ``_gather_taps``.

    x : (N, I) float32; data, indices, indptr : CSR of w (f4, i4, i8).
    """
    what = "csr_linear_forward"
    x = as_f32(x, f"{what}: x")
    check_ndim(x, 2, what, "(N, in_features)")
    n, k = x.shape
    o = int(out_features)
    data, indices, indptr = _csr_args(data, indices, indptr, (o, k), what)
    if data.shape[0] == 0 or n == 0:
        return np.zeros((n, o), dtype=np.float32)
    y = np.empty((n, o, 1, 1), dtype=np.float32)
    _gather_taps(_rows_padded(x), indptr, indices, np.arange(k, dtype=np.int64),
                 np.zeros(k, dtype=np.int64), data, 1, 1, _chunk(n, 1), 1, _ONE_PIXEL,
                 _NO_BIAS, False, y)
    return y.reshape(n, o)


def csr_linear_grad_input(grad_out: np.ndarray, data, indices, indptr,
                          in_features: int) -> np.ndarray:
    """dL/dx = grad_out @ w (N, I) f4 with w (O, I) in CSR.

    Wraps ``_group_entries`` (CSR -> CSC) and ``_gather_taps``.
    grad_out : (N, O) float32; data, indices, indptr : CSR of w (f4, i4, i8).
    """
    what = "csr_linear_grad_input"
    g = as_f32(grad_out, f"{what}: grad_out")
    check_ndim(g, 2, what, "(N, out_features)")
    n, o = g.shape
    k = int(in_features)
    data, indices, indptr = _csr_args(data, indices, indptr, (o, k), what)
    if data.shape[0] == 0 or n == 0:
        return np.zeros((n, k), dtype=np.float32)
    gptr, grow, goff, gval = _transposed(data, indices, indptr, np.arange(k),
                                         np.zeros(k), k)
    grad_x = np.empty((n, k, 1, 1), dtype=np.float32)
    _gather_taps(_rows_padded(g), gptr, _each(gval), grow, goff, gval, 1, 1,
                 _chunk(n, 1), 1, _ONE_PIXEL, _NO_BIAS, False, grad_x)
    return grad_x.reshape(n, k)


def prefer_csr(density: float, kind: str) -> bool:
    """True when CSR forward + grad_input is expected to beat the dense kernels.

    ``density`` = nnz / weight size in [0, 1]; ``kind`` is "conv" or "linear". True
    when density < the crossover measured by ``tools/bench_csr.py`` (module
    docstring): 0.5 for conv, 0.0 (never) for linear.
    """
    if kind not in _CROSSOVER:
        raise ConfigError(f"prefer_csr: expected kind in {sorted(_CROSSOVER)}, got "
                          f"{kind!r}")
    if not 0.0 <= density <= 1.0:
        raise ConfigError(f"prefer_csr: expected density in [0, 1], got {density}")
    return density < _CROSSOVER[kind]


# ---- building the CSR of a (Powerprop) weight in one parallel pass ---------------


@kernel("void(f4[:, ::1], i8[::1])", **JIT_PARALLEL)
def _row_nnz(v, counts):  # pragma: no cover - compiled
    for r in nb.prange(v.shape[0]):
        row = v[r]
        c = 0
        for k in range(row.shape[0]):
            if row[k] != 0.0:  # NaN != 0: kept, as in to_csr
                c += 1
        counts[r] = c


@kernel("void(f4[:, ::1], i8, f4, i8[::1], f4[::1], i4[::1])", **JIT_PARALLEL)
def _fill_pow(v, mode, p, indptr, data, indices):  # pragma: no cover - compiled
    # w = v * |v|^p; mode 0: p = 0 (w = v), 1: p = 0.25 (two square roots, as
    # powerprop.abs_pow, so the values equal the dense path's bit for bit), 2: p = 0.5,
    # 3: general p
    for r in nb.prange(v.shape[0]):
        e = indptr[r]
        if e == indptr[r + 1]:  # an empty row: nothing to scan for
            continue
        row = v[r]
        for k in range(row.shape[0]):
            x = row[k]
            if x != 0.0:
                if mode == 0:
                    w = x
                else:
                    a = abs(x)
                    if mode == 1:
                        m = np.sqrt(np.sqrt(a))
                    elif mode == 2:
                        m = np.sqrt(a)
                    else:
                        m = a ** p
                    w = x * m
                data[e] = w
                indices[e] = k
                e += 1


def weight_row_nnz(v: np.ndarray) -> np.ndarray:
    """Nonzeros per output row of a weight (O, ...) float32, counted in parallel
    (several times faster than np.count_nonzero); reused by csr_of_weight."""
    v2 = np.ascontiguousarray(v, dtype=np.float32).reshape(v.shape[0], -1)
    counts = np.empty(v2.shape[0], dtype=np.int64)
    _row_nnz(v2, counts)
    return counts


def csr_of_weight(v: np.ndarray, alpha: float = 1.0, counts: np.ndarray | None = None):
    """(data, indices, indptr) of w = v|v|^(alpha-1) without forming dense w.

    ``v`` is a weight (O, C, kh, kw) or (O, I) float32; the matrix is O x rest, as
    ``sparse.to_csr``. Zeros of v are zeros of w, so only the nonzeros are raised to
    the power: one pass over v (two without ``counts`` from weight_row_nnz),
    parallel over rows.
    """
    v2 = np.ascontiguousarray(v, dtype=np.float32).reshape(v.shape[0], -1)
    if counts is None:
        counts = weight_row_nnz(v2)
    indptr = np.zeros(v2.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    nnz = int(indptr[-1])
    data = np.empty(nnz, dtype=np.float32)
    indices = np.empty(nnz, dtype=np.int32)
    p = float(alpha) - 1.0
    mode = 0 if p == 0.0 else 1 if p == 0.25 else 2 if p == 0.5 else 3
    _fill_pow(v2, mode, np.float32(p), indptr, data, indices)
    return data, indices, indptr
