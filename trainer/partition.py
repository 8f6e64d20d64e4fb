"""Split a labelled training set among federated clients (IID or Dirichlet/LDA).

Every function works on label arrays and returns index arrays, so a client's
data is ``dataset.subset(part)``. Everything is seeded: the same labels, arguments
and seed give the same split on any machine (``np.random.default_rng``; NumPy
keeps its Generator streams stable across versions for a given BitGenerator).
Each returned index array is int64, sorted ascending, and the parts of one split
are disjoint and together cover ``0..len(labels)-1``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from sparsefedpp.runtime.errors import ConfigError

# Independent random streams for the validation split and the min_size repair,
# so that reusing one seed everywhere does not correlate them with the split.
_VALIDATION_STREAM = 1
_REPAIR_STREAM = 2


def _check_labels(labels: np.ndarray, what: str) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or (y.size and y.dtype.kind not in "iu"):
        raise ConfigError(f"{what} labels: expected a 1-D integer array, got dtype "
                          f"{y.dtype} and shape {y.shape}")
    if y.size and y.min() < 0:
        raise ConfigError(f"{what} labels: expected values >= 0, got {y.min()}")
    return y.astype(np.int64, copy=False)


def _check_int(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{what}: expected an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{what}: expected an integer >= {minimum}, got {value}")
    return int(value)


def _check_num_clients(num_clients: object, n: int, min_size: int, what: str) -> int:
    k = _check_int(num_clients, f"{what} num_clients", 1)
    if k > n // min_size:
        raise ConfigError(f"{what} num_clients: expected at most len(labels) // "
                          f"min_size = {n} // {min_size} = {n // min_size}, got {k}; "
                          "use fewer clients or a smaller min_size")
    return k


def iid(labels: np.ndarray, num_clients: int, *, seed: int) -> list[np.ndarray]:
    """Uniformly random split into ``num_clients`` parts whose sizes differ by <= 1.

    Parameters
    ----------
    labels : np.ndarray
        Integer, shape (N,); only its length matters here.
    num_clients : int
        1 <= num_clients <= N.
    seed : int
        Seeds the shuffle.

    Returns
    -------
    list of np.ndarray
        ``num_clients`` int64 index arrays, sorted; the first ``N % num_clients``
        parts hold one example more than the rest.
    """
    y = _check_labels(labels, "iid")
    k = _check_num_clients(num_clients, y.size, 1, "iid")
    order = np.random.default_rng(_check_int(seed, "iid seed", 0)).permutation(y.size)
    return [np.sort(part) for part in np.array_split(order, k)]


def _check_alpha(alpha: object) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ConfigError(f"dirichlet alpha: expected a finite number > 0, "
                          f"got {alpha!r}") from None
    if not (math.isfinite(a) and a > 0.0):  # also rejects NaN
        raise ConfigError(f"dirichlet alpha: expected a finite number > 0, got "
                          f"{alpha!r}; 1000 is close to IID, 0.1 very skewed")
    return a


def _split_by_proportions(idx: np.ndarray, props: np.ndarray) -> list[np.ndarray]:
    """Cut ``idx`` into len(props) consecutive pieces, piece i ~ props[i] * len(idx).

    Cut points are ``floor(cumsum(props) * n)``, so the sizes sum to n exactly.
    """
    cuts = np.floor(np.cumsum(props)[:-1] * idx.size).astype(np.int64)
    return np.split(idx, np.clip(cuts, 0, idx.size))


def _repair_min_size(parts: list[np.ndarray], min_size: int,
                     rng: np.random.Generator) -> list[np.ndarray]:
    """Move examples to clients below ``min_size`` from the largest clients.

    Clients are repaired in index order. Each deficit is filled from the currently
    largest client (the lowest index among equals), giving at most what it holds
    above ``min_size``; the examples moved are a random choice (``rng``) among the
    donor's. Label counts overall are unchanged. This terminates because
    num_clients * min_size <= N guarantees a donor while any client is short.
    """
    parts = list(parts)
    sizes = np.array([p.size for p in parts], dtype=np.int64)
    for i in range(len(parts)):
        while sizes[i] < min_size:
            donor = int(np.argmax(sizes))  # argmax: first index among equals
            give = int(min(min_size - sizes[i], sizes[donor] - min_size))
            take = np.zeros(sizes[donor], dtype=bool)
            take[rng.choice(sizes[donor], size=give, replace=False)] = True
            parts[i] = np.concatenate([parts[i], parts[donor][take]])
            parts[donor] = parts[donor][~take]
            sizes[i] += give
            sizes[donor] -= give
    return parts


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, *, seed: int,
              min_size: int = 1) -> list[np.ndarray]:
    """Latent Dirichlet allocation (LDA) label split (Hsu et al., 2019).

    For each class in ascending order, its indices are shuffled and cut among the
    clients by proportions drawn from Dir(alpha, ..., alpha). Small alpha gives
    each client few classes (0.1: very skewed); large alpha approaches IID
    (1000: near-uniform label mix, sizes close to N / num_clients).

    Clients left with fewer than ``min_size`` examples are then topped up
    deterministically (no redraw, so small alpha with many clients cannot loop):
    see :func:`_repair_min_size`. The repair moves at most
    ``num_clients * min_size`` examples.

    Parameters
    ----------
    labels : np.ndarray
        Integer, shape (N,), values >= 0.
    num_clients : int
        1 <= num_clients <= N // min_size.
    alpha : float
        Dirichlet concentration, finite and > 0.
    seed : int
        Seeds the shuffles, the proportions and the repair.
    min_size : int
        Minimum examples per client, >= 1.

    Returns
    -------
    list of np.ndarray
        ``num_clients`` int64 index arrays, sorted, each of size >= min_size.
    """
    y = _check_labels(labels, "dirichlet")
    m = _check_int(min_size, "dirichlet min_size", 1)
    k = _check_num_clients(num_clients, y.size, m, "dirichlet")
    a = _check_alpha(alpha)
    s = _check_int(seed, "dirichlet seed", 0)
    rng = np.random.default_rng(s)
    pieces: list[list[np.ndarray]] = [[] for _ in range(k)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        props = rng.dirichlet(np.full(k, a))
        for client, piece in enumerate(_split_by_proportions(idx, props)):
            pieces[client].append(piece)
    parts = [np.concatenate(p) if p else np.zeros(0, np.int64) for p in pieces]
    parts = _repair_min_size(parts, m, np.random.default_rng((s, _REPAIR_STREAM)))
    return [np.sort(p).astype(np.int64, copy=False) for p in parts]


def split_validation(parts: list[np.ndarray], share: float, *,
                     seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Hold out a random ``share`` of every client's examples for validation.

    Client i keeps ``v = min(floor(share * n_i + 0.5), n_i - 1)`` examples for
    validation (round half up, and at least one training example stays).

    Parameters
    ----------
    parts : list of np.ndarray
        Integer index arrays, each non-empty (as from :func:`iid`/:func:`dirichlet`).
    share : float
        In [0, 1); 0 gives empty validation parts.
    seed : int
        Seeds the choice (a stream separate from the split's for the same seed).

    Returns
    -------
    train, validation : list of np.ndarray
        int64 index arrays, sorted, per client; together they are ``parts[i]``.
    """
    try:
        f = float(share)
    except (TypeError, ValueError):
        f = math.nan
    if not 0.0 <= f < 1.0:  # also rejects NaN
        raise ConfigError(f"split_validation share: expected a fraction in [0, 1), "
                          f"got {share!r}")
    rng = np.random.default_rng((_check_int(seed, "split_validation seed", 0),
                                 _VALIDATION_STREAM))
    train, val = [], []
    for i, part in enumerate(parts):
        p = np.asarray(part)
        if p.ndim != 1 or p.size == 0 or p.dtype.kind not in "iu":
            raise ConfigError(f"split_validation part {i}: expected a non-empty 1-D "
                              f"integer array, got dtype {p.dtype}, shape {p.shape}")
        v = min(math.floor(f * p.size + 0.5), p.size - 1)
        held = np.zeros(p.size, dtype=bool)
        held[rng.choice(p.size, size=v, replace=False)] = True
        train.append(np.sort(p[~held]).astype(np.int64, copy=False))
        val.append(np.sort(p[held]).astype(np.int64, copy=False))
    return train, val


def label_histogram(parts: list[np.ndarray], labels: np.ndarray,
                    num_classes: int) -> np.ndarray:
    """Label counts per client.

    Returns
    -------
    np.ndarray
        int64, shape (len(parts), num_classes); row i counts ``labels[parts[i]]``.
    """
    y = _check_labels(labels, "label_histogram")
    k = _check_int(num_classes, "label_histogram num_classes", 1)
    if y.size and y.max() >= k:
        raise ConfigError(f"label_histogram labels: expected values < num_classes = "
                          f"{k}, got {y.max()}")
    hist = np.zeros((len(parts), k), dtype=np.int64)
    for i, part in enumerate(parts):
        hist[i] = np.bincount(y[np.asarray(part, dtype=np.int64)], minlength=k)
    return hist


def label_skew(parts: list[np.ndarray], labels: np.ndarray, num_classes: int) -> float:
    """Mean total-variation distance between each client's label distribution and
    the pooled distribution of all parts: ``mean_i 0.5 * sum_c |p_ic - q_c|``.

    0 means every client has the pooled label mix; 1 is the maximum (each client's
    classes disjoint from the rest's). Empty parts are left out of the mean; at
    least one part must be non-empty.
    """
    hist = label_histogram(parts, labels, num_classes).astype(np.float64)
    sizes = hist.sum(axis=1)
    if not (sizes > 0).any():
        raise ConfigError("label_skew parts: expected at least one example, got none")
    pooled = hist.sum(axis=0) / sizes.sum()
    dist = hist[sizes > 0] / sizes[sizes > 0, None]
    return float(np.mean(0.5 * np.abs(dist - pooled).sum(axis=1)))
