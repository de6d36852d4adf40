"""The one percentile summary every benchmark reports (latency, TTFT, overhead)."""

from __future__ import annotations

import numpy as np

QUANTILES = (50, 90, 99)


def percentiles(values, digits: int = 3) -> dict[str, float]:
    """count, mean, p50/p90/p99, min and max of ``values``, rounded; zeros (count 0) when empty, so
    a summary's fields are the same whatever was measured."""
    if len(values) == 0:
        return {"count": 0, "mean": 0.0, **{f"p{q}": 0.0 for q in QUANTILES}, "min": 0.0, "max": 0.0}
    a = np.asarray(values, dtype=np.float64)
    out = {"count": int(a.size), "mean": round(float(a.mean()), digits)}
    out |= {f"p{q}": round(float(np.percentile(a, q)), digits) for q in QUANTILES}
    return out | {"min": round(float(a.min()), digits), "max": round(float(a.max()), digits)}
