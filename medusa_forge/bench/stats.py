"""Benchmarks' percentile summary: the one in :mod:`medusa_forge.stats`, where eval can import it too."""

from medusa_forge.stats import QUANTILES, percentiles

__all__ = ["QUANTILES", "percentiles"]
