"""When a sparse kernel beats the dense one: the measured density crossovers.

Layers ask here which kernel to run; each answer is a crossover measured with the
benchmarks in ``tools/bench/`` (re-measure on the device and adjust).

Weight sparsity: ``prefer_csr``, CSR forward + grad_input (``csr_conv.py``,
``csr_linear.py``) against the dense kernels. Measured (``NUMBA_NUM_THREADS=2
python tools/bench/csr.py --reps 11``, batch 32, 2-core Xeon with FMA, quiet
machine, random masks): dense forward + grad_input (ms, conv.py; NumPy matmul for
linear), then dense/CSR of forward + grad_input (> 1: CSR faster) at each weight
density:

    layer (C@HxW->O k s p)   dense     1   0.5   0.2   0.1  0.05  0.01 0.001  cross
    16@32x32->16  3 1 1       2.77  0.73  1.11  1.51  1.80  2.12  2.49  3.50  0.59
    16@32x32->32  3 2 1       2.26  0.75  1.03  1.41  1.64  1.79  2.20  2.71  0.54
    32@16x16->32  3 1 1       2.89  0.73  1.19  1.86  2.45  2.84  3.59  4.93  0.64
    32@16x16->64  3 2 1       2.63  0.93  1.36  2.09  2.64  2.95  3.59  4.34  0.87
    64@8x8->64    3 1 1       3.59  0.82  1.41  2.50  3.47  4.45  6.06  7.79  0.77
    16@32x32->32  1 2 0       0.90  1.08  1.19  1.28  1.35  1.38  1.63  1.71  >= 1
    32@16x16->64  1 2 0       0.60  0.90  1.04  1.20  1.27  1.30  1.44  1.62  0.60
    linear 64->10            0.002  0.04  0.04  0.04  0.05  0.05  0.05  0.11  never
    64@32x32->64  3 1 1      35.76  0.78  1.34  2.48  3.69  5.03  7.19 10.44  0.73
    128@16x16->128 3 1 1     40.87  0.74  1.34  2.67  4.14  6.15 10.75 15.04  0.70
    256@8x8->256  3 1 1      62.36  0.91  1.63  3.27  5.93  9.32 20.20 29.90  0.89
    512@4x4->512  3 1 1      91.60  0.71  1.38  2.61  5.31  9.69 27.93 49.86  0.70
    linear 512->10           0.008  0.05  0.05  0.07  0.07  0.08  0.09  0.08  never

Single-threaded the 3x3 crossovers are 0.57-0.71 and the 1x1 stride-2 ones
0.04-0.07 (their dense grad_input is cheap; at two threads it pays for four
parallel phase calls). At density 0.001 the phase-plane copy and the output writes
took 0.3-0.5 ms at ResNet-8 sizes: hence the direct path (``csr_direct.py``).
The Linear layers here take 1-8 us as a BLAS matmul, against 10-130 us of CSR
call overhead (validation, transposes, a parallel launch), so CSR never pays for
them. Chosen (``_CROSSOVER``): conv below density 0.5 (every conv layer above is
>= 1.03x there at two threads), linear never.

Activation sparsity: ``prefer_sparse_grad``, the weight gradient from the kept
activations (``sparse_grad.py``) against the dense ``conv.conv2d_grad_weight`` on
the decompressed input (``tools/bench/sparse_grad.py``, batch 32, ResNet-8 shapes):
the sparse kernel wins below ~0.1 kept for 3x3 kernels and below ~0.01 for the 1x1
stride-2 shortcuts.
"""

from __future__ import annotations

from ..errors import ConfigError

# Density below which CSR forward + grad_input beats the dense kernels (conv.py for
# conv, NumPy matmul for linear), measured at batch 32, two threads: module docstring
_CROSSOVER = {"conv": 0.5, "linear": 0.0}
# Kept fractions above which the dense grad_weight on the decompressed input is
# faster than the sparse kernel, by kernel size (module docstring)
_SPARSE_GRAD_MAX_KEPT = {1: 0.01}
_SPARSE_GRAD_MAX_KEPT_DEFAULT = 0.1


def prefer_csr(density: float, kind: str) -> bool:
    """True when CSR forward + grad_input is expected to beat the dense kernels.

    ``density`` = nnz / weight size in [0, 1]; ``kind`` is "conv" or "linear". True
    when density < the crossover measured by ``tools/bench/csr.py`` (module
    docstring): 0.5 for conv, 0.0 (never) for linear.
    """
    if kind not in _CROSSOVER:
        raise ConfigError(f"prefer_csr: expected kind in {sorted(_CROSSOVER)}, got "
                          f"{kind!r}")
    if not 0.0 <= density <= 1.0:
        raise ConfigError(f"prefer_csr: expected density in [0, 1], got {density}")
    return density < _CROSSOVER[kind]


def prefer_sparse_grad(kept_fraction: float, kernel_size: int) -> bool:
    """Whether conv2d_grad_weight_sparse beats the dense kernel at this kept fraction."""
    limit = _SPARSE_GRAD_MAX_KEPT.get(kernel_size, _SPARSE_GRAD_MAX_KEPT_DEFAULT)
    return kept_fraction <= limit
