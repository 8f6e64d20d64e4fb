"""Convolution kernels: a direct ("shifted-row") convolution in Numba, no BLAS.

Layout contract: ``x`` is C-contiguous float32 (N, C, H, W), weights (O, C, kh, kw)
as in PyTorch. (An earlier im2col + BLAS version was removed: see "Measured" below
and the git history.)

How the direct convolution works
--------------------------------
The input is copied once into zero-padded "phase planes": for stride s, plane
(c, pi, pj) holds xpad[c, s*r + pi, s*q + pj] on an (HQ, WQ) grid, HQ = ceil((H +
2p)/s) (stride 1: the padded image itself). Every tap (c, i, j) of the kernel then
reads plane (c, i%s, j%s) at the flat offset (i//s)*WQ + j//s, so with the output
stored on the same WQ-wide grid, one output channel is

    acc[t] += sum over taps  w[o, tap] * plane[tap][t + off[tap]]

over one long contiguous range of t: a loop LLVM vectorises with FMA (fastmath
'contract'; 'reassoc' for the reductions of grad_weight). Columns WQ > OW of the
grid are garbage and never copied out. Planes of consecutive images are stored
back to back, so one loop covers several images: small feature maps (8x8, 4x4)
still run long vector loops (_chunk). Loops are rounded up to 32 elements (the
planes carry a zero tail), so no scalar remainder runs. Register blocking: two
output channels x four taps per pass (6 loads, 2 stores, 8 FMA per vector), the
best of 1x8, 2x4, 2x6, 4x2 measured single-threaded (GFLOPS, 16ch@32x32 /
64ch@8x8 / 32ch@16x16: 1x8 50/57/53, 2x4 63/68/81, 2x6 69/72/67, 4x2 56/41/55).

* forward: taps of w, prange over (image chunk, output-channel pair).
* grad_weight: the same taps as dot products with grad_out laid on the grid
  (zeros in the garbage columns). Here the images sit side by side (row r of
  image n at (r*N + n)*WQ), so the dot products run over the OH output rows of
  one (HQ, N*WQ) grid and skip the padding rows between images: 67 % of the grid
  is output at 4x4 (44 % back to back), 80 % at 8x8 (64 %). prange over halves
  of the output rows (partial sums added at the end), or for one row over halves
  of the output channels.
* grad_input, stride 1: a forward conv of grad_out with the flipped, transposed
  kernel (pad k-1-p). Stride s > 1: polyphase, each of the s*s phases of the
  padded input gradient is a stride-1 correlation of grad_out with the taps of
  that phase; written straight into its strided positions of dL/dx.

Wide layers: channel-last rows (_conv_rows)
-------------------------------------------
The planes keep two accumulators per pass in memory (loads and stores per FMA),
and their grid computes garbage columns and, for stride 2, every tap of every
phase. When the rows of the kernel are wide (kw*C floats, _use_rows), forward and
grad_input instead copy the input into zero-padded channel-last rows (N, HP,
WP*C): kernel row i of output (a, b) then reads one contiguous window of kw*C
floats, xrow[s*a + i][s*b*C:][:kw*C], and its weights w[o, c, i, :] transposed
to (O, kh, kw*C) are contiguous too. Each output is kh dot products; a pass
computes six output channels x two output columns, twelve dot products whose
accumulators LLVM keeps in vector registers (8 loads per 12 FMA, no stores),
and only outputs that exist (stride 2 included). Work items are (chunk of images
that fits half the L2, block of six-output groups), so one group's weights are
reused over the chunk. grad_input uses the same kernel on grad_out in rows:
stride 1 with the flipped kernel; stride s per phase (pi, pj), the taps u, v of
the phase reading row r - u and the window of columns q - v (v descending) of
grad_out, shifted by (dr, dc) so no index is negative.

The kernels use Numba's thread pool (prange) and never call BLAS. That matters on
two cores: a Numba pool between OpenBLAS calls makes both pools wait (every call
then took a scheduler quantum, about 8 ms); with no BLAS in the conv path, the
only BLAS calls of a train step are the tiny Linear-layer matmuls, which OpenBLAS
runs single-threaded.

Memory: the phase planes and the channel-last rows are the size of the padded
input (about 1.1-1.6x the input), freed after each call; no 9x-sized column
matrix is built.

Measured (2026-12-03, the 2-core EPYC shared with other jobs, load 5-8 on 2
CPUs, so wall-clock medians of either framework moved 2x between runs): one
thread, minimum process CPU time of 10 calls, N=32, ``python tools/bench_conv.py
--set all --threads 1 --clock cpu --reps 10`` (torch 2.13, 1 thread); "before"
is this module at commit bec066d (planes only, grad_weight images back to back):

    shape (C, H, O, k, s)   fwd: before  now  torch | f+b: before   now   torch
    3   32  16 3 1                 1.19  1.18  0.87 |        4.52   4.56   4.99
    16  32  16 3 1                 3.81  3.63  4.00 |       12.47  10.91  12.24
    16  32  32 3 2                 2.92  2.74  1.65 |        9.75   9.63   9.38
    32  16  32 3 1                 3.60  3.22  2.27 |       11.04   9.84   7.51
    32  16  64 3 2                 2.70  1.65  1.17 |        8.79   6.65   5.25
    64   8  64 3 1                 5.48  2.34  2.05 |       17.32   8.27   9.72
    16  32  32 1 2                 1.20  0.84  0.64 |        5.10   4.38   4.83
    32  16  64 1 2                 0.56  0.65  0.44 |        2.23   2.11   2.85
    ResNet-8 set                  21.5  16.3  13.1  |        71.2   56.4   56.8
    64  32  64 3 1                43.3  37.2  37.5  |       129.8  123.2  125.4
    64  32 128 3 2                28.0  24.7  22.4  |        85.5   83.0   79.7
    128 16 128 3 1                43.3  33.9  38.2  |       130.9  112.3   95.4
    128 16 256 3 2                30.6  19.6  17.6  |        95.6   69.5   60.6
    256  8 256 3 1                54.0  35.9  31.4  |       159.1  116.1  103.1
    256  8 512 3 2                40.8  22.3  21.9  |       138.0   81.6   77.5
    512  4 512 3 1                93.3  37.9  35.9  |       260.7  131.2  158.7
    ResNet-18 set                333   212   205    |        1000    717    700

The row kernel runs 60-72 GFLOPS on one core at 64-512 channels (the planes'
tap loop 26-59, lowest at 4x4 where 56 % of the grid is padding). Whole train
steps, ``sparsefedpp bench --models resnet8 resnet18 --repeats 10 --threads 1``
(turns with torch, same load): ResNet-8 103 ms vs 94 (1.10x [1.09-1.11]),
inference 42 vs 20 (2.2x: the 3- and 16-channel layers stay on the planes, and
BatchNorm/ReLU are most of the rest); ResNet-18 4858 vs 5302 (0.95x [0.90-1.01]),
inference 1347 vs 1193 (1.01x). With 2 threads on that loaded machine torch's
spinning OpenMP threads lost more than ours (0.57x / 0.63x), so those ratios
say nothing about a quiet board; measure again there.

Tried and measured (single thread): row-kernel register blocks (outputs x
columns, GFLOPS at 64/128/256/512 channels) 4x2 64/57/64/61, 4x3 71/64/72/50
(3 columns waste a third at 4 px), 2x4 59/65/62/65, 3x4 34-37 (spills), 6x2
70/70/64/68 (kept). grad_weight blocked over t (1024-2048 floats) and output
pairs (16-64), so four taps' rows stay in L1: no steady gain (+13 % on two
stride-2 layers, -10-25 % on others), left out. The row kernel loses to the
planes below kw*C = 48-64 floats per dot product (3-channel stem, 16 channels
at stride 1): its twelve horizontal sums per kernel row cost as much as the
dots there. Earlier (planes): one output x 8 taps 50-57 GFLOPS; 2x4 63-81
(kept); 2x6 67-72; 4x2 41-56; one image per loop 26 at 8x8, hence the
multi-image chunks. Left: the channel-last and plane copies (3.6-4.9 ms per
64ch@32 input, single-threaded) are redone by forward and grad_weight of the
same layer; grad_weight is still 1.3-1.8x the forward's time; the flipped
weight transpose of grad_input costs 6.5 ms at 512x512x3x3.

The im2col + BLAS comparison of the first version (same table layout, 2 threads,
quiet run): im2col+BLAS f+b summed 80 ms over the ResNet-8 set against 38.9 for
the planes; ResNet-8 train step 135-175 ms against 86-99 (torch 41-52).
"""

import numba as nb
import numpy as np

from .config import JIT_PARALLEL_FASTMATH, kernel

# fastmath without nnan/ninf: NaN and inf still propagate (divergence stays visible)
_VL = 32        # vector loops are rounded up to a multiple of this many floats
_TAIL = 2 * _VL  # zero floats after the last image of every plane
_TARGET = 2048  # floats per vector loop: several small images are processed at once
# floats per dot product (kw*C) from which _conv_rows beats the planes (measured;
# the planes' stride-2 path is slower, so strided layers switch earlier)
_ROWS_MIN = 64
_ROWS_MIN_STRIDED = 32
_CHUNK_BYTES = 512 << 10  # images of one _conv_rows work item: half of the L2
_GW_SPLIT_ROWS = 8192  # grad_weight: dot length from which threads split rows


def out_size(size: int, k: int, stride: int, pad: int) -> int:
    """Output length of a convolution or pooling window along one axis."""
    return (size + 2 * pad - k) // stride + 1


@kernel("void(f4[:, :, :, ::1], f4[:, ::1], i8, i8, i8, i8, i8, i8, i8, i8, i8)",
         **JIT_PARALLEL_FASTMATH)
def _phases(x, out, s, sph, spw, pt, pl, hq, wq, istr, rstr):  # pragma: no cover
    # out[(c*sph + pi)*spw + pj, n*istr + r*rstr + q] = x[n, c, s*r+pi-pt, s*q+pj-pl]
    # for r < hq, q < wq, zero outside x; the tail after N*hq*wq floats is zero too.
    # (istr, rstr) = (hq*wq, wq): images back to back; (wq, N*wq): side by side
    n_img, n_ch, h, w = x.shape
    n_ph = sph * spw
    for idx in nb.prange(n_ch * n_ph):
        c = idx // n_ph
        pi = (idx % n_ph) // spw
        pj = idx % spw
        plane = out[idx]
        plane[n_img * hq * wq:] = 0.0
        r0 = min(hq, max(0, (pt - pi + s - 1) // s))
        r1 = max(r0, min(hq, (h - 1 + pt - pi) // s + 1))
        q0 = min(wq, max(0, (pl - pj + s - 1) // s))
        q1 = max(q0, min(wq, (w - 1 + pl - pj) // s + 1))
        # side by side: blocks of 8 rows, the images inside, so reads run along 8
        # rows of one image and writes along 8 rows of the grid (2x faster than
        # image by image at 32x32); back to back: image by image
        n_rb = 8 if rstr > istr else hq
        for rb in range(0, hq, n_rb):
            for n in range(n_img):
                for r in range(rb, min(hq, rb + n_rb)):
                    base = n * istr + r * rstr
                    img = plane[base:base + wq]
                    if r < r0 or r >= r1:
                        img[:] = 0.0
                        continue
                    row = x[n, c, s * r + pi - pt]
                    img[:q0] = 0.0
                    if s == 1:
                        for q in range(q0, q1):
                            img[q] = row[q - pl]
                    else:
                        for q in range(q0, q1):
                            img[q] = row[s * q + pj - pl]
                    img[q1:] = 0.0


@kernel("void(f4[:, ::1], i8[::1], i8[::1], f4[:, ::1], i8, i8, i8, i8, i8, i8, i8,"
         " i8, i8, i8, f4[:, :, :, ::1])", **JIT_PARALLEL_FASTMATH)
def _conv_taps(xs, plane, off, wt, size, wq, nb_img, a0, a1, b0, b1, ds, dy, dx,
               y):  # pragma: no cover - compiled
    # acc_o[t] = sum_k wt[o, k] * xs[plane[k], start + off[k] + t] for the images of
    # one chunk (t = image*size + a*wq + b), then
    # y[n, o, a*ds + dy, b*ds + dx] = acc_o[...] for a in [a0, a1), b in [b0, b1)
    n_img = y.shape[0]
    n_out = wt.shape[0]
    n_tap = plane.shape[0]
    n_pair = (n_out + 1) // 2
    n_chunk = (n_img + nb_img - 1) // nb_img
    t0 = a0 * wq + b0
    for idx in nb.prange(n_chunk * n_pair):
        ck = idx // n_pair
        oa = 2 * (idx % n_pair)
        ob = min(oa + 1, n_out - 1)  # odd O: the last pair computes one channel twice
        n_lo = ck * nb_img
        n_hi = min(n_img, n_lo + nb_img)
        start = n_lo * size + t0
        length = ((n_hi - n_lo - 1) * size + (a1 - 1) * wq + b1 - t0 + _VL - 1
                  ) // _VL * _VL
        wa = wt[oa]
        wb = wt[ob]
        acc_a = np.zeros(length, dtype=np.float32)
        acc_b = np.zeros(length, dtype=np.float32)
        g = 0
        while g + 4 <= n_tap:
            u0 = wa[g]
            u1 = wa[g + 1]
            u2 = wa[g + 2]
            u3 = wa[g + 3]
            v0 = wb[g]
            v1 = wb[g + 1]
            v2 = wb[g + 2]
            v3 = wb[g + 3]
            x0 = xs[plane[g]][start + off[g]:]
            x1 = xs[plane[g + 1]][start + off[g + 1]:]
            x2 = xs[plane[g + 2]][start + off[g + 2]:]
            x3 = xs[plane[g + 3]][start + off[g + 3]:]
            for t in range(length):
                e0 = x0[t]
                e1 = x1[t]
                e2 = x2[t]
                e3 = x3[t]
                acc_a[t] += u0 * e0 + u1 * e1 + u2 * e2 + u3 * e3
                acc_b[t] += v0 * e0 + v1 * e1 + v2 * e2 + v3 * e3
            g += 4
        while g < n_tap:
            u0 = wa[g]
            v0 = wb[g]
            x0 = xs[plane[g]][start + off[g]:]
            for t in range(length):
                e0 = x0[t]
                acc_a[t] += u0 * e0
                acc_b[t] += v0 * e0
            g += 1
        for n in range(n_lo, n_hi):
            for a in range(a0, a1):
                base = (n - n_lo) * size + a * wq - t0
                row_a = y[n, oa, a * ds + dy]
                row_b = y[n, ob, a * ds + dy]
                for b in range(b0, b1):
                    row_a[b * ds + dx] = acc_a[base + b]
                    row_b[b * ds + dx] = acc_b[base + b]


@kernel("void(f4[:, ::1], f4[:, ::1], i8[::1], i8[::1], i8[::1], i8, i8, i8,"
         " f4[:, :, ::1])", **JIT_PARALLEL_FASTMATH)
def _conv_taps_gw(xs, gs, plane, off, order, n_img, size, n_oc,
                  part):  # pragma: no cover - compiled
    # part[k, o, tap] = sum over t in the rows (of `size` floats; n_img of them) of
    # part k of gs[o, t] * xs[plane[tap], t + off[tap]]; gs is zero on the garbage
    # columns; tap g of the (plane-sorted) list lands in column order[g], the
    # weight layout. Work items: (row part k, one of n_oc ranges of output pairs)
    n_out = gs.shape[0]
    n_tap = plane.shape[0]
    kc = part.shape[0]
    n_pair = (n_out + 1) // 2
    for idx in nb.prange(kc * n_oc):
        k = idx // n_oc
        m = idx % n_oc
        pk = part[k]
        start = (k * n_img // kc) * size
        length = ((k + 1) * n_img // kc) * size - start
        for pr in range(m * n_pair // n_oc, (m + 1) * n_pair // n_oc):
            oa = 2 * pr
            ob = min(oa + 1, n_out - 1)
            ga = gs[oa][start:]
            gb = gs[ob][start:]
            pa = pk[oa]
            pb = pk[ob]
            g = 0
            while g + 4 <= n_tap:
                x0 = xs[plane[g]][start + off[g]:]
                x1 = xs[plane[g + 1]][start + off[g + 1]:]
                x2 = xs[plane[g + 2]][start + off[g + 2]:]
                x3 = xs[plane[g + 3]][start + off[g + 3]:]
                s0 = np.float32(0.0)
                s1 = np.float32(0.0)
                s2 = np.float32(0.0)
                s3 = np.float32(0.0)
                r0 = np.float32(0.0)
                r1 = np.float32(0.0)
                r2 = np.float32(0.0)
                r3 = np.float32(0.0)
                for t in range(length):
                    e0 = x0[t]
                    e1 = x1[t]
                    e2 = x2[t]
                    e3 = x3[t]
                    fa = ga[t]
                    fb = gb[t]
                    s0 += fa * e0
                    s1 += fa * e1
                    s2 += fa * e2
                    s3 += fa * e3
                    r0 += fb * e0
                    r1 += fb * e1
                    r2 += fb * e2
                    r3 += fb * e3
                pa[order[g]] = s0
                pa[order[g + 1]] = s1
                pa[order[g + 2]] = s2
                pa[order[g + 3]] = s3
                pb[order[g]] = r0
                pb[order[g + 1]] = r1
                pb[order[g + 2]] = r2
                pb[order[g + 3]] = r3
                g += 4
            while g < n_tap:
                x0 = xs[plane[g]][start + off[g]:]
                s0 = np.float32(0.0)
                r0 = np.float32(0.0)
                for t in range(length):
                    e0 = x0[t]
                    s0 += ga[t] * e0
                    r0 += gb[t] * e0
                pa[order[g]] = s0
                pb[order[g]] = r0
                g += 1


@kernel("void(f4[:, :, :, ::1], f4[:, :, ::1], i8, i8)", **JIT_PARALLEL_FASTMATH)
def _rows(x, out, pt, pl):  # pragma: no cover - compiled
    # channel-last padded rows: out[n, r, q*C + c] = x[n, c, r - pt, q - pl], zero
    # outside x (rows of out may be wider and longer than the padded x)
    n_img, n_ch, h, w = x.shape
    n_row = out.shape[1]
    for idx in nb.prange(n_img * n_row):
        n = idx // n_row
        r = idx % n_row
        row = out[n, r]
        if r < pt or r >= pt + h:
            row[:] = 0.0
            continue
        row[:pl * n_ch] = 0.0
        row[(pl + w) * n_ch:] = 0.0
        src = x[n, :, r - pt]
        # a transpose of the (C, W) rows; blocks of 8 channels keep the reads in a
        # few pages for large images, small images read down the channels at once
        cb = 8 if h * w >= 512 else n_ch
        for c0 in range(0, n_ch, cb):
            for q in range(w):
                dst = row[(q + pl) * n_ch:]
                for c in range(c0, min(n_ch, c0 + cb)):
                    dst[c] = src[c, q]


@kernel("void(f4[:, :, ::1], f4[:, :, ::1], i8[::1], i8, i8, i8, i8, i8, i8, i8, i8,"
         " i8, i8, i8, i8, f4[:, :, :, ::1])", **JIT_PARALLEL_FASTMATH)
def _conv_rows(src, wt, row_off, rs, col_step, col_off, nc, ng, a0, a1, b0, b1, ds,
               dy, dx, y):  # pragma: no cover - compiled
    # y[n, m, a*ds + dy, b*ds + dx] = sum_r dot(wt[m, r], src[n, a*rs + row_off[r],
    # b*col_step + col_off:][:L]) for a in [a0, a1), b in [b0, b1): six outputs m x
    # two positions b per pass, twelve dot products whose accumulators LLVM keeps in
    # vector registers (8 loads per 12 FMA). Work items: (chunk of nc images, block
    # of ng groups of six outputs); a group reuses its weights over the chunk.
    n_img = y.shape[0]
    n_out = wt.shape[0]
    n_row = wt.shape[1]
    length = wt.shape[2]
    n_grp = (n_out + 5) // 6
    n_blk = (n_grp + ng - 1) // ng
    n_chunk = (n_img + nc - 1) // nc
    for idx in nb.prange(n_chunk * n_blk):
        ck = idx // n_blk
        bk = idx % n_blk
        for gp in range(bk * ng, min(n_grp, (bk + 1) * ng)):
            o0 = 6 * gp  # a short last group computes its last output again
            o1 = min(o0 + 1, n_out - 1)
            o2 = min(o0 + 2, n_out - 1)
            o3 = min(o0 + 3, n_out - 1)
            o4 = min(o0 + 4, n_out - 1)
            o5 = min(o0 + 5, n_out - 1)
            for n in range(ck * nc, min(n_img, (ck + 1) * nc)):
                img = src[n]
                for a in range(a0, a1):
                    ya = a * ds + dy
                    for b in range(b0, b1, 2):
                        bb = min(b + 1, b1 - 1)
                        s00 = s01 = s10 = s11 = s20 = s21 = np.float32(0.0)
                        s30 = s31 = s40 = s41 = s50 = s51 = np.float32(0.0)
                        for r in range(n_row):
                            xr = img[a * rs + row_off[r]]
                            x0 = xr[b * col_step + col_off:]
                            x1 = xr[bb * col_step + col_off:]
                            u0 = wt[o0, r]
                            u1 = wt[o1, r]
                            u2 = wt[o2, r]
                            u3 = wt[o3, r]
                            u4 = wt[o4, r]
                            u5 = wt[o5, r]
                            for t in range(length):
                                e0 = x0[t]
                                e1 = x1[t]
                                s00 += u0[t] * e0
                                s01 += u0[t] * e1
                                s10 += u1[t] * e0
                                s11 += u1[t] * e1
                                s20 += u2[t] * e0
                                s21 += u2[t] * e1
                                s30 += u3[t] * e0
                                s31 += u3[t] * e1
                                s40 += u4[t] * e0
                                s41 += u4[t] * e1
                                s50 += u5[t] * e0
                                s51 += u5[t] * e1
                        xa = b * ds + dx
                        xb = bb * ds + dx
                        y[n, o0, ya, xa] = s00
                        y[n, o0, ya, xb] = s01
                        y[n, o1, ya, xa] = s10
                        y[n, o1, ya, xb] = s11
                        y[n, o2, ya, xa] = s20
                        y[n, o2, ya, xb] = s21
                        y[n, o3, ya, xa] = s30
                        y[n, o3, ya, xb] = s31
                        y[n, o4, ya, xa] = s40
                        y[n, o4, ya, xb] = s41
                        y[n, o5, ya, xa] = s50
                        y[n, o5, ya, xb] = s51


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _chunk(size: int) -> int:
    """Images per vector loop: about _TARGET floats (1 image at 32x32, 20 at 8x8)."""
    return max(1, _TARGET // size)


def _planes(x: np.ndarray, s: int, sph: int, spw: int, pt: int, pl: int, hq: int,
            wq: int, side_by_side: bool = False) -> np.ndarray:
    """Phase planes (C*sph*spw, N*hq*wq + tail) of x (N, C, H, W); see the docstring.
    Images back to back (image n at n*hq*wq) or, side_by_side, row r of image n at
    (r*N + n)*wq: one hq x (N*wq) grid with no padding rows between images."""
    n, c = x.shape[:2]
    out = np.empty((c * sph * spw, n * hq * wq + 2 * wq + _TAIL), dtype=np.float32)
    istr, rstr = (wq, n * wq) if side_by_side else (hq * wq, wq)
    _phases(np.ascontiguousarray(x, dtype=np.float32), out, s, sph, spw, pt, pl, hq,
            wq, istr, rstr)
    return out


def _forward_taps(c: int, kh: int, kw: int, s: int, wq: int):
    """(plane, offset) of every tap (c, i, j) of the planes of x, sorted by plane,
    and the order of those taps in the (c, i, j) weight layout."""
    sph, spw = min(s, kh), min(s, kw)
    i = np.arange(kh)[:, None]
    j = np.arange(kw)[None, :]
    pl_ij = (i % s) * spw + (j % s)
    off_ij = (i // s) * wq + (j // s)
    plane = (np.arange(c)[:, None, None] * (sph * spw) + pl_ij[None]).ravel()
    off = np.broadcast_to(off_ij[None], (c, kh, kw)).ravel()
    # taps sorted by plane: a group of four then reads one or two planes, not four
    # (stride 2, 3x3: 1.5-2x faster forward); order maps sorted taps to weight order
    order = np.argsort(plane, kind="stable")
    return (sph, spw, plane[order].astype(np.int64), off[order].astype(np.int64),
            order)


def _use_rows(width: int, stride: int) -> bool:
    """Whether _conv_rows (dot products of `width` floats) beats the planes."""
    return width >= _ROWS_MIN or (stride > 1 and width >= _ROWS_MIN_STRIDED)


def _rows_layout(x: np.ndarray, pt: int, pl: int, n_row: int, n_col: int
                 ) -> np.ndarray:
    """x (N, C, H, W) as channel-last rows (N, n_row, n_col*C), shifted by (pt, pl)
    and zero-padded: the layout of _conv_rows."""
    n, c = x.shape[:2]
    out = np.empty((n, n_row, n_col * c), dtype=np.float32)
    _rows(np.ascontiguousarray(x, dtype=np.float32), out, pt, pl)
    return out


def _rows_blocks(n_img: int, n_out: int, img_floats: int) -> tuple[int, int]:
    """(images per chunk, six-output groups per block) for _conv_rows: a chunk fits
    half the L2 (1 MiB per core here) and divides the batch (prange hands each
    thread an equal range of work items, so they must be of equal size), and
    there are at least 8 work items per thread."""
    most = max(1, min(n_img, _CHUNK_BYTES // (4 * img_floats)))
    nc = max(d for d in range(1, most + 1) if n_img % d == 0)
    n_grp = _cdiv(n_out, 6)
    n_chunk = n_img // nc
    want = 8 * nb.get_num_threads()
    ng = n_grp
    while ng > 1 and n_chunk * _cdiv(n_grp, ng) < want:
        ng = _cdiv(ng, 2)
    return nc, ng


def _forward_rows(x: np.ndarray, w: np.ndarray, s: int, pad: int) -> np.ndarray:
    """conv2d_forward by _conv_rows: one dot product of kw*C floats per kernel row."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh, ow = out_size(h, kh, s, pad), out_size(wd, kw, s, pad)
    hp, wp = h + 2 * pad, wd + 2 * pad
    xr = _rows_layout(x, pad, pad, hp, wp)
    wt = np.ascontiguousarray(w.transpose(0, 2, 3, 1), dtype=np.float32)
    y = np.empty((n, o, oh, ow), dtype=np.float32)
    nc, ng = _rows_blocks(n, o, hp * wp * c)
    _conv_rows(xr, wt.reshape(o, kh, kw * c), np.arange(kh, dtype=np.int64), s, s * c,
               0, nc, ng, 0, oh, 0, ow, 1, 0, 0, y)
    return y


def _forward_planes(x: np.ndarray, w: np.ndarray, s: int, pad: int) -> np.ndarray:
    """conv2d_forward by _conv_taps on the phase planes (narrow layers)."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh, ow = out_size(h, kh, s, pad), out_size(wd, kw, s, pad)
    hq, wq = _cdiv(h + 2 * pad, s), _cdiv(wd + 2 * pad, s)
    sph, spw, plane, off, order = _forward_taps(c, kh, kw, s, wq)
    xs = _planes(x, s, sph, spw, pad, pad, hq, wq)
    y = np.empty((n, o, oh, ow), dtype=np.float32)
    wt = np.ascontiguousarray(w.reshape(o, c * kh * kw)[:, order], dtype=np.float32)
    size = hq * wq
    _conv_taps(xs, plane, off, wt, size, wq, _chunk(size), 0, oh, 0, ow, 1, 0, 0, y)
    return y


def conv2d_forward(x: np.ndarray, w: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """y = conv(x, w): x (N, C, H, W) f4, w (O, C, kh, kw) f4 -> y (N, O, OH, OW) f4.

    Rows of kw*C floats that are wide enough (_use_rows) take _conv_rows, narrower
    ones the phase planes."""
    if _use_rows(w.shape[3] * w.shape[1], stride):
        return _forward_rows(x, w, stride, pad)
    return _forward_planes(x, w, stride, pad)


def conv2d_grad_weight(x: np.ndarray, grad_out: np.ndarray, kshape: tuple,
                       stride: int, pad: int) -> np.ndarray:
    """dL/dw (O, C, kh, kw) f4 from the layer input x and grad_out (N, O, OH, OW)."""
    n, c, h, wd = x.shape
    o, _, kh, kw = kshape
    s = stride
    oh = grad_out.shape[2]
    hq, wq = _cdiv(h + 2 * pad, s), _cdiv(wd + 2 * pad, s)
    # the images side by side: one grid of rows N*wq wide, whose dot products run
    # over the oh output rows only (4x4 images: 67 % of the grid is output, not 44)
    sph, spw, plane, off, order = _forward_taps(c, kh, kw, s, n * wq)
    xs = _planes(x, s, sph, spw, pad, pad, hq, wq, side_by_side=True)
    gs = _planes(grad_out, 1, 1, 1, 0, 0, oh, wq, side_by_side=True)
    # threads split the rows when that leaves long dot products, else the outputs
    # (no partial sums then; a 4x4 layer's half of the rows is 384 floats, so the
    # per-dot overhead, twelve horizontal sums and slices, took a third)
    n_thr = nb.get_num_threads()
    kc = max(1, min(oh, n_thr)) if oh * n * wq >= _GW_SPLIT_ROWS * n_thr else 1
    n_oc = 1 if kc > 1 else min(n_thr, _cdiv(o, 2))
    part = np.empty((kc, o, c * kh * kw), dtype=np.float32)
    _conv_taps_gw(xs, gs, plane, off, order.astype(np.int64), oh, n * wq, n_oc, part)
    grad_w = part[0] if kc == 1 else part.sum(axis=0)
    return grad_w.reshape(kshape)


def conv2d_grad_input(grad_out: np.ndarray, w: np.ndarray, in_shape: tuple,
                      stride: int, pad: int) -> np.ndarray:
    """dL/dx (N, C, H, W) f4 from grad_out (N, O, OH, OW) and the weights w.

    Stride 1: a convolution of grad_out with the flipped, transposed kernel.
    Stride s > 1: one stride-1 correlation per phase (pi, pj) of the padded input
    gradient, each written straight to rows s*r + pi - pad, columns s*q + pj - pad.
    Rows of kw*O floats that are wide enough (_use_rows) take _conv_rows, narrower
    ones the phase planes.
    """
    o, _, _, kw = w.shape
    g = np.ascontiguousarray(grad_out, dtype=np.float32)
    if _use_rows(o * kw, stride):
        return _grad_input_rows(g, w, in_shape, stride, pad)
    return _grad_input_planes(g, w, in_shape, stride, pad)


def _grad_input_rows(g: np.ndarray, w: np.ndarray, in_shape: tuple, s: int,
                     pad: int) -> np.ndarray:
    """conv2d_grad_input by _conv_rows on grad_out in channel-last rows."""
    n, c, h, wd = in_shape
    o, _, kh, kw = w.shape
    oh, ow = g.shape[2], g.shape[3]
    grad_x = np.empty(in_shape, dtype=np.float32)
    if s == 1 and pad <= kh - 1 and pad <= kw - 1:
        pt, pl = kh - 1 - pad, kw - 1 - pad
        hg, wg = oh + 2 * pt, ow + 2 * pl
        gr = _rows_layout(g, pt, pl, hg, wg)
        # wt[c, i, j, o] = w[o, c, kh-1-i, kw-1-j]
        wt = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 2, 3, 0),
                                  dtype=np.float32)
        nc, ng = _rows_blocks(n, c, hg * wg * o)
        _conv_rows(gr, wt.reshape(c, kh, kw * o), np.arange(kh, dtype=np.int64), 1, o,
                   0, nc, ng, 0, h, 0, wd, 1, 0, 0, grad_x)
        return grad_x
    hq, wq = _cdiv(h + 2 * pad, s), _cdiv(wd + 2 * pad, s)
    dr, dc = (kh - 1) // s, (kw - 1) // s
    hg, wg = hq + dr, wq + dc
    gr = _rows_layout(g, dr, dc, hg, wg)  # grad_out shifted by (dr, dc)
    nc, ng = _rows_blocks(n, c, hg * wg * o)
    w_t = w.transpose(1, 2, 3, 0)  # (C, kh, kw, O)
    for pi in range(s):
        for pj in range(s):
            ii, jj = np.arange(pi, kh, s), np.arange(pj, kw, s)
            r0, r1 = max(0, _cdiv(pad - pi, s)), min(hq, (h - 1 + pad - pi) // s + 1)
            q0, q1 = max(0, _cdiv(pad - pj, s)), min(wq, (wd - 1 + pad - pj) // s + 1)
            if r1 <= r0 or q1 <= q0:
                continue
            if ii.size == 0 or jj.size == 0:  # no tap reaches this phase
                grad_x[:, :, s * r0 + pi - pad::s, s * q0 + pj - pad::s] = 0.0
                continue
            # tap u of the phase reads grad_out row r - u (row r + dr - u of gr); its
            # columns q - v for v = nv-1 .. 0 are one contiguous window of nv*O floats
            wt = np.ascontiguousarray(w_t[:, ii][:, :, jj[::-1]], dtype=np.float32)
            row_off = dr - np.arange(ii.size, dtype=np.int64)
            _conv_rows(gr, wt.reshape(c, ii.size, jj.size * o), row_off, 1, o,
                       (dc - jj.size + 1) * o, nc, ng, r0, r1, q0, q1, s, pi - pad,
                       pj - pad, grad_x)
    return grad_x


def _grad_input_planes(g: np.ndarray, w: np.ndarray, in_shape: tuple, stride: int,
                       pad: int) -> np.ndarray:
    """conv2d_grad_input by _conv_taps on the phase planes of grad_out."""
    _, c, h, wd = in_shape
    o, _, kh, kw = w.shape
    s = stride
    oh, ow = g.shape[2], g.shape[3]
    grad_x = np.empty(in_shape, dtype=np.float32)
    if s == 1 and pad <= kh - 1 and pad <= kw - 1:
        pt, pl = kh - 1 - pad, kw - 1 - pad
        hq, wq = oh + 2 * pt, ow + 2 * pl
        gs = _planes(g, 1, 1, 1, pt, pl, hq, wq)
        w_flip = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)
        wt = np.ascontiguousarray(w_flip, dtype=np.float32).reshape(c, o * kh * kw)
        off_ij = (np.arange(kh)[:, None] * wq + np.arange(kw)[None, :]).ravel()
        plane = np.repeat(np.arange(o, dtype=np.int64), kh * kw)
        off = np.tile(off_ij, o).astype(np.int64)
        size = hq * wq
        _conv_taps(gs, plane, off, wt, size, wq, _chunk(size), 0, h, 0, wd, 1, 0, 0,
                   grad_x)
        return grad_x
    hq, wq = _cdiv(h + 2 * pad, s), _cdiv(wd + 2 * pad, s)
    dr, dc = (kh - 1) // s, (kw - 1) // s
    hg, wg = hq + dr, wq + dc
    gs = _planes(g, 1, 1, 1, dr, dc, hg, wg)  # grad_out shifted by (dr, dc)
    size = hg * wg
    w_t = w.transpose(1, 0, 2, 3)  # (C, O, kh, kw)
    for pi in range(s):
        for pj in range(s):
            ii, jj = np.arange(pi, kh, s), np.arange(pj, kw, s)
            # phase rows/columns that land inside the unpadded input
            r0, r1 = max(0, _cdiv(pad - pi, s)), min(hq, (h - 1 + pad - pi) // s + 1)
            q0, q1 = max(0, _cdiv(pad - pj, s)), min(wq, (wd - 1 + pad - pj) // s + 1)
            if r1 <= r0 or q1 <= q0:
                continue
            rows = slice(s * r0 + pi - pad, s * (r1 - 1) + pi - pad + 1, s)
            cols = slice(s * q0 + pj - pad, s * (q1 - 1) + pj - pad + 1, s)
            if ii.size == 0 or jj.size == 0:  # no tap reaches this phase
                grad_x[:, :, rows, cols] = 0.0
                continue
            plane = np.repeat(np.arange(o, dtype=np.int64), ii.size * jj.size)
            off_ij = ((dr - ii[:, None] // s) * wg + (dc - jj[None, :] // s)).ravel()
            off = np.tile(off_ij, o).astype(np.int64)
            wt = np.ascontiguousarray(w_t[:, :, ii][:, :, :, jj],
                                      dtype=np.float32).reshape(c, -1)
            _conv_taps(gs, plane, off, wt, size, wg, _chunk(size), r0, r1, q0, q1, s,
                       pi - pad, pj - pad, grad_x)
    return grad_x
