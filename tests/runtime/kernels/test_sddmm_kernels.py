"""The fixed-pattern gradient kernels (runtime/kernels/sddmm.py) against their
NumPy references (runtime/kernels/reference.py): values within the float32 bound
of kernel_checks.py, multiply-adds exactly. The layer-level behaviour is in
tests/runtime/sparsity/test_static_pattern.py."""

from __future__ import annotations

import numpy as np
import pytest
from kernel_checks import assert_close, f8
from sparsefedpp.runtime.kernels import reference as ref
from sparsefedpp.runtime.kernels import sddmm
from sparsefedpp.runtime.sparsity.csr import to_csr

pytestmark = pytest.mark.device  # part of the emulated-ARM subset (.ci/aarch64.sh)


@pytest.mark.parametrize(("k", "stride", "pad"), [(3, 1, 1), (3, 2, 1), (1, 2, 0),
                                                   (3, 1, 0)])
@pytest.mark.parametrize("serial", [True, False])
def test_pattern_gradients_match_reference(monkeypatch, k, stride, pad, serial):
    rng = np.random.default_rng(k + stride + pad)
    kshape = (6, 4, k, k)
    w = rng.standard_normal(kshape).astype(np.float32)
    w[rng.random(kshape) < 0.7] = 0.0
    w[1] = 0.0  # an empty row
    m = to_csr(w)
    x = np.maximum(rng.standard_normal((3, 4, 7, 6)), 0).astype(np.float32)
    oh, ow = ref.out_size(7, k, stride, pad), ref.out_size(6, k, stride, pad)
    g = rng.standard_normal((3, 6, oh, ow)).astype(np.float32)
    kept = np.flatnonzero(x.ravel() > 0.8).astype(np.int32)
    monkeypatch.setattr(sddmm, "SERIAL_PAIRS", 10**12 if serial else 0)
    pattern = (m.indptr, m.indices, kshape, stride, pad)

    dense, dense_macs = sddmm.conv_grad_pattern_dense(x, g, *pattern)
    sparse, kept_macs = sddmm.conv_grad_pattern_kept(kept, x.ravel()[kept], x.shape,
                                                     g, *pattern)

    want, macs = ref.conv_grad_pattern_dense(*f8(x, g), *pattern)
    scale, _ = ref.conv_grad_pattern_dense(*f8(np.abs(x), np.abs(g)), *pattern)
    assert_close(dense, want, scale)
    assert dense_macs == macs
    xk = f8(x.ravel()[kept])
    want, macs = ref.conv_grad_pattern_kept(kept, xk, x.shape, f8(g), *pattern)
    scale, _ = ref.conv_grad_pattern_kept(kept, np.abs(xk), x.shape, np.abs(f8(g)),
                                          *pattern)
    assert_close(sparse, want, scale)
    assert kept_macs == macs


@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0, 3.0])
def test_pattern_values_match_reference(alpha):
    rng = np.random.default_rng(int(alpha * 4))
    v = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    flat = np.flatnonzero(rng.random(v.size) < 0.3).astype(np.int64)
    w, dw_dv = sddmm.pattern_values(v, flat, alpha)
    want_w, want_dw = ref.pattern_values(f8(v), flat, alpha)
    np.testing.assert_allclose(w, want_w, rtol=1e-6)
    np.testing.assert_allclose(dw_dv, want_dw, rtol=1e-6)
