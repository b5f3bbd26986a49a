"""Synthetic cache contents shaped like an ImageNet teacher's: logits and real view parameters, for the
storage and cache-read sections."""

from __future__ import annotations

import numpy as np

from pipeline import views
from pipeline.manifest import ViewsCfg


def synthetic_logits(rng: np.random.Generator, n: int, classes: int) -> np.ndarray:
    """float32 [n, classes] logits shaped like an ImageNet teacher's on DeiT's mixed views: a Gaussian bulk
    N(0, 1.5^2) over all classes plus a heavy head. The view's own class gets +4 + Gamma(2, 2.5), its mix
    partner's class +2 + Gamma(2, 1.5), and five classes from the own class's block of 50 (ImageNet's
    class ids group related classes) +Exp(3) each."""
    z = rng.normal(0.0, 1.5, (n, classes)).astype(np.float32)
    rows = np.arange(n)
    own = rng.integers(classes, size=n)
    z[rows, own] += 4 + rng.gamma(2.0, 2.5, n)
    z[rows, rng.integers(classes, size=n)] += 2 + rng.gamma(2.0, 1.5, n)
    block = min(50, classes)
    for _ in range(5):
        near = np.minimum(own // block * block + rng.integers(block, size=n), classes - 1)
        z[rows, near] += rng.exponential(3.0, n)
    return z


def imagenet_like_params(rng: np.random.Generator, shards: int, positions: int) -> np.ndarray:
    """Real view parameters [shards, positions, N] from DeiT's recipe (`ViewsCfg()` defaults) for sources
    whose long side is uniform in 300..640 px and aspect in 0.6..1.8, as ImageNet's photos vary."""
    cfg = ViewsCfg()
    out = np.zeros((shards, positions, views.N_PARAMS), np.float32)
    for s in range(shards):
        for p in range(positions):
            long, aspect = int(rng.integers(300, 641)), rng.uniform(0.6, 1.8)
            size = (long, max(1, round(long / aspect))) if aspect >= 1 else (max(1, round(long * aspect)), long)
            out[s, p] = views.sample_params(cfg, 0, s, p, positions, size, size=224)
    return out
