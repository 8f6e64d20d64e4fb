"""The kept-set kernels (runtime/kernels/topk.py: radix top-k threshold, the
two-pass and one-pass compressors, the bitmap) against their NumPy references
(runtime/kernels/reference.py): the same threshold, indices, values and bits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kernel_checks import values
from sparsefedpp.runtime.kernels import reference as ref
from sparsefedpp.runtime.kernels import topk

pytestmark = pytest.mark.device  # part of the emulated-ARM subset (.ci/aarch64.sh)

flat_values = st.integers(1, 300).flatmap(lambda n: values((n,), zeros=True))


@given(x=flat_values, data=st.data(), n_part=st.integers(1, 4))
def test_topk_abs_threshold_is_the_kth_largest_magnitude(x, data, n_part):
    k = data.draw(st.integers(1, x.size))
    assert topk.topk_abs_threshold(x, k, n_part) == ref.topk_abs_threshold(x, k)


@given(x=flat_values, data=st.data(), chunk=st.sampled_from([8, 64, topk.CHUNK]))
def test_compress_keeps_the_reference_set_in_both_encodings(x, data, chunk):
    # thresholds at an element's magnitude make ties; limits cut them
    t = data.draw(st.one_of(st.sampled_from(np.abs(x).tolist()),
                            st.floats(0, 1e3, width=32)))
    limit = data.draw(st.integers(-1, x.size))

    start, quota, kept = topk.compress_counts(x, t, limit, chunk)
    idx, vals = topk.compress_to_indices(x, t, start, quota, kept, chunk)
    bitmap, bvals = topk.compress_to_bitmap(x, t, start, quota, kept, chunk)

    want_idx, want_vals = ref.compress(x, t, limit)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(vals, want_vals)
    np.testing.assert_array_equal(bvals, want_vals)
    np.testing.assert_array_equal(bitmap, ref.to_bitmap(want_idx, x.size))
    np.testing.assert_array_equal(topk.bitmap_to_indices(bitmap, kept), want_idx)
    assert idx.dtype == np.int32 and vals.dtype == np.float32


def test_compress_one_pass_matches_the_two_pass_and_gives_up_past_its_share():
    rng = np.random.default_rng(13)
    x = rng.standard_normal(100_003).astype(np.float32)  # not a multiple of a chunk
    x[5] = np.nan
    t = float(np.float32(2.5))
    x[11] = -t  # a tie
    start, quota, kept = topk.compress_counts(x, t, -1)
    two_pass = topk.compress_to_indices(x, t, start, quota, kept)
    idx, vals = topk.compress_one_pass(x, t, kept)
    for got, want in zip((idx, vals), two_pass, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(idx, ref.compress(x, t)[0])
    ro = x.copy()
    ro.flags.writeable = False
    np.testing.assert_array_equal(topk.compress_one_pass(ro, t, kept)[0], idx)
    assert topk.compress_one_pass(x, 0.1, kept) is None  # far more kept
    empty = topk.compress_one_pass(np.zeros(10, np.float32), 0.0, 0)
    assert empty[0].size == empty[1].size == 0
