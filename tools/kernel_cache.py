"""What Numba's cache holds for our kernels: loaded from it, or compiled now.

Every kernel has an explicit signature, so Numba compiles it (or loads it from
the cache) when its module is imported; a device whose cache is warm never
compiles inside a round. ``NUMBA_CACHE_DIR`` moves the cache (needed when the
package folder is read-only).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

KERNEL_MODULES = ("conv", "csr", "activation", "norm", "pool", "sddmm")


@dataclass(frozen=True)
class CacheReport:
    kernels: int          # dispatchers (one per kernel, serial/parallel variants apart)
    signatures: int       # compiled signatures in all
    loaded: int           # signatures loaded from the cache
    compiled: int         # signatures compiled in this process (cache cold or stale)
    cache_dir: str


def dispatchers() -> list:
    """Every Numba dispatcher of runtime/kernels (imports, so compiles, them)."""
    from numba.core.registry import CPUDispatcher

    found = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"sparsefedpp.runtime.kernels.{name}")
        found += [v for v in vars(module).values() if isinstance(v, CPUDispatcher)]
    return found


def report() -> CacheReport:
    ds = dispatchers()
    hits = sum(sum(d.stats.cache_hits.values()) for d in ds)
    misses = sum(sum(d.stats.cache_misses.values()) for d in ds)
    sigs = sum(len(d.signatures) for d in ds)
    paths = {d.stats.cache_path for d in ds if d.stats.cache_path}
    return CacheReport(len(ds), sigs, hits, misses, ", ".join(sorted(paths)) or "none")


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
