"""Medusa heads in every layout users already have, in and out.

Read (detected automatically, see ``detect.py``): FasterDecoding heads-only directories (v1 with a
vocab projection per head, "version 2" with the base lm_head; ``.pt`` or ``.safetensors``; also what
TGI and TensorRT-LLM read), axolotl full-model checkpoints (``medusa_head.*`` in the model shards)
and vLLM's Medusa draft directories. Write: ``fasterdecoding``, ``tgi``, ``vllm``,
``trtllm-medusa-dir`` and ``axolotl`` (``convert.TARGETS``). ``keys.py`` pins every layout's tensor
names to the loaders that read them; ``collect.py`` turns any of them into stacked tensors.
"""

from medusa_forge.heads.layouts.collect import HeadsCheckpoint, Source, collect
from medusa_forge.heads.layouts.convert import TARGETS, ExportResult, Inspection, export_heads, inspect_heads, read
from medusa_forge.heads.layouts.detect import LAYOUTS, detect

__all__ = [
    "HeadsCheckpoint",
    "Source",
    "collect",
    "detect",
    "read",
    "export_heads",
    "inspect_heads",
    "TARGETS",
    "LAYOUTS",
    "ExportResult",
    "Inspection",
]
