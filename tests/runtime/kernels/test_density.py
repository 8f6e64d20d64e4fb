"""The density policies (runtime/kernels/density.py): which kernel a layer runs."""

from __future__ import annotations

import numpy as np
import pytest
from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.runtime.kernels import density

pytestmark = pytest.mark.device  # part of the emulated-ARM subset (.ci/aarch64.sh)


def test_prefer_csr_is_a_density_threshold():
    for kind in ("conv", "linear"):
        flags = [density.prefer_csr(d, kind) for d in np.linspace(0, 1, 21)]
        assert flags == sorted(flags, reverse=True)
        assert not density.prefer_csr(1.0, kind)
    assert density.prefer_csr(0.1, "conv")
    assert not density.prefer_csr(0.0, "linear")  # BLAS wins on fc layers this size
    with pytest.raises(ConfigError, match="kind"):
        density.prefer_csr(0.5, "pool")
    with pytest.raises(ConfigError, match="density in \\[0, 1\\]"):
        density.prefer_csr(1.5, "conv")


def test_prefer_sparse_grad_is_a_kept_fraction_threshold_per_kernel_size():
    for k, limit in ((1, 0.01), (3, 0.1), (5, 0.1)):
        assert density.prefer_sparse_grad(limit, k)
        assert not density.prefer_sparse_grad(limit * 1.01, k)
        flags = [density.prefer_sparse_grad(f, k) for f in np.linspace(0, 1, 21)]
        assert flags == sorted(flags, reverse=True)
