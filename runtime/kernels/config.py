"""Compilation flags for every Numba kernel, and the thread pool's wait policy.

``cache=True`` writes compiled code next to the sources or into NUMBA_CACHE_DIR;
``fastmath`` stays off (NaN/inf must survive so divergence is visible).
"""

import os

# Numba's OpenMP pool (GNU libgomp) spins while it waits for its other threads. When
# another process holds a core (a device's MQTT client, a second job, CI), every
# parallel call then waits for a descheduled spinning thread: a ResNet-8 train
# step took 631 ms instead of 34 ms with a busy core beside it. Threads that spin
# briefly (20,000 turns) and then sleep keep the idle-machine speed (56.5 ms dense
# step vs 56.2 spinning, 63.7 sleeping at once) and lose little under load (README,
# "Threads"). Set before libgomp starts, and only where the user set neither.
WAIT_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "20000"}
#: the variables this module set (the bench strips them from PyTorch's workers)
WAIT_SET_HERE = {}
if not any(key in os.environ for key in WAIT_DEFAULTS):
    WAIT_SET_HERE = dict(WAIT_DEFAULTS)
    os.environ.update(WAIT_SET_HERE)

JIT = {"cache": True, "nogil": True}
JIT_PARALLEL = {"cache": True, "nogil": True, "parallel": True}
# The restricted fast-math set (no nnan/ninf, so NaN and inf still propagate):
# 'contract' lets LLVM fuse multiply-adds, 'reassoc' lets it vectorise reductions.
FASTMATH = {"nsz", "arcp", "contract", "reassoc"}
JIT_PARALLEL_FASTMATH = {**JIT_PARALLEL, "fastmath": FASTMATH}
