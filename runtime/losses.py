"""Softmax cross-entropy, the loss of every classifier here."""

from __future__ import annotations

import numpy as np

from .arrays import as_f32
from .errors import ShapeError


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray):
    """Mean cross-entropy of softmax(logits) against integer labels.

    Parameters
    ----------
    logits : (N, K) f4
    labels : (N,) integers in [0, K)

    Returns
    -------
    loss : float, the batch mean (as torch.nn.functional.cross_entropy)
    grad_logits : (N, K) f4, d loss / d logits = (softmax - onehot) / N
    """
    z = as_f32(logits, "softmax_cross_entropy logits")
    y = np.asarray(labels)
    if z.ndim != 2 or y.shape != (z.shape[0],):
        raise ShapeError(f"softmax_cross_entropy: expected logits (N, K) and labels "
                         f"(N,), got {tuple(z.shape)} and {tuple(y.shape)}")
    if y.dtype.kind not in "iu" or (y.size and (y.min() < 0 or y.max() >= z.shape[1])):
        raise ShapeError(f"softmax_cross_entropy: expected integer labels in "
                         f"[0, {z.shape[1]}), got dtype {y.dtype}"
                         + (f" range [{y.min()}, {y.max()}]" if y.size else ""))
    n = z.shape[0]
    shifted = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    log_p = shifted - log_norm
    rows = np.arange(n)
    loss = float(-log_p[rows, y].mean(dtype=np.float64))
    grad = np.exp(log_p)
    grad[rows, y] -= 1.0
    grad /= np.float32(n)
    return loss, grad.astype(np.float32, copy=False)
