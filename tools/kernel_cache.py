"""What Numba's cache holds for our kernels: loaded from it, or compiled now.

Every kernel has explicit signatures (runtime/kernels/config.py, ``kernel``):
Numba compiles them (or loads them from the cache) at the kernel's first call, so
a process holds only the kernels it ran; ``sparsefedpp warmup`` loads every one,
so a device whose cache is warm never compiles inside a round.
``NUMBA_CACHE_DIR`` moves the cache (needed when the package folder is read-only).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass


@dataclass(frozen=True)
class CacheReport:
    kernels: int          # dispatchers (one per kernel, serial/parallel variants apart)
    signatures: int       # explicit signatures in all
    loaded: int           # signatures loaded from the cache in this process
    compiled: int         # signatures compiled in this process (cache cold or stale)
    cache_dir: str
    pending: int = 0      # signatures not loaded yet (kernels this process never ran)


def kernel_modules() -> list[str]:
    """The names of every module of runtime/kernels (the package is the list)."""
    from sparsefedpp.runtime import kernels

    return sorted(m.name for m in pkgutil.iter_modules(kernels.__path__))


def dispatchers() -> list:
    """Every Numba dispatcher of runtime/kernels, once each (imports the modules;
    loads no signature)."""
    from numba.core.registry import CPUDispatcher

    found = {}
    for name in kernel_modules():
        module = importlib.import_module(f"sparsefedpp.runtime.kernels.{name}")
        for v in vars(module).values():
            if isinstance(v, CPUDispatcher):
                found.setdefault(id(v), v)  # a kernel imported by another module
    return list(found.values())


def _declared(d) -> int:
    return len(getattr(d, "explicit_signatures", None) or d.signatures)


def report() -> CacheReport:
    """What this process loaded and compiled so far (loads nothing itself)."""
    from sparsefedpp.runtime.kernels.config import is_loaded

    ds = dispatchers()
    hits = sum(sum(d.stats.cache_hits.values()) for d in ds)
    misses = sum(sum(d.stats.cache_misses.values()) for d in ds)
    sigs = sum(_declared(d) for d in ds)
    pending = sum(_declared(d) for d in ds
                  if hasattr(d, "explicit_signatures") and not is_loaded(d))
    paths = {d.stats.cache_path for d in ds if d.stats.cache_path}
    return CacheReport(len(ds), sigs, hits, misses, ", ".join(sorted(paths)) or "none",
                       pending)


def load_all() -> CacheReport:
    """Load (or compile into the cache) every kernel signature now; the report."""
    from sparsefedpp.runtime.kernels.config import compile_all

    dispatchers()  # imports every kernel module, so every kernel is registered
    compile_all()
    return report()


def process_age() -> float:
    """Seconds since this process started (Linux /proc), so start-up (the Python
    imports and the kernel loading that happen before any command runs) counts."""
    import os

    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - started / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")
