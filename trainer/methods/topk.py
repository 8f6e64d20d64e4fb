"""Top-k: plain layers and dense local training; after it, global magnitude
pruning of the upload to the target (the base Method's behaviour)."""

from __future__ import annotations

from .base import Method


class TopK(Method):
    name = "topk"


METHOD = TopK()
