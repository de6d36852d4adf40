"""The base decoder: config, compact Llama-family implementation, HF checkpoint loading, FP8 linears
(fp8_linear), the tokenizer, GEMM layouts, dtype names and device choice (dtypes), full forward passes."""

from medusa_forge.model.config import ModelConfig
from medusa_forge.model.llama import KVCache, Transformer

__all__ = ["ModelConfig", "Transformer", "KVCache"]
