"""Compilation flags for every Numba kernel, and the thread pool's wait policy.

``cache=True`` writes compiled code next to the sources or into NUMBA_CACHE_DIR;
``fastmath`` stays off (NaN/inf must survive so divergence is visible).
"""

import os

# Numba's OpenMP pool (GNU libgomp) spins while it waits for its other threads. When
# another process holds a core (a device's MQTT client, a second job, CI), every
# parallel call then waits for a descheduled spinning thread: a ResNet-8 train
# step measured 631 ms instead of 34 ms with one busy core beside it. Passive
# waiting (threads sleep at barriers) costs little on an idle machine (README,
# "Threads"). Set before libgomp starts; an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

JIT = {"cache": True, "nogil": True}
JIT_PARALLEL = {"cache": True, "nogil": True, "parallel": True}
# The restricted fast-math set (no nnan/ninf, so NaN and inf still propagate):
# 'contract' lets LLVM fuse multiply-adds, 'reassoc' lets it vectorise reductions.
FASTMATH = {"nsz", "arcp", "contract", "reassoc"}
JIT_PARALLEL_FASTMATH = {**JIT_PARALLEL, "fastmath": FASTMATH}
