"""The dense direct convolution on zero-padded "phase planes" (narrow layers).

``conv.py`` picks this layout or ``conv_rows.py`` per layer (its docstring has the
measurements); this module holds the planes' layout and its three tap loops.

How it works
------------
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
still run long vector loops (chunk). Loops are rounded up to 32 elements (the
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

The CSR kernels (``csr_gather.py``) read the same planes.
"""

import numba as nb
import numpy as np

from .config import JIT_PARALLEL_FASTMATH, kernel
from .geometry import cdiv, out_size

# fastmath without nnan/ninf: NaN and inf still propagate (divergence stays visible)
VL = 32        # vector loops are rounded up to a multiple of this many floats
_TAIL = 2 * VL  # zero floats after the last image of every plane
_TARGET = 2048  # floats per vector loop: several small images are processed at once
_GW_SPLIT_ROWS = 8192  # grad_weight: dot length from which threads split rows


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
        length = ((n_hi - n_lo - 1) * size + (a1 - 1) * wq + b1 - t0 + VL - 1
                  ) // VL * VL
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


def chunk(size: int) -> int:
    """Images per vector loop: about _TARGET floats (1 image at 32x32, 20 at 8x8)."""
    return max(1, _TARGET // size)


def planes(x: np.ndarray, s: int, sph: int, spw: int, pt: int, pl: int, hq: int,
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


def forward_taps(c: int, kh: int, kw: int, s: int, wq: int):
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


def forward(x: np.ndarray, w: np.ndarray, s: int, pad: int) -> np.ndarray:
    """conv2d_forward by _conv_taps on the phase planes (narrow layers)."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh, ow = out_size(h, kh, s, pad), out_size(wd, kw, s, pad)
    hq, wq = cdiv(h + 2 * pad, s), cdiv(wd + 2 * pad, s)
    sph, spw, plane, off, order = forward_taps(c, kh, kw, s, wq)
    xs = planes(x, s, sph, spw, pad, pad, hq, wq)
    y = np.empty((n, o, oh, ow), dtype=np.float32)
    wt = np.ascontiguousarray(w.reshape(o, c * kh * kw)[:, order], dtype=np.float32)
    size = hq * wq
    _conv_taps(xs, plane, off, wt, size, wq, chunk(size), 0, oh, 0, ow, 1, 0, 0, y)
    return y


def grad_weight(x: np.ndarray, grad_out: np.ndarray, kshape: tuple, stride: int,
                pad: int) -> np.ndarray:
    """conv2d_grad_weight by _conv_taps_gw: the images side by side on the planes."""
    n, c, h, wd = x.shape
    o, _, kh, kw = kshape
    s = stride
    oh = grad_out.shape[2]
    hq, wq = cdiv(h + 2 * pad, s), cdiv(wd + 2 * pad, s)
    # the images side by side: one grid of rows N*wq wide, whose dot products run
    # over the oh output rows only (4x4 images: 67 % of the grid is output, not 44)
    sph, spw, plane, off, order = forward_taps(c, kh, kw, s, n * wq)
    xs = planes(x, s, sph, spw, pad, pad, hq, wq, side_by_side=True)
    gs = planes(grad_out, 1, 1, 1, 0, 0, oh, wq, side_by_side=True)
    # threads split the rows when that leaves long dot products, else the outputs
    # (no partial sums then; a 4x4 layer's half of the rows is 384 floats, so the
    # per-dot overhead, twelve horizontal sums and slices, took a third)
    n_thr = nb.get_num_threads()
    kc = max(1, min(oh, n_thr)) if oh * n * wq >= _GW_SPLIT_ROWS * n_thr else 1
    n_oc = 1 if kc > 1 else min(n_thr, cdiv(o, 2))
    part = np.empty((kc, o, c * kh * kw), dtype=np.float32)
    _conv_taps_gw(xs, gs, plane, off, order.astype(np.int64), oh, n * wq, n_oc, part)
    grad_w = part[0] if kc == 1 else part.sum(axis=0)
    return grad_w.reshape(kshape)


def grad_input(g: np.ndarray, w: np.ndarray, in_shape: tuple, stride: int,
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
        gs = planes(g, 1, 1, 1, pt, pl, hq, wq)
        w_flip = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)
        wt = np.ascontiguousarray(w_flip, dtype=np.float32).reshape(c, o * kh * kw)
        off_ij = (np.arange(kh)[:, None] * wq + np.arange(kw)[None, :]).ravel()
        plane = np.repeat(np.arange(o, dtype=np.int64), kh * kw)
        off = np.tile(off_ij, o).astype(np.int64)
        size = hq * wq
        _conv_taps(gs, plane, off, wt, size, wq, chunk(size), 0, h, 0, wd, 1, 0, 0,
                   grad_x)
        return grad_x
    hq, wq = cdiv(h + 2 * pad, s), cdiv(wd + 2 * pad, s)
    dr, dc = (kh - 1) // s, (kw - 1) // s
    hg, wg = hq + dr, wq + dc
    gs = planes(g, 1, 1, 1, dr, dc, hg, wg)  # grad_out shifted by (dr, dc)
    size = hg * wg
    w_t = w.transpose(1, 0, 2, 3)  # (C, O, kh, kw)
    for pi in range(s):
        for pj in range(s):
            ii, jj = np.arange(pi, kh, s), np.arange(pj, kw, s)
            # phase rows/columns that land inside the unpadded input
            r0, r1 = max(0, cdiv(pad - pi, s)), min(hq, (h - 1 + pad - pi) // s + 1)
            q0, q1 = max(0, cdiv(pad - pj, s)), min(wq, (wd - 1 + pad - pj) // s + 1)
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
            _conv_taps(gs, plane, off, wt, size, wg, chunk(size), r0, r1, q0, q1, s,
                       pi - pad, pj - pad, grad_x)
    return grad_x
