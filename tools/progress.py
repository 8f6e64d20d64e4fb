"""A dependency-free progress bar on stderr, redrawn at most ten times a second."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    """``update(done, total, **info)`` redraws one line; ``close()`` ends it.

    Disabled (prints nothing) with ``enabled=False`` or when stderr is not a terminal
    and ``force`` is False, so logs stay clean.
    """

    def __init__(self, label: str, *, enabled: bool = True, force: bool = False):
        self.label = label
        self.enabled = enabled and (force or sys.stderr.isatty())
        self._last = 0.0
        self._start = time.perf_counter()

    def update(self, done: int, total: int, **info) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last < 0.1 and done < total:
            return
        self._last = now
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 30)
        rate = done / max(now - self._start, 1e-9)
        extra = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in info.items())
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {done}/{total} "
                         f"{rate:.1f} it/s {extra}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def say(message: str, *, quiet: bool = False) -> None:
    """One human-readable line on stderr (silenced by --quiet)."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)
