"""vLLM's Medusa draft-model directory.

Pinned to vllm-project/vllm: ``vllm/transformers_utils/configs/medusa.py``@0531c22 (``MedusaConfig``:
``model_type = "medusa"``, fields ``hidden_size``, ``vocab_size``, ``num_heads``, ``num_hidden_layers``,
``max_paths``, ``topk``, ``truncated_vocab_size``; ``from_pretrained`` renames any config key containing
"num" and "heads" to ``num_heads`` and "num" and "layers" to ``num_hidden_layers``, which is how a
FasterDecoding ``medusa_num_heads`` maps) and ``vllm/model_executor/models/medusa.py``@09cddad
(``ResidualBlock.layers[j] = nn.Linear(H, H, bias=config.medusa_fc_bias)`` defaulting to no bias,
``lm_heads[k]`` of ``truncated_vocab_size`` rows, or one ``lm_head`` shared by all heads when
``original_lm_head`` is set; ``load_weights`` strips ``medusa_heads.``, accepts ``lm_heads.0.weight`` for
the shared ``lm_head.weight``, and silently skips names it does not know). The registry maps
``architectures: ["MedusaModel"]`` to this class; the draft model's weights are the directory's
``*.safetensors``.

vLLM computes with the stored ``lm_head`` copy; this layout is read as shared-lm_head heads, so the
copy must equal the base model's lm_head (``heads inspect/export --base-model`` check that).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from medusa_forge.errors import ForgeError
from medusa_forge.heads.layouts.collect import MAX_HEADS, HeadsCheckpoint, Source, named_tensors
from medusa_forge.heads.layouts.keys import VLLM, VLLM_LM_HEAD, VLLM_LM_HEAD_ALIAS, VLLM_STRIPPED_PREFIX
from medusa_forge.heads.layouts.store import TensorStore, write_safetensors

WEIGHTS = "model.safetensors"


def is_vllm_config(config: dict) -> bool:
    return config.get("model_type") == "medusa" or "MedusaModel" in (config.get("architectures") or [])


def _renamed(config: dict, path: Path) -> tuple[int, int]:
    """num_heads / num_hidden_layers the way MedusaConfig.from_pretrained finds them."""
    found: dict[str, dict[str, object]] = {"num_heads": {}, "num_hidden_layers": {}}
    for key, value in config.items():
        if "num" in key and "heads" in key:
            found["num_heads"][key] = value
        elif "num" in key and "layers" in key:
            found["num_hidden_layers"][key] = value
    out = []
    for field, hits in found.items():
        if not hits:
            raise ForgeError(f"{path}: field {field} missing (vLLM would fall back to its default)")
        if len({json.dumps(v) for v in hits.values()}) > 1:
            raise ForgeError(
                f"{path}: {', '.join(f'{k}={v}' for k, v in hits.items())} disagree; vLLM maps all of "
                f"them to {field} (ambiguous)"
            )
        v = next(iter(hits.values()))
        if not isinstance(v, int) or isinstance(v, bool) or v < (1 if field == "num_heads" else 0):
            raise ForgeError(f"{path}: field {field} missing or not a valid integer")
        out.append(v)
    if out[0] > MAX_HEADS:
        raise ForgeError(f"{path}: num_heads={out[0]} is out of range (1..{MAX_HEADS})")
    return out[0], out[1]


def weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ForgeError(f"{index}: malformed safetensors index ({e})") from None
        return sorted(directory / n for n in names)
    return sorted(directory.glob("*.safetensors"))


def open_source(directory: Path, config: dict) -> Source:
    path = directory / "config.json"
    K, L = _renamed(config, path)
    files = weight_files(directory)
    if not files:
        raise ForgeError(f"{directory}: no *.safetensors weights found (vLLM layout)")
    vocab = config.get("vocab_size")
    truncated = config.get("truncated_vocab_size")
    if truncated is not None and vocab is not None and truncated != vocab:
        raise ForgeError(
            f"{path}: truncated_vocab_size={truncated} < vocab_size={vocab} (a token_map draft vocab) "
            "is not supported: heads must predict over the full vocabulary"
        )
    store = TensorStore.from_safetensors(files, keep=lambda n: n.removeprefix(VLLM_STRIPPED_PREFIX))
    shared = bool(config.get("original_lm_head", False))
    extra: tuple[str, ...] = ()
    if shared:
        copies = [n for n in (VLLM_LM_HEAD, VLLM_LM_HEAD_ALIAS) if n in store]
        if not copies:
            raise ForgeError(
                f"{directory}: original_lm_head is true but {VLLM_LM_HEAD} (vLLM's copy of the base lm_head) is missing"
            )
        if len(copies) > 1:
            raise ForgeError(
                f"{directory}: both {VLLM_LM_HEAD} and {VLLM_LM_HEAD_ALIAS} present with original_lm_head "
                "(vLLM loads both into one lm_head): ambiguous"
            )
        extra = (copies[0],)
    return Source(
        layout="vllm",
        directory=directory,
        files=tuple(files),
        config=config,
        num_heads=K,
        num_layers=L,
        names=VLLM,
        store=store,
        shared=shared,
        shared_reason=f"original_lm_head is {str(shared).lower()}",
        bias=bool(config.get("medusa_fc_bias", False)),
        bias_reason="medusa_fc_bias is false in config.json",
        heads_field="num_heads",
        layers_field="num_hidden_layers",
        hidden_hint=config.get("hidden_size"),
        vocab_hint=vocab,
        base_model_name_or_path=str(config.get("base_model_name_or_path") or ""),
        extra_names=extra,
    )


def lm_head_copy(src: Source) -> Tensor | None:
    """The lm_head vLLM stores with shared heads (``original_lm_head``), else None."""
    return src.store.get(src.extra_names[0]) if src.layout == "vllm" and src.extra_names else None


def write_vllm(ckpt: HeadsCheckpoint, out: Path, base_name: str, lm_head: Tensor | None) -> dict:
    """``model.safetensors`` with biases on (``medusa_fc_bias``) and, for shared heads, one ``lm_head``."""
    tensors = named_tensors(ckpt, VLLM)
    if ckpt.shared_lm_head:
        if lm_head is None:
            raise ForgeError(
                "vLLM keeps its own copy of the lm_head for shared-lm_head heads (original_lm_head): pass --base-model"
            )
        tensors[VLLM_LM_HEAD] = lm_head.to(ckpt.dtype)
    vocab = ckpt.vocab_size if ckpt.vocab_size else (lm_head.shape[0] if lm_head is not None else None)
    write_safetensors(tensors, out / WEIGHTS)
    return {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "hidden_size": ckpt.hidden_size,
        "vocab_size": vocab,
        "num_heads": ckpt.num_heads,
        "num_hidden_layers": ckpt.num_layers,
        "max_paths": 64,
        "topk": 10,
        "truncated_vocab_size": vocab,
        "medusa_fc_bias": True,
        "original_lm_head": ckpt.shared_lm_head,
        "base_model_name_or_path": base_name,
    }
