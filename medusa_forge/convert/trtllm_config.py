"""The TensorRT-LLM Medusa checkpoint's ``config.json``: what we write, and the spec the other modules read.

Two releases are written (``trtllm_profiles``). For **1.2.1** the keys are those of its
``examples/medusa/convert_checkpoint.py`` (@b93e14ca): the 0.11 keys below without ``share_embedding_table``,
plus ``model_type`` (the HF config's: llama, mistral, qwen2) and ``qwen_type: qwen2`` for Qwen2, which
``MedusaConfig`` uses to wrap a ``QWenConfig`` (q/k/v biases) instead of a ``LLaMAConfig``; ``rotary_scaling``
may be llama3 there. For **0.11**, pinned to TensorRT-LLM v0.11.0 — commit 05316d3313360012536ace46c781518f5afae75e (``tensorrt_llm/version.py``
says ``0.11.0``), the release in ``nvcr.io/nvidia/tritonserver:24.07-trtllm-python-py3`` whose backend templates
``serve/trtllm_repo.py`` pins (tensorrtllm_backend v0.11.0). Sources read (NVIDIA/TensorRT-LLM):

- ``examples/medusa/convert_checkpoint.py`` (0.11 line; stored snapshot 063e02f73410f2f9172a581ca5e3f41d0d3dab8e):
  the ``config`` dict of ``__main__`` — the keys and order of :func:`trtllm_config`:
  ``architecture='MedusaForCausalLM'``, ``dtype``, ``logits_dtype='float32'``, the Llama sizes from the HF
  config, ``position_embedding_type='rope_gpt_neox'``, ``hidden_act``, ``rotary_base``, ``rotary_scaling``,
  ``norm_epsilon``, ``quantization={quant_algo, kv_cache_quant_algo}``, ``mapping={world_size, tp_size,
  pp_size}``, ``use_parallel_embedding=False``, ``embedding_sharding_dim=0``, ``share_embedding_table=False``,
  ``max_draft_len`` (``--max_medusa_token_len``, default 63), ``num_medusa_heads``, ``num_medusa_layers``.
- ``tensorrt_llm/models/medusa/config.py`` ``MedusaConfig(LLaMAConfig)``: reads ``num_medusa_heads``,
  ``num_medusa_layers``, ``max_draft_len``; ``tensorrt_llm/models/llama/model.py`` @05316d33: attention uses
  ``config.head_size`` (``PretrainedConfig``: ``hidden_size // num_attention_heads`` unless given).
- ``tensorrt_llm/quantization/quantize_by_modelopt.py`` ``combine_medusa_weight`` (what ``examples/quantization/
  quantize.py --qformat fp8 --medusa_model_dir ..`` writes): ``architecture`` becomes ``MedusaForCausalLM``,
  ``quantization.exclude_modules = ['lm_head', '*router', '*vocab_embedding', '*position_embedding',
  '*block_embedding', '*medusa_heads*']`` (the last one unless ``--quant_medusa_head``), ``quant_algo='FP8'``.

Upstream pitfalls we fix rather than copy (each gives a checkpoint that builds but runs wrong):
``num_medusa_heads`` is written from the flag (default 4), not the heads' config; ``rotary_base``,
``rotary_scaling`` and ``hidden_act`` come from flags, never from the HF config; ``head_size`` is never
written, so a model whose ``head_dim`` is not hidden/heads gets the wrong attention. Here every field comes
from the HF model's and the heads' own configs, and ``head_size`` is added exactly when it differs from
TensorRT-LLM's default. Pipeline parallelism is not offered (upstream writes every layer to every pp rank).
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, fields
from pathlib import Path
from typing import Any

from medusa_forge.convert.trtllm_profiles import TrtllmProfile, profile_of_config
from medusa_forge.errors import ForgeError
from medusa_forge.jsonl import read_json_object
from medusa_forge.model.config import ModelConfig

ARCHITECTURE = "MedusaForCausalLM"
DTYPES = ("float16", "bfloat16")
QUANT_FP8 = "FP8"
# quantize_by_modelopt.combine_medusa_weight: modules an FP8 Medusa checkpoint leaves unquantized.
FP8_EXCLUDE_MODULES = (
    "lm_head",
    "*router",
    "*vocab_embedding",
    "*position_embedding",
    "*block_embedding",
    "*medusa_heads*",
)
DEFAULT_MAX_DRAFT_LEN = 63  # what a config.json without max_draft_len means (upstream default)
DEFAULT_TREE = "mc_sim_7b_63"  # the serving tree when none is named: 63 nodes, so max_draft_len 63


@dataclass(frozen=True)
class CheckpointSpec(ModelConfig):
    """The model's config plus everything else that fixes a checkpoint's tensor names, shapes and dtypes."""

    _: KW_ONLY
    num_medusa_heads: int
    num_medusa_layers: int
    tp_size: int = 1
    dtype: str = "float16"  # the checkpoint's weights, which need not be the HF config's torch_dtype
    quant_algo: str | None = None  # None | "FP8"
    kv_cache_quant_algo: str | None = None  # None | "FP8"

    @property
    def head_size(self) -> int:
        """TensorRT-LLM's name for head_dim."""
        return self.head_dim

    @property
    def vocab_padded(self) -> int:
        """lm_head rows: the vocabulary padded to a multiple of tp (``pad_vocab_size``); padded logits are never
        sampled (the runtime reads the first vocab_size), and the reader drops those rows."""
        return -(-self.vocab_size // self.tp_size) * self.tp_size

    @property
    def fp8(self) -> bool:
        return self.quant_algo == QUANT_FP8

    @property
    def kv_heads_per_rank(self) -> int:
        """KV heads each rank holds; fewer KV heads than ranks are replicated (convert_utils.dup_kv_weight)."""
        return max(self.num_kv_heads // self.tp_size, 1)

    def check(self, where: str) -> None:
        """Every split TensorRT-LLM makes must be exact: one line naming the dimension that does not divide."""
        tp = self.tp_size
        if tp < 1:
            raise ForgeError(f"{where}: tp_size must be >= 1, got {tp}")
        for name, size in (
            ("num_attention_heads", self.num_heads),
            ("intermediate_size", self.intermediate_size),
            ("hidden_size (Medusa ResBlocks are split on their output)", self.hidden_size),
        ):
            if size % tp:
                raise ForgeError(f"{where}: tp_size {tp} does not divide {name} {size}")
        kv = self.num_kv_heads
        if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
            raise ForgeError(
                f"{where}: tp_size {tp} and num_key_value_heads {kv}: one must divide the other "
                "(KV heads are split, or replicated when there are fewer than ranks)"
            )
        if self.dtype not in DTYPES + ("float32",):
            raise ForgeError(f"{where}: dtype {self.dtype!r} not supported; choose {' or '.join(DTYPES)}")
        if self.quant_algo not in (None, QUANT_FP8):
            raise ForgeError(f"{where}: quant_algo {self.quant_algo!r} not supported (only FP8 or none)")
        if self.kv_cache_quant_algo not in (None, QUANT_FP8) or (self.kv_cache_quant_algo and not self.fp8):
            raise ForgeError(
                f"{where}: kv_cache_quant_algo {self.kv_cache_quant_algo!r} not supported "
                "(only FP8, with quant_algo FP8)"
            )


def spec_for(
    cfg: ModelConfig,
    num_medusa_heads: int,
    num_medusa_layers: int,
    tp_size: int,
    dtype: str,
    fp8: bool = False,
    fp8_kv_cache: bool = False,
) -> CheckpointSpec:
    return CheckpointSpec(
        **_model_fields(cfg),
        num_medusa_heads=num_medusa_heads,
        num_medusa_layers=num_medusa_layers,
        tp_size=tp_size,
        dtype=dtype,
        quant_algo=QUANT_FP8 if fp8 else None,
        kv_cache_quant_algo=QUANT_FP8 if fp8_kv_cache else None,
    )


def _model_fields(cfg: ModelConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in fields(ModelConfig)}


MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_type(cfg: ModelConfig) -> str | None:
    return cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type")) if cfg.rope_scaling else None


def rotary_scaling(cfg: ModelConfig) -> dict | None:
    """HF ``rope_scaling`` as TensorRT-LLM takes it: ``{"type": "linear", "factor": f}``, or for llama3 every
    field its RoPE needs (upstream's 1.x converter keeps only ``type`` and so loses the factors)."""
    kind = rope_type(cfg)
    if kind is None:
        return None
    if kind == "linear":
        return {"type": "linear", "factor": float(cfg.rope_scaling["factor"])}
    out = {"type": kind, "rope_type": kind}
    out.update({k: cfg.rope_scaling[k] for k in LLAMA3_KEYS})
    return out


def trtllm_config(
    cfg: ModelConfig, spec: CheckpointSpec, max_draft_len: int, source: str, profile: TrtllmProfile
) -> dict[str, Any]:
    """config.json with that release's examples/medusa/convert_checkpoint.py keys, in its order
    (``head_size`` only if needed)."""
    if max_draft_len < 1:
        raise ForgeError(f"--max-draft-len must be >= 1, got {max_draft_len}")
    profile.check_model(cfg.architecture, rope_type(cfg), source)
    quant: dict[str, Any] = {"quant_algo": spec.quant_algo, "kv_cache_quant_algo": spec.kv_cache_quant_algo}
    if spec.fp8:
        quant["exclude_modules"] = list(FP8_EXCLUDE_MODULES)
    config = {
        "architecture": ARCHITECTURE,
        "dtype": spec.dtype,
        "logits_dtype": "float32",
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_key_value_heads": cfg.num_kv_heads,
        "vocab_size": cfg.vocab_size,
        "position_embedding_type": "rope_gpt_neox",
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": "silu",  # Llama/Mistral; TensorRT-LLM's Medusa ResBlocks use it too (medusa/model.py)
        "rotary_base": float(cfg.rope_theta),
        "rotary_scaling": rotary_scaling(cfg),
        "norm_epsilon": float(cfg.rms_norm_eps),
        "quantization": quant,
        "mapping": {"world_size": spec.tp_size, "tp_size": spec.tp_size, "pp_size": 1},
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "share_embedding_table": False,
        "max_draft_len": max_draft_len,
        "num_medusa_heads": spec.num_medusa_heads,
        "num_medusa_layers": spec.num_medusa_layers,
    }
    if not profile.share_embedding_table_field:
        del config["share_embedding_table"]
    if profile.model_type_field:
        config["model_type"] = MODEL_TYPES[cfg.architecture]
        if config["model_type"] == "qwen2":
            config["qwen_type"] = "qwen2"
    if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
        config["head_size"] = cfg.head_dim
    return config


# ------------------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class CheckpointConfig:
    """A TensorRT-LLM Medusa checkpoint's config.json, read and validated."""

    directory: Path
    raw: dict[str, Any]
    spec: CheckpointSpec
    max_draft_len: int

    @property
    def profile(self) -> TrtllmProfile:
        return profile_of_config(self.raw)

    def rank_file(self, rank: int) -> Path:
        return self.directory / f"rank{rank}.safetensors"

    def model_config(self, eos_token_ids: tuple[int, ...] = (), bos_token_id: int | None = None) -> ModelConfig:
        """The native decoder's config for these weights, with the tokenizer's special ids."""
        return ModelConfig(**_model_fields(self.spec) | {"eos_token_ids": eos_token_ids, "bos_token_id": bos_token_id})


def _int(d: dict, key: str, where: Path, default: int | None = None) -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ForgeError(f"{where}: field {key!r} must be a non-negative integer, got {v!r}")
    return v


def _rope_scaling(scaling: dict | None) -> dict | None:
    """TensorRT-LLM's rotary_scaling as HF's rope_scaling (the fields our RoPE reads)."""
    if scaling and scaling.get("type") == "llama3":
        return {"rope_type": "llama3", **{k: scaling[k] for k in LLAMA3_KEYS}}
    return {"rope_type": "linear", "factor": float(scaling["factor"])} if scaling else None


def read_config(ckpt_dir: str | Path) -> CheckpointConfig:
    """Read ``DIR/config.json`` of a TensorRT-LLM Medusa checkpoint into a spec (one-line errors)."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / "config.json"
    if not ckpt_dir.is_dir():
        raise ForgeError(f"{ckpt_dir}: TensorRT-LLM checkpoint directory not found")
    d = read_json_object(path, "not found; expected a TensorRT-LLM checkpoint (`medusa-forge convert trtllm` output)")
    if d.get("architecture") != ARCHITECTURE:
        raise ForgeError(
            f"{path}: architecture {d.get('architecture')!r} is not {ARCHITECTURE!r} (only Medusa checkpoints are read)"
        )
    if d.get("position_embedding_type", "rope_gpt_neox") != "rope_gpt_neox":
        raise ForgeError(f"{path}: position_embedding_type {d['position_embedding_type']!r} is not rope_gpt_neox")
    if d.get("hidden_act", "silu") != "silu":
        raise ForgeError(f"{path}: hidden_act {d['hidden_act']!r}: only silu (Llama/Mistral) is read")
    scaling = d.get("rotary_scaling")
    if scaling and scaling.get("type") not in ("linear", "llama3"):
        raise ForgeError(f"{path}: rotary_scaling {scaling!r}: only linear and llama3 scaling are read")
    if scaling and scaling.get("type") == "llama3" and not all(k in scaling for k in LLAMA3_KEYS):
        raise ForgeError(f"{path}: llama3 rotary_scaling lacks {', '.join(k for k in LLAMA3_KEYS if k not in scaling)}")
    if d.get("use_parallel_embedding") or d.get("share_embedding_table"):
        raise ForgeError(f"{path}: use_parallel_embedding/share_embedding_table checkpoints are not read")
    mapping = d.get("mapping") or {}
    tp, pp = _int(mapping, "tp_size", path, 1), _int(mapping, "pp_size", path, 1)
    if pp != 1:
        raise ForgeError(f"{path}: pp_size {pp} is not supported (pipeline-parallel Medusa checkpoints are not read)")
    if _int(mapping, "world_size", path, tp) != tp:
        raise ForgeError(f"{path}: mapping.world_size {mapping['world_size']} != tp_size {tp} x pp_size {pp}")
    heads, hidden = _int(d, "num_attention_heads", path), _int(d, "hidden_size", path)
    if heads == 0:
        raise ForgeError(f"{path}: num_attention_heads must be >= 1")
    quant = d.get("quantization") or {}
    qkv_bias = "qwen" in str(d.get("model_type", ""))
    spec = CheckpointSpec(
        vocab_size=_int(d, "vocab_size", path),
        hidden_size=hidden,
        intermediate_size=_int(d, "intermediate_size", path),
        num_layers=_int(d, "num_hidden_layers", path),
        num_heads=heads,
        num_kv_heads=_int(d, "num_key_value_heads", path, heads) or heads,
        head_dim=_int(d, "head_size", path, hidden // heads),
        rms_norm_eps=float(d.get("norm_epsilon", 1e-5)),
        rope_theta=float(d.get("rotary_base", 10000.0)),
        rope_scaling=_rope_scaling(scaling),
        max_position_embeddings=int(d.get("max_position_embeddings") or 2048),
        bos_token_id=None,  # the tokenizer's, not the checkpoint's: CheckpointConfig.model_config
        eos_token_ids=(),
        architecture="Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM",
        torch_dtype=str(d.get("dtype")),
        qkv_bias=qkv_bias,
        num_medusa_heads=_int(d, "num_medusa_heads", path),
        num_medusa_layers=_int(d, "num_medusa_layers", path),
        tp_size=tp,
        dtype=str(d.get("dtype")),
        quant_algo=quant.get("quant_algo"),
        kv_cache_quant_algo=quant.get("kv_cache_quant_algo"),
    )
    if spec.num_medusa_heads < 1:
        raise ForgeError(f"{path}: num_medusa_heads must be >= 1")
    spec.check(str(path))
    if spec.fp8:
        missing = [m for m in ("lm_head", "*medusa_heads*") if m not in (quant.get("exclude_modules") or [])]
        if missing:
            raise ForgeError(
                f"{path}: FP8 checkpoint quantizes {missing[0]!r} (not in quantization.exclude_modules); "
                "only the decoder blocks' GEMMs may be FP8"
            )
    return CheckpointConfig(ckpt_dir, d, spec, _int(d, "max_draft_len", path, DEFAULT_MAX_DRAFT_LEN))
