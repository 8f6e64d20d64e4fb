"""What the kernel tests share: drawn float32 arrays and the float32 error bound.

A float32 sum of K products is within about K * 2^-24 * sum|terms| of the exact
value, so results are checked elementwise against ``TOL * scale + ATOL``, scale =
the same operation on |inputs| (``runtime/kernels/reference.py`` in float64),
instead of a bare rtol, which cancellation would break.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

TOL = 1e-5
ATOL = 1e-6


def values(shape, zeros: bool = False):
    """Float32 arrays as STYLE.md asks: finite, no subnormals, |x| <= 1e3; with
    ``zeros`` many exact zeros too (a ReLU output)."""
    finite = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)
    return arrays(np.float32, shape,
                  elements=st.one_of(st.just(0.0), finite) if zeros else finite)


def f8(*arrays_):
    """float64 copies (exact for float32), so the references compute exactly."""
    out = tuple(np.asarray(a, dtype=np.float64) for a in arrays_)
    return out if len(out) > 1 else out[0]


def assert_close(actual, ref, scale, tol: float = TOL):
    """|actual - ref| <= tol * scale + ATOL elementwise, scale = |terms| summed."""
    assert actual.dtype == np.float32
    assert actual.shape == ref.shape
    err = np.abs(actual.astype(np.float64) - ref)
    bound = tol * scale + ATOL
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (
        f"at {worst}: got {actual[worst]}, expected {ref[worst]}, "
        f"bound {bound[worst]}")


def exact(reference, arrays: tuple, *args):
    """(reference(*arrays, *args), the same over |arrays|): the exact value and the
    scale of its float32 error bound, both in float64."""
    wide = [np.asarray(a, np.float64) for a in arrays]
    return reference(*wide, *args), reference(*(np.abs(a) for a in wide), *args)


def assert_matches(actual, reference, arrays: tuple, *args, tol: float = TOL):
    """assert_close against ``exact(reference, arrays, *args)``."""
    assert_close(actual, *exact(reference, arrays, *args), tol)
