"""JSON-lines metrics: one object per event with ``event`` and ``time``, snake_case keys."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class MetricsWriter:
    """Append events to a file (``-`` means stdout); each line is flushed at once so
    tools can follow a run while it goes."""

    def __init__(self, path: str | Path | None):
        self._own = False
        if path is None:
            self._f = None
        elif str(path) == "-":
            self._f = sys.stdout
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            self._own = True

    def write(self, event: str, **fields) -> dict:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
        return record

    def close(self) -> None:
        if self._own:
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(path: str | Path) -> list[dict]:
    """All events of a JSON-lines file (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
