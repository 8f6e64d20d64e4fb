"""Keep freed array memory in the process instead of handing it back to the OS.

Every layer call allocates its output and its scratch (0.1-10 MB at batch 32)
and frees them a few calls later. glibc serves blocks above its mmap threshold
with a fresh mmap and unmaps them on free, and gives freed heap above 128 kB
back with madvise/brk; the next array of that size then faults every one of its
pages in again. Measured here (a 2-core VM, where a page fault is a VM exit):
the frozen eval forward of ResNet-8 at 99 % took 14.4 ms with glibc's defaults
and 2.4 ms with these settings; the 99 %-sparse ResNet-8 train step 36-39 ms
against 20-26 ms (``python -m sparsefedpp.tools.bench.profile_step``). On bare metal a fault
costs less, but a 2 MB activation is still 512 of them per call.

``keep_freed_memory()`` sets M_MMAP_THRESHOLD to 32 MB (the largest glibc
takes on 64-bit; setting it also stops glibc's sliding threshold) and
M_TRIM_THRESHOLD to 1 GB: blocks under 32 MB come from the heap and stay mapped
once freed, so the process keeps its high-water mark, which is what the memory
budget is measured against anyway (VmHWM). It leaves glibc alone when the user
tuned malloc (GLIBC_TUNABLES, MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_),
when SPARSEFEDPP_KEEP_MEMORY=0, and on other C libraries.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30
USER_SETTINGS = ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

#: what keep_freed_memory() did: "set", or why it left malloc alone
STATUS = "not called"


def keep_freed_memory() -> str:
    """Set the two glibc malloc options (module docstring) once per process;
    returns and records in ``STATUS`` what was done."""
    global STATUS
    if STATUS != "not called":
        return STATUS
    if os.environ.get("SPARSEFEDPP_KEEP_MEMORY") == "0":
        STATUS = "left alone: SPARSEFEDPP_KEEP_MEMORY=0"
        return STATUS
    user = [key for key in USER_SETTINGS if key in os.environ]
    if user:
        STATUS = f"left alone: {', '.join(user)} set"
        return STATUS
    try:  # the symbols the interpreter is linked with: no ldconfig subprocess
        libc = ctypes.CDLL(None)
        mallopt = getattr(libc, "mallopt", None)
        is_glibc = getattr(libc, "gnu_get_libc_version", None) is not None
    except OSError:
        mallopt, is_glibc = None, False
    if mallopt is None or not is_glibc:
        STATUS = "left alone: not glibc"
        return STATUS
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD,
                                                               TRIM_THRESHOLD)
    STATUS = "set" if ok else "left alone: mallopt refused"
    return STATUS


#: arrays at least this large come from lazy_zeros' own mapping
LAZY_MIN_BYTES = 1 << 16


def resident_bytes(arr: np.ndarray) -> int:
    """Bytes of ``arr``'s pages that are backed by memory now (mincore(2)); a
    lazy_zeros array counts only the pages written. ``arr.nbytes`` where the
    C library has no mincore."""
    if arr.nbytes == 0:
        return 0
    page = mmap.PAGESIZE
    start = arr.__array_interface__["data"][0]
    first = start - start % page
    pages = -(-(start + arr.nbytes - first) // page)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mincore = libc.mincore
    except (OSError, AttributeError):
        return arr.nbytes
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    vec = ctypes.create_string_buffer(pages)
    if mincore(ctypes.c_void_p(first), ctypes.c_size_t(pages * page), vec) != 0:
        return arr.nbytes
    return min(arr.nbytes, sum(b & 1 for b in vec.raw) * page)


def lazy_zeros(shape: tuple, dtype=np.float32) -> np.ndarray:
    """Zeros whose pages cost no memory until they are written.

    An anonymous mapping reads as zeros and is backed page by page on first
    write, whatever malloc has lying around; np.zeros may memset reused heap
    memory instead (blocks under the 32 MB threshold above). A layer's dense
    weight gradient is such an array: at a static pattern the gradient lives as
    values over the pattern and the dense array is touched only if someone asks
    for it (runtime/layers/weighted.py), so a 99 %-sparse ResNet-18 does not
    hold 42.6 MB of zeros. The mapping is unmapped when the array is freed.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < LAZY_MIN_BYTES:
        return np.zeros(shape, dtype)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).reshape(shape)
