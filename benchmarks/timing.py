"""What the benchmarks share: a median wall time and the JSON result file (with the device named).

The scripts run as `python benchmarks/NAME.py`, which puts this folder on the import path.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np


def median_seconds(fn, repeats: int, warmup: bool = True) -> float:
    """Median wall seconds of `fn()` (its result blocked on) over `repeats` calls, after one warm-up call."""
    if warmup:
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def write_result(path: str, **payload) -> None:
    """Writes `payload` plus the device as indented JSON to `path` and says so."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(dict(payload, device=str(jax.devices()[0])), f, indent=2)
    print(f"wrote {path}")
