"""The max-pool kernels (runtime/kernels/pool.py) against their NumPy references
(runtime/kernels/reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from kernel_checks import assert_close, f8, values
from sparsefedpp.runtime.kernels import pool
from sparsefedpp.runtime.kernels import reference as ref

pytestmark = pytest.mark.device  # part of the emulated-ARM subset (.ci/aarch64.sh)


@st.composite
def pool_geometry(draw):
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    k, stride = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    pad = draw(st.integers(0, k // 2))
    assume(min(h, w) + 2 * pad >= k)
    return n, c, h, w, k, stride, pad


@given(data=st.data(), geom=pool_geometry())
def test_maxpool_forward_matches_reference(data, geom):
    # ties are common in drawn data: the first maximum in row-major order wins
    n, c, h, w, k, stride, pad = geom
    x = data.draw(values((n, c, h, w)))
    y, argmax = pool.maxpool2d_forward(x, k, stride, pad)
    ref_y, ref_argmax = ref.maxpool2d_forward(f8(x), k, stride, pad)
    np.testing.assert_array_equal(y, ref_y)
    np.testing.assert_array_equal(argmax, ref_argmax)


@given(data=st.data(), geom=pool_geometry())
def test_maxpool_backward_routes_grad_to_the_argmax(data, geom):
    # Arrange
    n, c, h, w, k, stride, pad = geom
    x = data.draw(values((n, c, h, w)))
    y, argmax = pool.maxpool2d_forward(x, k, stride, pad)
    g = data.draw(values(y.shape))
    # Act
    gx = pool.maxpool2d_backward(g, argmax, x.shape)
    # Assert: a scatter-add of g into each window's argmax
    assert_close(gx, ref.maxpool2d_backward(f8(g), argmax, x.shape),
                 ref.maxpool2d_backward(f8(np.abs(g)), argmax, x.shape))
