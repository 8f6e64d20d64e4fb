"""Compilation flags for every Numba kernel, and the thread pool's wait policy.

``cache=True`` writes compiled code next to the sources or into NUMBA_CACHE_DIR;
``fastmath`` stays off (NaN/inf must survive so divergence is visible).
"""

import os
import threading

import numba as _nb

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


# ---- explicit signatures, loaded at the first call ------------------------------
# ``numba.njit(signatures)`` compiles, or loads from the cache, every signature when
# its module is imported: 47 of them, 72 MB of resident LLVM code and metadata in
# each process, most of which a given round never runs (a dense round no CSR
# kernel, a sparse one few dense ones). ``kernel(signatures)`` keeps the explicit
# signatures but loads them when the kernel is first called (or typed by another
# kernel), then disables compilation as njit does: the same machine code, the same
# overloads and argument conversions, only later. ``compile_all`` (warmup) loads
# every one up front.

_LOCK = threading.RLock()
#: every dispatcher made by ``kernel``, in definition order
LAZY: list = []


def is_loaded(disp) -> bool:
    """Whether ``disp`` (a ``kernel`` dispatcher) holds its explicit signatures."""
    return not disp._can_compile


def load(disp) -> None:
    """Compile (or load from Numba's cache) the explicit signatures of ``disp``,
    then disable further compilation, exactly as ``numba.njit(signatures)``."""
    if not disp._can_compile:
        return
    with _LOCK:
        if not disp._can_compile:
            return
        for sig in disp.explicit_signatures:
            disp.compile(sig)
        disp.disable_compile()


def compile_all() -> int:
    """Load every kernel's signatures now (``sparsefedpp warmup``); returns how
    many signatures that is."""
    for disp in LAZY:
        load(disp)
    return sum(len(d.explicit_signatures) for d in LAZY)


def kernel(signatures, **flags):
    """``numba.njit(signatures, **flags)`` whose signatures are loaded at the first
    call instead of at import (see above). ``signatures``: one or a list."""
    sigs = list(signatures) if isinstance(signatures, list) else [signatures]
    if not sigs:
        raise ValueError("kernel: expected at least one explicit signature, got none")

    def wrap(func):
        disp = _nb.njit(**flags)(func)
        disp.explicit_signatures = sigs
        cls = type(disp)

        def _compile_for_args(*args, **kws):
            # a call found no overload and may compile: the first call. Numba
            # calls what this returns with the same arguments; the dispatcher
            # itself then picks among the explicit signatures (or raises
            # TypeError) as an eager njit would.
            load(disp)
            return disp

        def get_call_template(args, kws):
            # another kernel is typed against this one: load its own signatures
            # first, so it is not specialised for the caller's argument types
            load(disp)
            return cls.get_call_template(disp, args, kws)

        disp._compile_for_args = _compile_for_args
        disp.get_call_template = get_call_template
        LAZY.append(disp)
        return disp

    return wrap
