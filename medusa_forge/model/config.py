"""ModelConfig: the fields our decoder needs, read from a Hugging Face ``config.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medusa_forge.errors import ForgeError
from medusa_forge.jsonl import read_json_object

# Qwen2 is a Llama decoder with q/k/v projection biases (and a larger rope_theta).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    architecture: str = "LlamaForCausalLM"
    torch_dtype: str = "bfloat16"
    sliding_window: int | None = None
    qkv_bias: bool = False  # Qwen2: q_proj, k_proj, v_proj carry biases
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        archs = d.get("architectures") or [d.get("model_type", "?")]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ForgeError(
                f"{source}: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in d:
                raise ForgeError(f"{source}: missing required field {key!r}")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ForgeError(f"{source}: attention_bias/mlp_bias=true is not supported by the Llama decoder")
        if d.get("use_sliding_window"):
            raise ForgeError(f"{source}: use_sliding_window=true is not supported (full attention only)")
        num_heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        # RoPE: transformers<5 keeps rope_theta/rope_scaling at top level, transformers>=5 under rope_parameters.
        rope = dict(d.get("rope_parameters") or {})
        theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        scaling = d.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"} if rope else None)
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type not in ("default", "llama3", "linear"):
            raise ForgeError(f"{source}: unsupported rope type {rope_type!r} (supported: default, llama3, linear)")
        if rope_type == "default":
            scaling = None
        eos = d.get("eos_token_id", 2)
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
        num_kv = int(d.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv:
            raise ForgeError(
                f"{source}: num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv}"
            )
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=int(d.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_scaling=dict(scaling) if scaling else None,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            architecture=arch,
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "bfloat16"),
            sliding_window=d.get("sliding_window") if arch != "Qwen2ForCausalLM" else None,
            qkv_bias=arch == "Qwen2ForCausalLM",
            extra={k: v for k, v in d.items() if k.startswith("medusa_")},
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        d = read_json_object(path, "not found (expected a Hugging Face model directory)")
        return cls.from_hf_dict(d, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", (2,)))
        return cls(**d)

    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h + (q + 2 * kv) * self.qkv_bias
        return v * h * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + h
