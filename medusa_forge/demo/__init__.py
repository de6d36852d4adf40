"""``medusa-forge demo``: the whole job on the shipped model, from heads to a gated promotion.

heads (shipped with the package, or ``--heads DIR``) -> a base and a Medusa native engine -> one
tritonserver hosting both -> a streamed gRPC query -> ``eval mmlu`` of both on the shipped
MMLU-format questions -> ``eval speed`` per topic -> ``eval report`` -> ``promote`` of the candidate
(passes) and of a degraded candidate (rejected, registry unchanged) -> a summary table.
"""

from medusa_forge.demo.assets import shipped_heads, shipped_mmlu
from medusa_forge.demo.pipeline import DemoConfig, run_demo

__all__ = ["DemoConfig", "run_demo", "shipped_heads", "shipped_mmlu"]
