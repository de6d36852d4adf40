"""Load a Hugging Face Llama/Mistral checkpoint directory into our :class:`Transformer`.

Only safetensors are read (never pickles). Every tensor's name and shape is checked against the
config from the file headers before any weight is materialised, so a wrong or truncated
checkpoint fails with one line naming the file and tensor.

``hf_to_native`` is the single name map between transformers' layout and ours; the TensorRT-LLM
converter and reader build on it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from medusa_forge.errors import ForgeError
from medusa_forge.model.config import ModelConfig
from medusa_forge.model.dtypes import parse_dtype
from medusa_forge.model.llama import Transformer


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors shards of a HF model directory (single file or sharded with an index)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ForgeError(f"{index}: malformed safetensors index ({e})") from None
        files = sorted({model_dir / f for f in weight_map.values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
        files = [f for f in files if not f.name.startswith("medusa_")]
    if not files:
        if list(model_dir.glob("*.bin")):
            raise ForgeError(
                f"{model_dir}: only PyTorch .bin weights found; convert them to safetensors first "
                "(pickled checkpoints are not loaded)"
            )
        raise ForgeError(f"{model_dir}: no *.safetensors weights found")
    for f in files:
        if not f.is_file():
            raise ForgeError(f"{f}: listed in the safetensors index but missing")
    return files


def read_tensor_headers(files: Iterable[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """name -> (file, shape), from headers only."""
    out: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    out[name] = (f, tuple(sf.get_slice(name).get_shape()))
        except (SafetensorError, OSError, ValueError) as e:
            raise ForgeError(f"{f}: not a readable safetensors file ({e})") from None
    return out


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (cfg.intermediate_size, h),
                p + "mlp.up_proj.weight": (cfg.intermediate_size, h),
                p + "mlp.down_proj.weight": (h, cfg.intermediate_size),
            }
        )
        if cfg.qkv_bias:
            shapes.update(
                {
                    p + "self_attn.q_proj.bias": (q,),
                    p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,),
                }
            )
    return shapes


def hf_to_native(cfg: ModelConfig, get: callable[[str], Tensor]) -> dict[str, Tensor]:
    """Build our state dict from HF tensors (fusing QKV and gate/up), given a getter by HF name."""
    sd = {"embed.weight": get("model.embed_tokens.weight"), "norm.weight": get("model.norm.weight")}
    sd["lm_head.weight"] = sd["embed.weight"] if cfg.tie_word_embeddings else get("lm_head.weight")
    for i in range(cfg.num_layers):
        p, n = f"model.layers.{i}.", f"layers.{i}."
        sd[n + "attn_norm.weight"] = get(p + "input_layernorm.weight")
        sd[n + "ffn_norm.weight"] = get(p + "post_attention_layernorm.weight")
        sd[n + "attn.wqkv.weight"] = torch.cat([get(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
        if cfg.qkv_bias:
            sd[n + "attn.wqkv.bias"] = torch.cat([get(p + f"self_attn.{x}_proj.bias") for x in "qkv"])
        sd[n + "attn.wo.weight"] = get(p + "self_attn.o_proj.weight")
        sd[n + "ffn.w_gate_up.weight"] = torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
        sd[n + "ffn.w_down.weight"] = get(p + "mlp.down_proj.weight")
    return sd


def build_model(cfg: ModelConfig, state_dict: dict[str, Tensor], dtype: torch.dtype, device) -> Transformer:
    """Instantiate a Transformer with the given weights (no random init is ever computed)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    sd = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.eval().requires_grad_(False)


def load_hf_model(
    model_dir: str | Path, dtype: str | torch.dtype = "float32", device="cpu", cfg: ModelConfig | None = None
) -> Transformer:
    """Load and validate a HF checkpoint directory into our decoder (``cfg``: its config.json, already read)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ForgeError(f"{model_dir}: model directory not found")
    cfg = cfg or ModelConfig.from_dir(model_dir)
    headers = read_tensor_headers(checkpoint_files(model_dir))
    for name, shape in expected_hf_shapes(cfg).items():
        if name not in headers:
            if name == "lm_head.weight" and "model.embed_tokens.weight" in headers:
                cfg = ModelConfig.from_dict({**cfg.to_dict(), "tie_word_embeddings": True})
                continue
            raise ForgeError(f"{model_dir}: tensor {name} missing from the checkpoint")
        if headers[name][1] != shape:
            raise ForgeError(
                f"{headers[name][0]}: tensor {name} has shape {list(headers[name][1])}, "
                f"config.json implies {list(shape)}"
            )
    return build_model(cfg, hf_to_native(cfg, tensor_getter(headers)), parse_dtype(dtype), device)


def tensor_getter(
    headers: dict[str, tuple[Path, tuple[int, ...]]], what: str = "checkpoint"
) -> Callable[[str], Tensor]:
    """name -> tensor, each shard opened once; a missing or unreadable tensor is one ForgeError naming it."""
    handles: dict[Path, object] = {}

    def get(name: str) -> Tensor:
        if name not in headers:
            raise ForgeError(f"{what}: tensor {name} missing")
        f = headers[name][0]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt")
        try:
            return handles[f].get_tensor(name)
        except SafetensorError as e:
            raise ForgeError(f"{f}: tensor {name} is corrupt or truncated ({e})") from None

    return get
