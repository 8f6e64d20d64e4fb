"""The aggregator's state file: everything a restarted ``serve`` needs to resume.

One codec message (``state_dir/federation.sfpp``), written atomically after every
round: the global model, the next round, the cumulative bytes, a fingerprint of
the configuration (a state file never resumes another federation) and the digests
of the updates counted in the last ``COUNTED_ROUNDS`` rounds (an update re-sent
after a restart is acknowledged, not counted twice).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sparsefedpp.runtime.checkpoint import write_atomic
from sparsefedpp.runtime.errors import CodecError, ConfigError, StateError
from sparsefedpp.runtime.wire import codec
from sparsefedpp.runtime.wire.checks import tensors_problem

Tensors = dict[str, np.ndarray]
STATE_FILE = "federation.sfpp"
COUNTED_ROUNDS = 3        # rounds whose counted update digests the state file keeps


@dataclass
class SavedState:
    """What a state file holds; ``counted``: digest -> (round, device)."""

    tensors: Tensors
    next_round: int
    totals: dict
    counted: dict[str, tuple[int, str]]


def load(path: Path, fingerprint: dict, reference: Tensors) -> SavedState | None:
    """The state saved at ``path`` (None if there is none), checked against this
    configuration's ``fingerprint`` and the model's names, shapes and dtypes."""
    if not path.exists():
        return None
    try:
        msg = codec.decode(path.read_bytes())
    except (OSError, CodecError) as e:
        raise StateError(f"federation state {path}: expected a readable state file, "
                         f"got {e}; move it away to start over") from None
    saved = msg.meta.get("fingerprint")
    if saved != fingerprint:
        raise ConfigError(f"federation state {path}: written for another "
                          f"configuration (saved {saved}, now {fingerprint}); use "
                          f"another state folder to start a new federation")
    problem = tensors_problem(msg.tensors, reference, max_integer=None)
    if problem:
        raise StateError(f"federation state {path}: {problem}")
    counted = {str(digest): (int(rnd), str(device))  # absent in older state files
               for rnd, device, digest in msg.meta.get("counted", [])}
    return SavedState(dict(msg.tensors), int(msg.meta["next_round"]),
                      dict(msg.meta.get("totals", {})), counted)


def recent(counted: dict[str, tuple[int, str]], next_round: int) -> dict:
    """The counted digests of the last ``COUNTED_ROUNDS`` rounds (the rest are
    dropped: an update that old is refused by its round number anyway)."""
    oldest = next_round - COUNTED_ROUNDS
    return {d: v for d, v in counted.items() if v[0] >= oldest}


def save(path: Path, state: SavedState, *, method: str, fingerprint: dict) -> None:
    """Write ``state`` atomically (a crash mid-write leaves the previous file)."""
    counted = sorted([rnd, device, digest]
                     for digest, (rnd, device) in state.counted.items())
    msg = codec.Message("model", state.next_round, "aggregator", method,
                        state.tensors, 0, {"fingerprint": fingerprint,
                                           "next_round": state.next_round,
                                           "totals": state.totals,
                                           "counted": counted})
    data = codec.encode(msg, "csr")
    write_atomic(path, lambda f: f.write(data))
