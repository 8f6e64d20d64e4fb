"""The dense direct convolution on channel-last rows (wide layers).

``conv.py`` picks this layout or ``conv_planes.py`` per layer (its docstring has
the measurements).

How it works
------------
The phase planes keep two accumulators per pass in memory (loads and stores per
FMA), and their grid computes garbage columns and, for stride 2, every tap of every
phase. When the rows of the kernel are wide (kw*C floats, ``conv._use_rows``),
forward and grad_input instead copy the input into zero-padded channel-last rows
(N, HP, WP*C): kernel row i of output (a, b) then reads one contiguous window of
kw*C floats, xrow[s*a + i][s*b*C:][:kw*C], and its weights w[o, c, i, :]
transposed to (O, kh, kw*C) are contiguous too. Each output is kh dot products; a
pass computes six output channels x two output columns, twelve dot products whose
accumulators LLVM keeps in vector registers (8 loads per 12 FMA, no stores), and
only outputs that exist (stride 2 included). Work items are (chunk of images that
fits half the L2, block of six-output groups), so one group's weights are reused
over the chunk. grad_input uses the same kernel on grad_out in rows: stride 1 with
the flipped kernel; stride s per phase (pi, pj), the taps u, v of the phase reading
row r - u and the window of columns q - v (v descending) of grad_out, shifted by
(dr, dc) so no index is negative.
"""

import numba as nb
import numpy as np

from .config import JIT_PARALLEL_FASTMATH, kernel
from .geometry import cdiv, out_size

_CHUNK_BYTES = 512 << 10  # images of one _conv_rows work item: half of the L2


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
    n_grp = cdiv(n_out, 6)
    n_chunk = n_img // nc
    want = 8 * nb.get_num_threads()
    ng = n_grp
    while ng > 1 and n_chunk * cdiv(n_grp, ng) < want:
        ng = cdiv(ng, 2)
    return nc, ng


def forward(x: np.ndarray, w: np.ndarray, s: int, pad: int) -> np.ndarray:
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


def grad_input(g: np.ndarray, w: np.ndarray, in_shape: tuple, s: int,
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
    hq, wq = cdiv(h + 2 * pad, s), cdiv(wd + 2 * pad, s)
    dr, dc = (kh - 1) // s, (kw - 1) // s
    hg, wg = hq + dr, wq + dc
    gr = _rows_layout(g, dr, dc, hg, wg)  # grad_out shifted by (dr, dc)
    nc, ng = _rows_blocks(n, c, hg * wg * o)
    w_t = w.transpose(1, 2, 3, 0)  # (C, kh, kw, O)
    for pi in range(s):
        for pj in range(s):
            ii, jj = np.arange(pi, kh, s), np.arange(pj, kw, s)
            r0, r1 = max(0, cdiv(pad - pi, s)), min(hq, (h - 1 + pad - pi) // s + 1)
            q0, q1 = max(0, cdiv(pad - pj, s)), min(wq, (wd - 1 + pad - pj) // s + 1)
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
