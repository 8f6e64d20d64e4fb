"""Numba kernels: pure functions over float32 arrays (conv, pooling, batch-norm)."""
