"""Sparse-activation kernels (SWAT): top-k selection, compression, weight gradients.

Contract: every array is C-contiguous; activations are float32 and viewed flat (the
C-order index of x[n, c, h, w] is ((n*C + c)*H + h)*W + w); kept positions are
int32 flat indices in increasing order, or a ``np.packbits`` bitmap (big bit order:
element t is bit 7 - t%8 of byte t//8). Public wrappers take raw arrays and check
shapes; the ``_kernels`` behind them are compiled once at import (explicit
signatures, ``cache=True``).

"Kept" means ``not (|x| <= threshold)``: |x| > threshold, and NaN (so a diverging
run stays visible in the gradients). Elements with |x| == threshold > 0 are ties;
the compress kernels keep the first ``tie_quota`` of them per chunk, in C order.
Exact zeros are never kept (the threshold is >= 0, and a tie needs |x| > 0).

Weight gradients (the "sparse" side is the layer input x, grad_out is dense):

* conv: dW[o, c, i, j] = sum over kept x[n, c, h, w] of x * g[n, o, oh, ow] with
  h = oh*s - pad + i, w = ow*s - pad + j. Each kept element scatters into the taps
  it touches, so the work is (kept taps) * O multiply-adds, independent of N*C*H*W.
  Two loop orders: for many kept elements grad_out is first transposed to
  (N, OH, OW, O) so every tap is one contiguous O-long multiply-add into a
  (C, kh, kw, O) buffer (vectorised); for few kept elements the transpose (a pass
  over all of grad_out) would cost more than the taps, so they read grad_out in
  place, one (o, tap) at a time. The kept list is split into one contiguous part
  per thread, each with its own partial dW (summed at the end): no atomics.
* linear: dW[o, i] = sum over kept x[n, i] of x * g[n, o]; the same scheme with
  an (I, O) buffer (rows of g are already contiguous).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ..errors import DTypeError, ShapeError
from .config import JIT, JIT_PARALLEL, JIT_PARALLEL_FASTMATH, kernel

CHUNK = 1 << 14  # elements per parallel chunk of x (a multiple of 8: bitmap bytes)
_RADIX = ((20, 2047), (10, 1023), (0, 1023))  # (shift, mask) of the 3 radix passes

_F4 = nb.types.Array(nb.float32, 1, "C")
_F4_RO = nb.types.Array(nb.float32, 1, "C", readonly=True)
_I4 = nb.types.Array(nb.int32, 1, "C")
_I8 = nb.types.Array(nb.int64, 1, "C")
_U1 = nb.types.Array(nb.uint8, 1, "C")


def _sigs(make):
    """The signature for a writable and a read-only x (pynndescent's pairs)."""
    return [make(_F4), make(_F4_RO)]


# ---------------------------------------------------------------- top-k threshold


@kernel(_sigs(lambda f: nb.void(f, nb.int64, nb.int64, nb.int64, nb.int64,
                                 nb.int64[:, ::1])), **JIT_PARALLEL)
def _radix_hist(x, shift, mask, prefix_shift, prefix, hist):  # pragma: no cover - compiled
    # hist[p, b] = #{t in part p : (bits(|x[t]|) >> prefix_shift) == prefix and
    #               (bits >> shift) & mask == b}; prefix_shift 32 matches everything.
    # uint32 arithmetic over a slice per part: 7.6 -> 5.0 ms for the three passes
    # over a (32, 64, 32, 32) ReLU output (one thread) against int64 and flat indices
    n = x.size
    n_part = hist.shape[0]
    bits = x.view(np.uint32)
    for p in nb.prange(n_part):
        row = hist[p]
        row[:] = 0
        part = bits[p * n // n_part:(p + 1) * n // n_part]
        if prefix_shift >= 32:
            for t in range(part.size):
                u = part[t] & np.uint32(0x7FFFFFFF)
                row[(u >> np.uint32(shift)) & np.uint32(mask)] += 1
        else:
            for t in range(part.size):
                u = part[t] & np.uint32(0x7FFFFFFF)
                if (u >> np.uint32(prefix_shift)) == np.uint32(prefix):
                    row[(u >> np.uint32(shift)) & np.uint32(mask)] += 1


def topk_abs_threshold(x: np.ndarray, k: int, n_part: int) -> float:
    """The k-th largest |x| (1 <= k <= x.size) of a flat float32 x, exactly.

    A three-pass radix select on the bit patterns of |x| (for non-negative floats
    the uint32 order is the numeric order; NaN sorts above inf): 11, 10 and 10
    bits, each pass a parallel histogram over ``n_part`` parts.
    """
    assert 1 <= k <= x.size and x.dtype == np.float32 and x.ndim == 1
    hist = np.empty((n_part, 2048), dtype=np.int64)
    prefix, prefix_shift = 0, 32
    for shift, mask in _RADIX:
        _radix_hist(x, shift, mask, prefix_shift, prefix, hist)
        counts = hist[:, :mask + 1].sum(axis=0)
        above = np.cumsum(counts[::-1])  # above[r]: elements in the top r+1 bins
        r = int(np.searchsorted(above, k))  # first r with above[r] >= k
        b = mask - r
        k -= int(above[r - 1]) if r > 0 else 0
        prefix = (prefix << (mask.bit_length())) | b
        prefix_shift = shift
    return float(np.array([prefix], dtype=np.uint32).view(np.float32)[0])


# ---------------------------------------------------------------- compression


@kernel(_sigs(lambda f: nb.void(f, nb.float32, nb.int64, _I8, _I8)), **JIT_PARALLEL)
def _count_kept(x, thr, chunk, n_gt, n_tie):  # pragma: no cover - compiled
    # per chunk: n_gt = #{not |x| <= thr}, n_tie = #{|x| == thr > 0}, as integer
    # compares of the bit patterns of |x| (see _byte_bits) over a slice per chunk:
    # 2x faster than float compares over flat indices (1.6 -> 0.8 ms for a
    # (32, 64, 32, 32) ReLU output, one thread)
    n = x.size
    u = x.view(np.uint32)
    thr_u = np.array([thr], dtype=np.float32).view(np.uint32)[0]
    for ck in nb.prange(n_gt.size):
        uc = u[ck * chunk:min(n, (ck + 1) * chunk)]
        gt = 0
        tie = 0
        for t in range(uc.size):
            a = uc[t] & np.uint32(0x7FFFFFFF)
            gt += a > thr_u
            tie += (a == thr_u) & (a != 0)
        n_gt[ck] = gt
        n_tie[ck] = tie


@nb.njit(inline="always")
def _byte_bits(u, t0, m, thr_u):  # pragma: no cover - compiled
    # bits of u[t0:t0+m] (m <= 8; element t0 is bit 7): kept (|x| > thr, or NaN)
    # and ties (|x| == thr > 0). u: bit patterns of x; for |x| the uint32 order
    # is the float order (NaN above inf), so integer compares suffice.
    gt = 0
    tie = 0
    for b in range(m):
        a = u[t0 + b] & np.uint32(0x7FFFFFFF)
        gt |= np.int64(a > thr_u) << (7 - b)
        tie |= np.int64((a == thr_u) & (a != 0)) << (7 - b)
    return gt, tie


_WRITE_SIG = _sigs(lambda f: nb.void(f, nb.float32, nb.int64, _I8, _I8, _U1, _I4, _F4))


@kernel(_WRITE_SIG, **JIT_PARALLEL)
def _write_kept(x, thr, chunk, start, quota, bitmap, indices,
                values):  # pragma: no cover - compiled
    # The kept elements of chunk ck go to values[start[ck]:start[ck+1]] and, when
    # indices.size > 0, their flat index to indices; when bitmap.size > 0, their
    # bits to bitmap. At most quota[ck] ties (the first ones) are kept.
    # In a chunk that keeps under 1/16 of its elements, blocks of 64 elements
    # with nothing above the threshold (and no tie quota left) are skipped after
    # an integer scan that stops at the first hit (in a denser chunk that scan
    # cost 40 % more than it saved). Otherwise eight
    # elements at a time: their bits first, then branch-free stores for a nonzero
    # byte (the zero pattern of a ReLU output is random: branches would
    # mispredict); the guard stops the store past the chunk's last slot (the next
    # chunk's first).
    n = x.size
    u = x.view(np.uint32)
    thr_u = np.array([thr], dtype=np.float32).view(np.uint32)[0]
    n_bytes = -(-n // 8)
    has_bitmap = bitmap.size > 0
    has_indices = indices.size > 0
    for ck in nb.prange(start.size):
        pos = start[ck]
        stop = start[ck + 1] if ck + 1 < start.size else values.size
        q = quota[ck]
        # the skip test pays only when most 64-blocks are empty
        is_sparse = (stop - pos) * 16 < chunk
        byte = ck * chunk // 8
        byte_end = min(n_bytes, (ck + 1) * chunk // 8)
        while byte < byte_end:
            t0 = 8 * byte
            if is_sparse and q == 0 and t0 + 64 <= n and byte + 8 <= byte_end:
                hit = False
                for t in range(t0, t0 + 64):
                    if (u[t] & np.uint32(0x7FFFFFFF)) > thr_u:
                        hit = True
                        break
                if not hit:
                    if has_bitmap:
                        bitmap[byte:byte + 8] = 0
                    byte += 8
                    continue
            m = min(8, n - t0)
            if m == 8:
                bits, tie = _byte_bits(u, t0, 8, thr_u)
            else:
                bits, tie = _byte_bits(u, t0, m, thr_u)
            while tie and q > 0:  # rare: keep the first ties while quota lasts
                first = 0x80  # the highest set bit is the lowest index
                while not (tie & first):
                    first >>= 1
                bits |= first
                tie &= ~first
                q -= 1
            if has_bitmap:
                bitmap[byte] = bits
            byte += 1
            if bits == 0:
                continue
            for b in range(m):
                if pos < stop:
                    values[pos] = x[t0 + b]
                    if has_indices:
                        indices[pos] = t0 + b
                pos += (bits >> (7 - b)) & 1


def compress_counts(x: np.ndarray, threshold: float, limit: int, chunk: int = CHUNK):
    """Count pass of the compressors: (start, quota) per chunk and the kept count.

    x: flat float32; keeps ``not (|x| <= threshold)`` plus at most
    ``limit - #(|x| > threshold)`` ties |x| == threshold > 0, the first in C order
    (``limit < 0``: every tie).
    """
    n_chunk = max(1, -(-x.size // chunk))
    n_gt = np.empty(n_chunk, dtype=np.int64)
    n_tie = np.empty(n_chunk, dtype=np.int64)
    _count_kept(x, np.float32(threshold), chunk, n_gt, n_tie)
    if limit < 0:
        quota = n_tie
    else:
        # ties allowed in total, handed out to the chunks in order
        allowed = max(0, limit - int(n_gt.sum()))
        before = np.cumsum(n_tie) - n_tie
        quota = np.clip(allowed - before, 0, n_tie)
    kept_per_chunk = n_gt + quota
    start = np.cumsum(kept_per_chunk) - kept_per_chunk
    return start, quota, int(kept_per_chunk.sum())


def compress_to_indices(x: np.ndarray, threshold: float, start: np.ndarray,
                        quota: np.ndarray, kept: int, chunk: int = CHUNK):
    """(indices int32 (kept,), values float32 (kept,)) of the kept elements of x."""
    indices = np.empty(kept, dtype=np.int32)
    values = np.empty(kept, dtype=np.float32)
    _write_kept(x, np.float32(threshold), chunk, start, quota,
                np.empty(0, dtype=np.uint8), indices, values)
    return indices, values


def compress_to_bitmap(x: np.ndarray, threshold: float, start: np.ndarray,
                       quota: np.ndarray, kept: int, chunk: int = CHUNK):
    """(bitmap uint8 (ceil(size/8),), values float32 (kept,)) of the kept elements."""
    bitmap = np.empty(-(-x.size // 8), dtype=np.uint8)
    values = np.empty(kept, dtype=np.float32)
    _write_kept(x, np.float32(threshold), chunk, start, quota, bitmap,
                np.empty(0, dtype=np.int32), values)
    return bitmap, values


@kernel(_sigs(lambda f: nb.void(f, nb.float32, nb.int64, nb.int64, _I4, _F4, _I8)),
         **JIT_PARALLEL)
def _scan_kept(x, thr, chunk, cap, idx_buf, val_buf,
               counts):  # pragma: no cover - compiled
    # One pass, every tie kept (no limit): the kept elements of chunk ck (|x| >=
    # thr and x != 0, or NaN: bits a >= thr_u and a != 0) go, in order, to
    # idx_buf/val_buf[ck*cap:(ck+1)*cap]; counts[ck] is their number, even past cap
    # (then only the first cap are written and the caller falls back). Blocks of
    # 64 are first tested by their largest |x| (a vectorised max), so a sparse
    # chunk is read about once.
    n = x.size
    u = x.view(np.uint32)
    thr_u = np.array([thr], dtype=np.float32).view(np.uint32)[0]
    for ck in nb.prange(counts.size):
        lo = ck * chunk
        hi = min(n, lo + chunk)
        uc = u[lo:hi]
        xc = x[lo:hi]
        ib = idx_buf[ck * cap:(ck + 1) * cap]
        vb = val_buf[ck * cap:(ck + 1) * cap]
        pos = 0
        j0 = 0
        while j0 < hi - lo:
            j1 = min(hi - lo, j0 + 64)
            mx = np.uint32(0)
            for j in range(j0, j1):
                mx = max(mx, uc[j] & np.uint32(0x7FFFFFFF))
            if mx >= thr_u and mx != 0:
                for j in range(j0, j1):
                    a = uc[j] & np.uint32(0x7FFFFFFF)
                    if a >= thr_u and a != 0:
                        if pos < cap:
                            ib[pos] = lo + j
                            vb[pos] = xc[j]
                        pos += 1
            j0 = j1
        counts[ck] = pos


@kernel("void(i4[::1], f4[::1], i8, i8[::1], i8[::1], i4[::1], f4[::1])",
         **JIT_PARALLEL)
def _gather_kept(idx_buf, val_buf, cap, counts, start, indices,
                 values):  # pragma: no cover - compiled
    for ck in nb.prange(counts.size):
        s = start[ck]
        for i in range(counts[ck]):
            indices[s + i] = idx_buf[ck * cap + i]
            values[s + i] = val_buf[ck * cap + i]


def compress_one_pass(x: np.ndarray, threshold: float, expect: int,
                      chunk: int = CHUNK):
    """(indices int32, values float32) of every element with |x| >= threshold and
    x != 0 (and NaN) of a flat float32 x, in one read of x; None if a chunk holds
    more than its share of about 2 * ``expect`` (then use the count + write pass).

    For threshold reuse (no tie limit) at a low keep: scratch of about
    16 * expect bytes instead of a count pass over x. Measured (one thread, a
    (32, 64, 32, 32) ReLU output): 1.9 vs 2.3 ms at keep 0.001, 3.3 vs 4.6 at
    0.01, 6.8 vs 11.2 at 0.03.
    """
    n_chunk = max(1, -(-x.size // chunk))
    cap = min(chunk, 2 * -(-max(expect, 1) // n_chunk) + 64)
    idx_buf = np.empty(n_chunk * cap, dtype=np.int32)
    val_buf = np.empty(n_chunk * cap, dtype=np.float32)
    counts = np.empty(n_chunk, dtype=np.int64)
    _scan_kept(x, np.float32(threshold), chunk, cap, idx_buf, val_buf, counts)
    if int(counts.max()) > cap:
        return None
    start = np.cumsum(counts) - counts
    kept = int(counts.sum())
    indices = np.empty(kept, dtype=np.int32)
    values = np.empty(kept, dtype=np.float32)
    _gather_kept(idx_buf, val_buf, cap, counts, start, indices, values)
    return indices, values


@kernel("void(u1[::1], i8, i8[::1], i4[::1])", **JIT_PARALLEL)
def _bitmap_indices(bitmap, chunk_bytes, start, indices):  # pragma: no cover - compiled
    for ck in nb.prange(start.size):
        pos = start[ck]
        for byte in range(ck * chunk_bytes, min(bitmap.size, (ck + 1) * chunk_bytes)):
            bits = np.int64(bitmap[byte])
            b = 0
            while bits:
                if bits & 0x80:
                    indices[pos] = 8 * byte + b
                    pos += 1
                bits = (bits << 1) & 0xFF
                b += 1


@kernel("void(u1[::1], i8, i8[::1])", **JIT_PARALLEL)
def _bitmap_counts(bitmap, chunk_bytes, counts):  # pragma: no cover - compiled
    for ck in nb.prange(counts.size):
        total = 0
        for byte in range(ck * chunk_bytes, min(bitmap.size, (ck + 1) * chunk_bytes)):
            v = np.int64(bitmap[byte])
            v = v - ((v >> 1) & 0x55)
            v = (v & 0x33) + ((v >> 2) & 0x33)
            total += (v + (v >> 4)) & 0x0F
        counts[ck] = total


def bitmap_to_indices(bitmap: np.ndarray, kept: int) -> np.ndarray:
    """Flat int32 indices (kept,) of the set bits of a packbits bitmap, increasing."""
    chunk_bytes = CHUNK // 8
    counts = np.empty(max(1, -(-bitmap.size // chunk_bytes)), dtype=np.int64)
    _bitmap_counts(bitmap, chunk_bytes, counts)
    start = np.cumsum(counts) - counts
    indices = np.empty(kept, dtype=np.int32)
    assert int(counts.sum()) == kept
    _bitmap_indices(bitmap, chunk_bytes, start, indices)
    return indices


# ---------------------------------------------------------------- weight gradients


@nb.njit(inline="always")
def _tap_range(pos, pad, k, n_out, s):  # pragma: no cover - compiled
    # taps i in [lo, hi) step s with 0 <= (pos + pad - i) / s < n_out, an integer
    yy = pos + pad
    first = max(0, yy - (n_out - 1) * s)
    lo = first + (yy - first) % s
    hi = min(k - 1, yy) + 1
    return lo, max(lo, hi)


_CONV_SIG = ("i8(i4[::1], f4[::1], i8, i8, i8, f4[:, :, :, ::1], i8, i8, i8, i8,"
             " f4[:, :, :, :, ::1])")


@kernel(_CONV_SIG, **JIT_PARALLEL_FASTMATH)
def _conv_gw_nhwc(indices, values, n_ch, h, w, gt, kh, kw, s, pad,
                  part):  # pragma: no cover - compiled
    # gt: grad_out as (N, OH, OW, O); part[p]: (C, kh, kw, O) partial dW of the
    # p-th slice of the kept list. Returns the number of taps (MACs / O).
    n_kept = indices.size
    n_part = part.shape[0]
    oh_n, ow_n, n_out = gt.shape[1], gt.shape[2], gt.shape[3]
    taps = np.zeros(n_part, dtype=np.int64)
    for p in nb.prange(n_part):
        acc = part[p]
        acc[:] = 0.0
        count = 0
        e = p * n_kept // n_part
        e_hi = (p + 1) * n_kept // n_part
        while e < e_hi:
            # one row (n, c, y) of x at a time: divisions once per row, not element
            r = np.int64(indices[e]) // w
            n = r // (n_ch * h)
            c = (r // h) % n_ch
            y = r % h
            base = r * w
            i0, i1 = _tap_range(y, pad, kh, oh_n, s)
            while e < e_hi and indices[e] < base + w:
                x = indices[e] - base
                v = values[e]
                e += 1
                j0, j1 = _tap_range(x, pad, kw, ow_n, s)
                for i in range(i0, i1, s):
                    g_row = gt[n, (y + pad - i) // s]
                    a_row = acc[c, i]
                    for j in range(j0, j1, s):
                        g = g_row[(x + pad - j) // s]
                        a = a_row[j]
                        for o in range(n_out):
                            a[o] += v * g[o]
                        count += 1
        taps[p] = count
    return taps.sum()


@kernel(_CONV_SIG, **JIT_PARALLEL_FASTMATH)
def _conv_gw_nchw(indices, values, n_ch, h, w, g, kh, kw, s, pad,
                  part):  # pragma: no cover - compiled
    # g: grad_out as given (N, O, OH, OW); part[p]: (O, C, kh, kw). For few kept
    # elements: no transpose of grad_out, each (o, tap) is one scalar multiply-add.
    n_kept = indices.size
    n_part = part.shape[0]
    n_out, oh_n, ow_n = g.shape[1], g.shape[2], g.shape[3]
    taps = np.zeros(n_part, dtype=np.int64)
    for p in nb.prange(n_part):
        acc = part[p]
        acc[:] = 0.0
        count = 0
        e = p * n_kept // n_part
        e_hi = (p + 1) * n_kept // n_part
        while e < e_hi:
            r = np.int64(indices[e]) // w
            n = r // (n_ch * h)
            c = (r // h) % n_ch
            y = r % h
            base = r * w
            i0, i1 = _tap_range(y, pad, kh, oh_n, s)
            n_i = (i1 - i0 + s - 1) // s
            while e < e_hi and indices[e] < base + w:
                x = indices[e] - base
                v = values[e]
                e += 1
                j0, j1 = _tap_range(x, pad, kw, ow_n, s)
                count += n_i * ((j1 - j0 + s - 1) // s)
                for o in range(n_out):
                    g_img = g[n, o]
                    a_k = acc[o, c]
                    for i in range(i0, i1, s):
                        g_row = g_img[(y + pad - i) // s]
                        for j in range(j0, j1, s):
                            a_k[i, j] += v * g_row[(x + pad - j) // s]
        taps[p] = count
    return taps.sum()


@kernel("i8(i4[::1], i8, i8, i8, i8, i8, i8, i8)", **JIT)
def _conv_taps_count(indices, n_ch, h, w, kh, kw, s, pad):  # pragma: no cover - compiled
    # number of (kept element, tap) pairs that land inside grad_out
    oh_n = (h + 2 * pad - kh) // s + 1
    ow_n = (w + 2 * pad - kw) // s + 1
    count = 0
    e = 0
    while e < indices.size:
        r = np.int64(indices[e]) // w  # one row of x at a time, as in _conv_gw_*
        base = r * w
        i0, i1 = _tap_range(r % h, pad, kh, oh_n, s)
        n_i = (i1 - i0 + s - 1) // s
        while e < indices.size and indices[e] < base + w:
            j0, j1 = _tap_range(indices[e] - base, pad, kw, ow_n, s)
            count += n_i * ((j1 - j0 + s - 1) // s)
            e += 1
    return count


@kernel("void(f4[:, :, :, ::1], f4[:, :, :, ::1])", **JIT_PARALLEL)
def _to_nhwc(g, out):  # pragma: no cover - compiled
    n_img, n_out, oh_n, ow_n = g.shape
    for idx in nb.prange(n_img * oh_n):
        n = idx // oh_n
        a = idx % oh_n
        for b in range(ow_n):
            row = out[n, a, b]
            for o in range(n_out):
                row[o] = g[n, o, a, b]


@kernel("void(i4[::1], f4[::1], i8, f4[:, ::1], f4[:, :, ::1])",
         **JIT_PARALLEL_FASTMATH)
def _linear_gw(indices, values, n_in, g, part):  # pragma: no cover - compiled
    # part[p]: (I, O) partial dW^T of the p-th slice of the kept list
    n_kept = indices.size
    n_part = part.shape[0]
    n_out = g.shape[1]
    for p in nb.prange(n_part):
        acc = part[p]
        acc[:] = 0.0
        for e in range(p * n_kept // n_part, (p + 1) * n_kept // n_part):
            f = np.int64(indices[e])
            v = values[e]
            a = acc[f % n_in]
            g_row = g[f // n_in]
            for o in range(n_out):
                a[o] += v * g_row[o]


# In-place loop order (no transpose) while kept taps * 8 < N*OH*OW. Measured
# single-threaded, batch 32 (ms, in place / transposed, at taps / (N*OH*OW)):
# 16@32 k3: 0.24/0.30 at 0.14, 0.64/0.40 at 0.41; 64@8 k3: 0.17/0.10 at 0.50;
# 16@32 k1 s2: 0.05/0.12 at 0.02, 0.12/0.14 at 0.05, 0.36/0.24 at 0.16.
_NCHW_FACTOR = 8


# Above these kept fractions the dense grad_weight on the decompressed input is
# faster than the sparse kernel (tools/bench_sparse_grad.py, batch 32, ResNet-8
# shapes: the sparse kernel wins below ~0.1 kept for 3x3 kernels and below ~0.01
# for the 1x1 stride-2 shortcuts).
_SPARSE_GRAD_MAX_KEPT = {1: 0.01}
_SPARSE_GRAD_MAX_KEPT_DEFAULT = 0.1


def prefer_sparse_grad(kept_fraction: float, kernel_size: int) -> bool:
    """Whether conv2d_grad_weight_sparse beats the dense kernel at this kept fraction."""
    limit = _SPARSE_GRAD_MAX_KEPT.get(kernel_size, _SPARSE_GRAD_MAX_KEPT_DEFAULT)
    return kept_fraction <= limit


def _num_parts(n_kept: int) -> int:
    # one slice of the kept list per thread; one slice when too few to share
    return max(1, min(nb.get_num_threads(), n_kept // 2048))


def _check_sparse(indices, values, size: int, what: str) -> None:
    if indices.dtype != np.int32 or values.dtype != np.float32:
        raise DTypeError(f"{what}: expected int32 indices and float32 values, got "
                         f"{indices.dtype} and {values.dtype}; use .astype")
    if indices.ndim != 1 or indices.shape != values.shape:
        raise ShapeError(f"{what}: expected indices and values of one shape (K,), "
                         f"got {indices.shape} and {values.shape}")
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= size):
        raise ShapeError(f"{what}: expected indices in [0, {size}), got "
                         f"[{int(indices.min())}, {int(indices.max())}]")


def conv2d_grad_weight_sparse_macs(indices: np.ndarray, x_shape: tuple,
                                   out_shape: tuple, kshape: tuple, stride: int,
                                   pad: int) -> int:
    """Multiply-adds that :func:`conv2d_grad_weight_sparse` performs (exactly).

    One per (kept element, tap inside grad_out, output channel); ``out_shape`` is
    grad_out's (N, O, OH, OW), checked against the others. The dense
    ``conv.conv2d_grad_weight`` does N*O*OH*OW*C*kh*kw.
    """
    n, c, h, w = x_shape
    o, _, kh, kw = kshape
    oh = (h + 2 * pad - kh) // stride + 1
    ow = (w + 2 * pad - kw) // stride + 1
    if tuple(out_shape) != (n, o, oh, ow):
        raise ShapeError(f"conv2d_grad_weight_sparse_macs: expected out_shape "
                         f"{(n, o, oh, ow)}, got {tuple(out_shape)}")
    idx = np.ascontiguousarray(indices, dtype=np.int32)
    return o * int(_conv_taps_count(idx, c, h, w, kh, kw, stride, pad))


def conv2d_grad_weight_sparse_count(indices: np.ndarray, values: np.ndarray,
                                    x_shape: tuple, grad_out: np.ndarray,
                                    kshape: tuple, stride: int, pad: int):
    """:func:`conv2d_grad_weight_sparse` and the multiply-adds it executed."""
    n, c, h, w = x_shape
    o, c_w, kh, kw = kshape
    what = "conv2d_grad_weight_sparse"
    _check_sparse(indices, values, n * c * h * w, what)
    oh = (h + 2 * pad - kh) // stride + 1
    ow = (w + 2 * pad - kw) // stride + 1
    if c_w != c or grad_out.shape != (n, o, oh, ow):
        raise ShapeError(f"{what}: expected kshape (O, {c}, kh, kw) and grad_out of "
                         f"shape {(n, o, oh, ow)}, got {tuple(kshape)} and "
                         f"{tuple(grad_out.shape)}")
    g = np.ascontiguousarray(grad_out, dtype=np.float32)
    n_part = _num_parts(indices.size)
    # kept taps, estimated from the kept count (boundary taps are rarer)
    est_taps = indices.size * -(-kh // stride) * -(-kw // stride)
    if est_taps * _NCHW_FACTOR < n * oh * ow:
        part = np.empty((n_part, o, c, kh, kw), dtype=np.float32)
        taps = _conv_gw_nchw(indices, values, c, h, w, g, kh, kw, stride, pad, part)
        grad_w = part[0] if n_part == 1 else part.sum(axis=0)
        return grad_w, int(taps) * o
    gt = np.empty((n, oh, ow, o), dtype=np.float32)
    _to_nhwc(g, gt)
    part = np.empty((n_part, c, kh, kw, o), dtype=np.float32)
    taps = _conv_gw_nhwc(indices, values, c, h, w, gt, kh, kw, stride, pad, part)
    grad_w = part[0] if n_part == 1 else part.sum(axis=0)
    return np.ascontiguousarray(grad_w.transpose(3, 0, 1, 2)), int(taps) * o


def conv2d_grad_weight_sparse(indices: np.ndarray, values: np.ndarray,
                              x_shape: tuple, grad_out: np.ndarray, kshape: tuple,
                              stride: int, pad: int) -> np.ndarray:
    """dL/dw (O, C, kh, kw) f4 from the kept elements of the layer input.

    Equals ``conv.conv2d_grad_weight(x_masked, grad_out, kshape, stride, pad)``
    where x_masked (N, C, H, W) = ``x_shape`` holds ``values`` (K,) f4 at the flat
    C-order positions ``indices`` (K,) i4 and zeros elsewhere. grad_out:
    (N, O, OH, OW) f4. Work: :func:`conv2d_grad_weight_sparse_macs` multiply-adds
    plus, when many elements are kept, one transpose of grad_out. Wraps
    ``_conv_gw_nhwc`` / ``_conv_gw_nchw`` (see the module docstring).
    """
    return conv2d_grad_weight_sparse_count(indices, values, x_shape, grad_out,
                                           kshape, stride, pad)[0]


def linear_grad_weight_sparse(indices: np.ndarray, values: np.ndarray,
                              x_shape: tuple, grad_out: np.ndarray) -> np.ndarray:
    """dL/dw (O, I) f4 = grad_out.T @ x_masked, x_masked (N, I) as in the conv case.

    grad_out: (N, O) f4. Work: K*O multiply-adds
    (:func:`linear_grad_weight_sparse_macs`). Wraps ``_linear_gw``.
    """
    n, n_in = x_shape
    what = "linear_grad_weight_sparse"
    _check_sparse(indices, values, n * n_in, what)
    if grad_out.ndim != 2 or grad_out.shape[0] != n:
        raise ShapeError(f"{what}: expected grad_out of shape ({n}, O), got "
                         f"{tuple(grad_out.shape)}")
    g = np.ascontiguousarray(grad_out, dtype=np.float32)
    n_part = _num_parts(indices.size)
    part = np.empty((n_part, n_in, g.shape[1]), dtype=np.float32)
    _linear_gw(indices, values, n_in, g, part)
    grad_w = part[0] if n_part == 1 else part.sum(axis=0)
    return np.ascontiguousarray(grad_w.T)


def linear_grad_weight_sparse_macs(indices: np.ndarray, out_features: int) -> int:
    """Multiply-adds of :func:`linear_grad_weight_sparse`: K * O."""
    return int(indices.size) * int(out_features)
