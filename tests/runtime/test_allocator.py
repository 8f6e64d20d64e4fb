"""runtime/allocator.py: freed activations stay mapped, so the next ones do not
fault their pages in again; users' own malloc settings win."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

PROBE = """
import resource, sys
import numpy as np
import sparsefedpp.runtime
from sparsefedpp.runtime import allocator
a = np.ones(1 << 20, np.float32); del a          # 4 MB, as a ResNet-8 activation
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    a = np.ones(1 << 20, np.float32); del a
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(allocator.STATUS, "|", faults)
"""


def probe(**env) -> tuple[str, int]:
    full = {k: v for k, v in os.environ.items()
            if k not in ("GLIBC_TUNABLES", "SPARSEFEDPP_KEEP_MEMORY")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**full, **env},
                         capture_output=True, text=True, check=True).stdout
    status, faults = out.rsplit("|", 1)
    return status.strip(), int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_importing_the_engine_keeps_freed_arrays_mapped():
    status, faults = probe()
    assert status == "set"
    # 20 fresh 4 MB arrays: 20 x 1024 pages would fault without the setting
    assert faults < 100


@pytest.mark.parametrize("env, why", [
    ({"SPARSEFEDPP_KEEP_MEMORY": "0"}, "SPARSEFEDPP_KEEP_MEMORY=0"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}, "GLIBC_TUNABLES set"),
])
def test_the_users_choice_is_left_alone(env, why):
    status, _ = probe(**env)
    assert status == f"left alone: {why}"


def test_resident_bytes_counts_only_written_pages_of_lazy_zeros():
    from sparsefedpp.runtime.allocator import lazy_zeros, resident_bytes

    a = lazy_zeros((1 << 20,))  # 4 MB, nothing written
    assert resident_bytes(a) == 0
    a[: 1 << 18] = 1.0  # the first MB
    assert (1 << 20) <= resident_bytes(a) <= (1 << 20) + 8192
    b = np.ones(1 << 20, dtype=np.float32)
    assert resident_bytes(b) >= b.nbytes - 8192
    assert resident_bytes(np.zeros(0, np.float32)) == 0
