"""Compilation flags for every Numba kernel, in one place.

``cache=True`` writes compiled code next to the sources or into NUMBA_CACHE_DIR;
``fastmath`` stays off (NaN/inf must survive so divergence is visible).
"""

JIT = {"cache": True, "nogil": True}
JIT_PARALLEL = {"cache": True, "nogil": True, "parallel": True}
# The restricted fast-math set (no nnan/ninf, so NaN and inf still propagate):
# 'contract' lets LLVM fuse multiply-adds, 'reassoc' lets it vectorise reductions.
FASTMATH = {"nsz", "arcp", "contract", "reassoc"}
JIT_PARALLEL_FASTMATH = {**JIT_PARALLEL, "fastmath": FASTMATH}
