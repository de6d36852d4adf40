"""The base decoder: config, compact Llama-family implementation, HF checkpoint loading."""

from medusa_forge.model.config import ModelConfig
from medusa_forge.model.llama import KVCache, Transformer

__all__ = ["ModelConfig", "Transformer", "KVCache"]
