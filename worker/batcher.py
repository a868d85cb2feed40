"""Micro-batching with no Redis in it: a batch closes on size or deadline.

``fetch(count, wait_ms)`` returns up to ``count`` new items, waiting at most
``wait_ms`` for the first one (``0`` = don't wait). The wait after the first
item is recomputed on every call, as in Ray Serve's batching.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Batcher(Generic[T]):
    """Collect up to ``max_batch`` items, waiting ``max_wait_ms`` after the first."""

    def __init__(
        self, fetch: Callable[[int, float], list[T]], *, max_batch: int, max_wait_ms: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fetch = fetch
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.clock = clock

    def next_batch(self, first_wait_ms: float) -> list[T]:
        """Block up to ``first_wait_ms`` for a first item, then fill until size or deadline."""
        items = list(self.fetch(self.max_batch, first_wait_ms))
        if not items:
            return items
        closes_at = self.clock() + self.max_wait_ms / 1000
        while len(items) < self.max_batch:
            left_ms = (closes_at - self.clock()) * 1000
            if left_ms <= 0:
                break
            items.extend(self.fetch(self.max_batch - len(items), left_ms))
        return items
