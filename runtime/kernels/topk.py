"""The kept set of a sparse activation (SWAT): top-k threshold and compression.

``runtime/sparsity/activations.py`` holds the container and the policy; these are its
kernels. Contract: every array is C-contiguous; activations are float32 and viewed
flat (the C-order index of x[n, c, h, w] is ((n*C + c)*H + h)*W + w); kept
positions are int32 flat indices in increasing order, or a ``np.packbits`` bitmap
(big bit order: element t is bit 7 - t%8 of byte t//8). Public wrappers take raw
arrays; the kernels behind them load their explicit signatures at the first call.

"Kept" means ``not (|x| <= threshold)``: |x| > threshold, and NaN (so a diverging
run stays visible in the gradients). Elements with |x| == threshold > 0 are ties;
the compress kernels keep the first ``tie_quota`` of them per chunk, in C order.
Exact zeros are never kept (the threshold is >= 0, and a tie needs |x| > 0).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from .config import JIT_PARALLEL, kernel

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
