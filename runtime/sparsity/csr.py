"""CSR storage of conv and linear weights: the one CSR type, CSRMatrix, and to_csr/from_csr.

Every CSR in the engine is a CSRMatrix: the wire's (validated, ``to_csr``), a
layer's per-step weight (``CSRMatrix.of_weight``, built by one kernel pass) and a
frozen layer's (``CSRMatrix.trusted`` over arrays a kernel just produced, so the hot
path skips the O(nnz) check). All are built by the same kernel,
``kernels.csr_build.csr_of_weight``.

Convention (DESIGN.md, "Communication"): a conv weight (O, C, kh, kw) is stored as
the 2-D O x (C*kh*kw) matrix, column ``c*kh*kw + i*kw + j``; a linear weight
(out, in) as it is. Fields use SciPy's names: ``data`` float32 (nnz,), ``indices``
int32 column indices (nnz,), sorted and unique within each row, ``indptr`` int64
(rows + 1,) with ``indptr[0] == 0`` and ``indptr[-1] == nnz``. Only exact zeros
are dropped (``-0.0`` too, which comes back as ``+0.0``); NaN and inf are kept.
The kernels that use this layout are ``kernels/csr_*.py``; they also accept int32
``indptr`` (STYLE.md's wire choice) and convert it, O(rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, DTypeError, ShapeError

_DTYPES = (("data", np.float32), ("indices", np.int32), ("indptr", np.int64))


def check_csr(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray,
              shape: tuple, *, check_sorted: bool = True) -> None:
    """Raise unless (data, indices, indptr) is a valid CSR matrix of ``shape``.

    DTypeError: dtypes other than f4 / i4 / i8. ShapeError: arrays not 1-D, lengths
    that disagree, a shape that is not two non-negative ints. ConfigError: indptr
    not starting at 0, not ending at nnz or decreasing; a column index outside
    [0, cols) or (``check_sorted``) not strictly increasing within its row. Cost
    O(nnz + rows); the kernels skip the sort check, which they do not rely on.
    """
    arrays = {"data": data, "indices": indices, "indptr": indptr}
    for name, dtype in _DTYPES:
        arr = arrays[name]
        if not isinstance(arr, np.ndarray) or arr.dtype != dtype:
            got = getattr(arr, "dtype", type(arr).__name__)
            raise DTypeError(f"CSR {name}: expected dtype {np.dtype(dtype)}, got "
                             f"{got}; use .astype(np.{np.dtype(dtype)})")
        if arr.ndim != 1:
            raise ShapeError(f"CSR {name}: expected a 1-D array, got shape "
                             f"{arr.shape}")
    if (len(shape) != 2 or not all(isinstance(s, (int, np.integer)) for s in shape)
            or min(shape) < 0):
        raise ShapeError(f"CSR shape: expected (rows, cols) of non-negative ints, "
                         f"got {shape!r}")
    rows, cols = shape
    nnz = data.shape[0]
    if indices.shape[0] != nnz:
        raise ShapeError(f"CSR indices: expected {nnz} entries (len(data)), got "
                         f"{indices.shape[0]}")
    if indptr.shape[0] != rows + 1:
        raise ShapeError(f"CSR indptr: expected {rows + 1} entries (rows + 1), got "
                         f"{indptr.shape[0]}")
    if indptr[0] != 0 or indptr[-1] != nnz:
        raise ConfigError(f"CSR indptr: expected to run from 0 to nnz={nnz}, got "
                          f"{indptr[0]} .. {indptr[-1]}; the matrix is corrupt")
    if rows and np.any(np.diff(indptr) < 0):
        row = int(np.argmax(np.diff(indptr) < 0))
        raise ConfigError(f"CSR indptr: expected non-decreasing values, got "
                          f"{indptr[row]} then {indptr[row + 1]} at row {row}")
    if nnz == 0:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= cols:
        raise ConfigError(f"CSR indices: expected column indices in [0, {cols}), "
                          f"got min {lo}, max {hi}")
    if not check_sorted:
        return
    row_start = np.zeros(nnz, dtype=bool)
    row_start[indptr[:-1][indptr[:-1] < nnz]] = True
    bad = ~((np.diff(indices) > 0) | row_start[1:])
    if np.any(bad):
        k = int(np.argmax(bad)) + 1
        row = int(np.searchsorted(indptr, k, side="right")) - 1
        raise ConfigError(f"CSR indices: expected strictly increasing columns within "
                          f"each row, got {indices[k - 1]} then {indices[k]} in row "
                          f"{row}; sort them and merge duplicates")


@dataclass(frozen=True, eq=False)
class CSRMatrix:
    """A 2-D float32 matrix in CSR form (validated on construction).

    Parameters
    ----------
    data : (nnz,) float32
        The stored values, row by row.
    indices : (nnz,) int32
        Column of each value, strictly increasing within a row.
    indptr : (rows + 1,) int64
        Row r holds ``data[indptr[r]:indptr[r + 1]]``.
    shape : (rows, cols)
        Shape of the 2-D matrix.
    dense_shape : tuple, optional
        Shape ``from_csr`` restores (e.g. (O, C, kh, kw) of a conv weight with
        shape (O, C*kh*kw)); defaults to ``shape``.
    """

    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    shape: tuple
    dense_shape: tuple | None = None

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        dense = self.shape if self.dense_shape is None else self.dense_shape
        object.__setattr__(self, "dense_shape", tuple(int(s) for s in dense))
        self.check()

    @classmethod
    def trusted(cls, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray,
                shape: tuple, dense_shape: tuple | None = None) -> CSRMatrix:
        """A CSRMatrix over arrays a kernel built (valid by construction), without
        the O(nnz) validation: for the per-step path. Call ``check()`` to validate."""
        m = object.__new__(cls)
        shape = tuple(int(s) for s in shape)
        for name, value in (("data", data), ("indices", indices), ("indptr", indptr),
                            ("shape", shape),
                            ("dense_shape", shape if dense_shape is None
                             else tuple(int(s) for s in dense_shape))):
            object.__setattr__(m, name, value)
        return m

    @classmethod
    def of_weight(cls, v: np.ndarray, alpha: float = 1.0,
                  counts: np.ndarray | None = None) -> CSRMatrix:
        """CSR of the effective weight w = v|v|^(alpha-1) of a conv (O, C, kh, kw) or
        linear (O, I) float32 ``v``, in one kernel pass and without forming dense w
        (``counts``: nonzeros per row, if already known)."""
        from ..kernels.csr_build import csr_of_weight  # kernels import this module

        rows = int(v.shape[0])
        if v.size == 0:  # the kernel cannot reshape an empty (rows, -1)
            data, indices = np.empty(0, np.float32), np.empty(0, np.int32)
            indptr = np.zeros(rows + 1, np.int64)
        else:
            data, indices, indptr = csr_of_weight(v, alpha, counts)
        return cls.trusted(data, indices, indptr,
                           (rows, int(np.prod(v.shape[1:]))), v.shape)

    def with_data(self, data: np.ndarray) -> CSRMatrix:
        """The same structure with other values (e.g. rows scaled by BatchNorm)."""
        return CSRMatrix.trusted(data, self.indices, self.indptr, self.shape,
                                 self.dense_shape)

    def check(self) -> None:
        """Validate the arrays (``check_csr``) and that dense_shape fits shape."""
        check_csr(self.data, self.indices, self.indptr, self.shape)
        rows, cols = self.shape
        dense = self.dense_shape
        if not dense or dense[0] != rows or int(np.prod(dense)) != rows * cols:
            raise ShapeError(f"CSR dense_shape: expected (rows={rows}, ...) with "
                             f"{rows * cols} elements, got {dense}")

    @property
    def nnz(self) -> int:
        """Number of stored values."""
        return int(self.data.shape[0])

    @property
    def density(self) -> float:
        """nnz / (rows * cols); 0.0 for an empty matrix."""
        size = self.shape[0] * self.shape[1]
        return self.nnz / size if size else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes of data + indices + indptr (the payload, without shapes)."""
        return int(self.data.nbytes + self.indices.nbytes + self.indptr.nbytes)

    def to_dense(self) -> np.ndarray:
        """The dense float32 array of shape ``dense_shape`` (same as ``from_csr``)."""
        return from_csr(self)

    def __repr__(self) -> str:
        return (f"CSRMatrix(shape={self.shape}, dense_shape={self.dense_shape}, "
                f"nnz={self.nnz}, density={self.density:.4g})")


def to_csr(a: np.ndarray) -> CSRMatrix:
    """CSR of a dense weight: 2-D (out, in) as is, 4-D (O, C, kh, kw) as O x C*kh*kw.

    Parameters
    ----------
    a : (R, K) or (O, C, kh, kw) floating array
        Converted to float32; exact zeros are dropped, NaN and inf kept.

    Returns
    -------
    CSRMatrix with ``dense_shape == a.shape``.
    """
    arr = np.asarray(a)
    if arr.dtype.kind != "f":
        raise DTypeError(f"to_csr: expected a floating-point array, got dtype "
                         f"{arr.dtype}; use .astype(np.float32)")
    if arr.ndim not in (2, 4):
        raise ShapeError(f"to_csr: expected a 2-D (out, in) or 4-D (O, C, kh, kw) "
                         f"weight, got shape {arr.shape}")
    m = CSRMatrix.of_weight(np.ascontiguousarray(arr, dtype=np.float32))
    m.check()
    return m


def from_csr(m: CSRMatrix) -> np.ndarray:
    """The dense float32 array of ``m`` in its original shape ``m.dense_shape``."""
    dense = np.zeros(m.shape, dtype=np.float32)
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    dense[rows, m.indices] = m.data
    return dense.reshape(m.dense_shape)
