"""Numba kernels: pure functions over float32 arrays, one idea per module.

Dense: ``conv`` (the convolution's API and layout choice; its loops in
``conv_planes`` and ``conv_rows``), ``pool``, ``norm`` (BatchNorm, and BatchNorm +
ReLU fused). Sparse weights (CSR): ``csr_conv``, ``csr_linear`` (their shared
``csr_gather`` kernel, ``csr_direct`` path and ``csr_transpose``), ``csr_build``
(the CSR of a Powerprop weight), ``sddmm`` (gradients at a fixed pattern). Sparse
activations: ``topk`` (the kept set), ``sparse_grad`` (weight gradients from it).
``density``: when a sparse kernel beats the dense one. ``reference``: a plain NumPy
twin of every public kernel, for the tests and benchmarks. ``geometry``: window
sizes; ``config``: compilation flags and the lazy loading of signatures.
"""

from . import config  # noqa: F401  (sets the thread pool's wait policy before any kernel runs)
