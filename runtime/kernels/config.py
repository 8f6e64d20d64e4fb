"""Compilation flags for every Numba kernel, in one place.

``cache=True`` writes compiled code next to the sources or into NUMBA_CACHE_DIR;
``fastmath`` stays off (NaN/inf must survive so divergence is visible).
"""

JIT = dict(cache=True, nogil=True)
JIT_PARALLEL = dict(cache=True, nogil=True, parallel=True)
