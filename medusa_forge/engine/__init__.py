"""The native Medusa engine: static KV cache, tree verification, CUDA graphs."""

from medusa_forge.engine.generation import GenerationConfig, GenerationResult
from medusa_forge.engine.medusa_engine import MedusaEngine

__all__ = ["GenerationConfig", "GenerationResult", "MedusaEngine"]
