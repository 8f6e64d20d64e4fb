"""Powerpropagation (Schwarz et al., NeurIPS 2021): w = v * |v|^(alpha - 1).

A layer stores ``v`` and computes with ``w``; the chain rule gives
``dL/dv = dL/dw * alpha * |v|^(alpha - 1)``. There is deliberately no epsilon in
``|v|^(alpha - 1)``: for alpha > 1 a weight that is exactly zero gets a zero
gradient and stays pruned, which is what makes client masks agree.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError

# std of a standard normal truncated at +-2 std; dividing by it restores unit variance
_TRUNC_STD = 0.87962566


def check_alpha(alpha: float) -> float:
    """Validate a Powerprop exponent (alpha >= 1; alpha = 1 is a plain layer)."""
    alpha = float(alpha)
    if not np.isfinite(alpha) or alpha < 1.0:
        raise ConfigError(f"powerprop alpha: expected a finite value >= 1, got {alpha}")
    return alpha


def abs_pow(v: np.ndarray, p: float) -> np.ndarray:
    """|v|^p in float32; p = 0.25 (alpha 1.25, the reference setting) uses two
    square roots, several times faster than a general power."""
    a = np.abs(v)
    if p == 0.25:
        return np.sqrt(np.sqrt(a, out=a), out=a)
    if p == 0.5:
        return np.sqrt(a, out=a)
    return np.power(a, np.float32(p), out=a)


def effective_weight(v: np.ndarray, alpha: float):
    """Return (w, dw_dv) for parameters v: w = v|v|^(alpha-1), dw/dv = alpha|v|^(alpha-1).

    With alpha = 1 both are trivial and ``dw_dv`` is None.
    """
    if alpha == 1.0:
        return v, None
    mag = abs_pow(v, alpha - 1.0)
    w = v * mag
    mag *= np.float32(alpha)
    return w, mag


class _NoInit:
    """Stands in for the random generator of a model whose weights come from the
    wire (``models.build(..., init=False)``): weights and biases start at zero and
    no random number, and no float64 temporary, is ever drawn."""

    def uniform(self, low, high, size) -> np.ndarray:
        return np.zeros(size, dtype=np.float32)

    def __repr__(self) -> str:
        return "NO_INIT"


#: pass as a layer's ``rng`` to skip its random initialisation (zeros instead)
NO_INIT = _NoInit()


def init_weight(shape: tuple, fan_in: int, alpha: float,
                rng: np.random.Generator | _NoInit) -> np.ndarray:
    """Draw v so that w = v|v|^(alpha-1) has the fan-in truncated-normal law.

    u ~ N(0, (sqrt(1/fan_in)/0.8796)^2) cut at 2 std, then v = sign(u)|u|^(1/alpha).
    The float64 steps run in place on two arrays (the draw and |u|), so building
    a layer holds 2 float64 copies of it at most, not 5; the values are the same
    bits as the plain expression. ``rng=NO_INIT``: zeros, nothing drawn.
    """
    if rng is NO_INIT:
        return np.zeros(shape, dtype=np.float32)
    std = np.sqrt(1.0 / fan_in) / _TRUNC_STD
    z = rng.standard_normal(shape)
    bad = np.abs(z) > 2.0
    while bad.any():
        z[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(z) > 2.0
    del bad
    u = z
    u *= std
    mag = np.abs(u)
    mag **= 1.0 / alpha
    np.sign(u, out=u)
    mag *= u  # sign(u) * |u|^(1/alpha), the factors in the plain expression's order
    del u, z
    return mag.astype(np.float32)
