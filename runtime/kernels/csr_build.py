"""Building the CSR of a (Powerprop) weight in one parallel pass, without dense w.

A Powerprop layer holds v and computes with w = v|v|^(alpha-1); the zeros of v are
the zeros of w, so the CSR of w is the nonzeros of v raised to the power, row by
row: ``weight_row_nnz`` counts them (the layers reuse the counts for the density
policy), ``csr_of_weight`` fills data and indices.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from .config import JIT_PARALLEL, kernel


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
    ``sparsity.csr.to_csr``. Zeros of v are zeros of w, so only the nonzeros are raised to
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
