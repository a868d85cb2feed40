"""The reference model's synthetic market data: numpy only, so bots and the demo need no torch."""

from __future__ import annotations

import numpy as np

LABELS = ("down", "flat", "up")
TIMESTEPS = 60
N_FEATURES = 110


def synthetic_dataset(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Market-like series: a regime drift hidden in noisy, correlated features.

    Each sample has a latent drift (down / flat / up) that shows up as a small
    bias in a return series; 110 features mix lagged returns, rolling means and
    pure noise, so the label is learnable but not trivially.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    drift = (labels - 1).astype(np.float32) * 0.35
    returns = rng.standard_normal((n, TIMESTEPS)).astype(np.float32) + drift[:, None]
    loadings = rng.standard_normal((1, 1, N_FEATURES)).astype(np.float32) * 0.6
    cumulative = np.cumsum(returns, axis=1) / np.sqrt(np.arange(1, TIMESTEPS + 1))
    x = loadings * returns[:, :, None] + 0.3 * cumulative[:, :, None]
    x += rng.standard_normal((n, TIMESTEPS, N_FEATURES)).astype(np.float32)
    return x.astype(np.float32), labels.astype(np.int64)
