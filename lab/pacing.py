"""A paced bot for the long-running lab commands (soak, chaos): steady load, not as fast as possible."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from producer import Client
from protocol.errors import ReplyError

# Gets each prediction's outcome: None (answered) or the error code, and the latency in ms.
Record = Callable[[str | None, float], None]


def paced_bot(url: str, model: str, rate_rps: float, stop: threading.Event, record: Record, *,
              timeout_s: float, seed: int = 5) -> None:
    """Send one reference-shaped prediction every ``1 / rate_rps`` seconds until ``stop``."""
    x = np.random.default_rng(seed).standard_normal((60, 110)).astype(np.float32)
    period_s, next_at = 1.0 / rate_rps, time.monotonic()
    with Client.from_url(url, timeout_s=timeout_s) as client:
        while not stop.is_set():
            next_at += period_s
            started = time.perf_counter()
            try:
                client.predict(model, x)
                code = None
            except ReplyError as e:
                code = e.code
            record(code, (time.perf_counter() - started) * 1000)
            stop.wait(max(0.0, next_at - time.monotonic()))
