"""The checks of an update's tensors, in one place: names, shapes, dtypes, integer
ranges and finite values against the model they must fit.

Validate once, on arrival: ``decode`` scans every float value as it reads the
bytes and returns the tensors as ``CheckedTensors``. The later stages (the
aggregator's ``update_problem``, FedAvg's screening) call ``tensors_problem`` or
``finite_problem`` as before; for ``CheckedTensors`` those skip the per-element
finite scan, the only expensive part, and keep the cheap checks (names, shapes,
dtypes and, where counters are summed, the range of the few integer tensors). A
plain dict (a result built in process, a resumed state) is checked in full.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# Integer tensors are counters (num_batches_tracked); beyond this they are hostile,
# and the aggregator's int64 weighted sum S = sum w_i x_i could overflow.
MAX_INTEGER = 2**31 - 1


class CheckedTensors(dict):
    """A state dict whose float values ``decode`` found finite.

    The mapping is read-only so that nothing can be slipped in after the check
    (copy it with ``dict(...)`` to edit; the copy is checked again). The arrays
    stay writable, as ``decode`` promises: code between arrival and aggregation
    must not write NaN into them.
    """

    __slots__ = ()

    def _read_only(self, *args, **kwargs):
        raise TypeError("CheckedTensors is read-only: its values were checked on "
                        "arrival; edit a copy, dict(tensors)")

    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __reduce__(self):
        return CheckedTensors, (dict(self),)


def finite_problem(tensors: Mapping[str, np.ndarray]) -> str:
    """Why ``tensors`` cannot be averaged ('' if they can): a float tensor holding
    NaN or inf. Trusts ``CheckedTensors`` (scanned by ``decode``)."""
    if isinstance(tensors, CheckedTensors):
        return ""
    for name, arr in tensors.items():
        a = np.asarray(arr)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            return f"tensor {name!r} holds NaN or inf (training diverged?)"
    return ""


def tensors_problem(tensors: Mapping[str, np.ndarray],
                    reference: Mapping[str, np.ndarray], *,
                    max_integer: int | None = MAX_INTEGER) -> str:
    """Why ``tensors`` cannot stand in for ``reference`` ('' if they can): the same
    names, each tensor of the reference's dtype and shape, integers within
    +-``max_integer`` (None: any; the bound matters where counters are summed),
    float values finite (see ``finite_problem``)."""
    missing = sorted(set(reference) - set(tensors))
    extra = sorted(set(tensors) - set(reference))
    if missing or extra:
        return (f"tensor names differ from the model's (missing {missing[:5]}, "
                f"extra {extra[:5]})")
    for name, ref in reference.items():
        arr, ref = np.asarray(tensors[name]), np.asarray(ref)
        if max_integer is not None and arr.shape == ref.shape and \
                ref.dtype.kind in "iu" and arr.dtype.kind in "iu" and arr.size:
            low, high = int(arr.min()), int(arr.max())  # Python ints: no wrap-around
            if low < -max_integer or high > max_integer:
                return (f"tensor {name!r}: expected integers within +-{max_integer}, "
                        f"got {low} to {high}")
        if arr.shape != ref.shape or arr.dtype != ref.dtype:
            return (f"tensor {name!r}: expected {ref.dtype} {ref.shape}, got "
                    f"{arr.dtype} {arr.shape} (the dtype and shape of the model)")
    return finite_problem(tensors)
