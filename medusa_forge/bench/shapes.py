"""The large-model shape the step, profile, GEMM and kernel benchmarks time with random weights."""

from __future__ import annotations

from medusa_forge.model.config import ModelConfig

LLAMA3_8B = ModelConfig(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=8192,
    eos_token_ids=(128001,),
)

SHAPES = {"llama3-8b": LLAMA3_8B}
