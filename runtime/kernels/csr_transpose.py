"""Regrouping the nonzeros of a CSR weight by a function of their column (CSR -> CSC).

The CSR grad_input kernels read the weight by input channel (and phase), not by
output channel: ``transposed`` hands every nonzero to the group of its column,
``col_group[column]``, in one counting sort (O(nnz): count per row block, scan,
fill), keeping row order inside a group and carrying a per-column offset along.
Large matrices count and fill their row blocks in parallel.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from .config import JIT, JIT_PARALLEL, kernel

_PARALLEL_NNZ = 1 << 17  # transposes of fewer nonzeros run serially (~1 ms)


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


def transposed(data, indices, indptr, col_group, col_off, n_group: int):
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
