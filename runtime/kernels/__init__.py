"""Numba kernels: pure functions over float32 arrays (conv, pooling, batch-norm)."""

from . import config  # noqa: F401  (sets the thread pool's wait policy before any kernel runs)
