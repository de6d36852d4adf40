"""FasterDecoding heads-only directories, and the TGI and TensorRT-LLM flavours of them.

All three read the same bare tensor names (``keys.FASTERDECODING``) next to a ``config.json``; they
differ in the file they open and the config fields they need:

- FasterDecoding (FasterDecoding/Medusa@e2a5d20 ``medusa/model/medusa_model.py`` and
  ``medusa_model_legacy.py``, ``MedusaModel.from_pretrained``): ``config.json`` through ``MedusaConfig``
  (``medusa_num_heads``, ``medusa_num_layers``, ``base_model_name_or_path``; the legacy class adds
  ``version``, "2" = heads without a projection that use the base ``lm_head``), weights from
  ``medusa_lm_head.pt`` only (``torch.load`` then ``load_state_dict(strict=False)``). Its legacy trainer
  (``medusa/train/train_legacy.py``) writes ``medusa_lm_head.safetensors`` and ``version: "2"``.
- TGI (huggingface/text-generation-inference@db931fc ``server/text_generation_server/models/__init__.py``
  and ``layers/{speculative,medusa}.py``): a model id whose ``config.json`` has ``medusa_num_heads`` is a
  Medusa repo; the base model comes from its ``base_model_name_or_path``; weights from
  ``medusa_lm_head.safetensors`` only. ``SpeculativeHead.load`` treats the config as Medusa only when it
  has no ``architectures`` key. ``MedusaHeadV1`` needs ``{i}.{L}.weight``; otherwise ``MedusaHeadV2``
  uses the base lm_head and asserts ``medusa_num_layers == 1``.
- TensorRT-LLM (``tensorrt_llm/models/medusa/weight.py`` ``load_medusa_hf``: ``medusa_lm_head.pt``, else
  ``medusa_lm_head.safetensors``; biases and ``{h}.{L}.weight`` read unconditionally, so every head needs
  its own projection; ``tensorrt_llm/models/medusa/config.py`` ``from_hugging_face`` reads
  ``num_medusa_heads`` and ``medusa_num_layers`` from this ``config.json``).

FasterDecoding's model builds ``[ResBlock(h)] * L`` (one module repeated), so with L > 1 its files
store L copies of one block; every ``{k}.{j}`` is read on its own, which loads those files exactly
and also heads whose blocks differ.
"""

from __future__ import annotations

from pathlib import Path

from medusa_forge.errors import ForgeError
from medusa_forge.heads.layouts.collect import MAX_HEADS, HeadsCheckpoint, Source, named_tensors
from medusa_forge.heads.layouts.keys import FASTERDECODING
from medusa_forge.heads.layouts.store import TensorStore, write_pt, write_safetensors

HEADS_SAFETENSORS = "medusa_lm_head.safetensors"
HEADS_PT = "medusa_lm_head.pt"
HEADS_FIELDS = ("medusa_num_heads", "num_medusa_heads")  # FasterDecoding/TGI; TensorRT-LLM's from_hugging_face


def head_counts(config: dict, path: Path) -> tuple[int, int, str]:
    """``(heads, layers, name of the heads field)`` from a FasterDecoding-style config, validated."""
    present = {f: config[f] for f in HEADS_FIELDS if f in config}
    if len(set(map(str, present.values()))) > 1:
        raise ForgeError(
            f"{path}: medusa_num_heads={present['medusa_num_heads']} and "
            f"num_medusa_heads={present['num_medusa_heads']} disagree (ambiguous head count)"
        )
    field = next(iter(present), "medusa_num_heads")
    for key in (field, "medusa_num_layers"):
        v = config.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < (1 if key == field else 0):
            raise ForgeError(f"{path}: field {key} missing or not a valid integer")
    if config[field] > MAX_HEADS:
        raise ForgeError(f"{path}: {field}={config[field]} is out of range (1..{MAX_HEADS})")
    return config[field], config["medusa_num_layers"], field


def weight_files(directory: Path) -> list[Path]:
    return [directory / f for f in (HEADS_SAFETENSORS, HEADS_PT) if (directory / f).is_file()]


def open_source(directory: Path, config: dict) -> Source:
    K, L, field = head_counts(config, directory / "config.json")
    files = weight_files(directory)
    if not files:
        raise ForgeError(f"{directory}: no {HEADS_SAFETENSORS} or {HEADS_PT} found")
    if len(files) == 2:
        raise ForgeError(
            f"{directory}: both {HEADS_SAFETENSORS} and {HEADS_PT} present: ambiguous (TGI reads the "
            ".safetensors, FasterDecoding and TensorRT-LLM the .pt); keep one"
        )
    f = files[0]
    store = TensorStore.from_safetensors([f]) if f.suffix == ".safetensors" else TensorStore.from_pt(f)
    v2 = str(config.get("version", "")) == "2"
    return Source(
        layout="fasterdecoding",
        directory=directory,
        files=(f,),
        config=config,
        num_heads=K,
        num_layers=L,
        names=FASTERDECODING,
        store=store,
        shared=True if v2 else None,
        shared_reason='config.json says version "2"',
        heads_field=field,
        hidden_hint=_int(config.get("hidden_size")),
        vocab_hint=_int(config.get("vocab_size")),
        base_model_name_or_path=str(config.get("base_model_name_or_path") or ""),
    )


def _int(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def heads_config(ckpt: HeadsCheckpoint, base_name: str) -> dict:
    """The fields every FasterDecoding-style loader reads, plus sizes for readers without the base model."""
    conf = {
        "medusa_num_heads": ckpt.num_heads,
        "medusa_num_layers": ckpt.num_layers,
        "base_model_name_or_path": base_name,
        "hidden_size": ckpt.hidden_size,
    }
    if ckpt.vocab_size:
        conf["vocab_size"] = ckpt.vocab_size
    if ckpt.shared_lm_head:
        conf["version"] = "2"
    return conf


def write_fasterdecoding(ckpt: HeadsCheckpoint, out: Path, base_name: str) -> dict:
    """``medusa_lm_head.pt`` (what ``MedusaModel.from_pretrained`` opens) and ``config.json``."""
    write_pt(named_tensors(ckpt, FASTERDECODING), out / HEADS_PT)
    return heads_config(ckpt, base_name)


def write_tgi(ckpt: HeadsCheckpoint, out: Path, base_name: str) -> dict:
    """``medusa_lm_head.safetensors`` and a config without ``architectures``; version-2 heads need L == 1."""
    if not base_name:
        raise ForgeError(
            "TGI loads the base model from config.json's base_model_name_or_path, which these heads "
            "do not record: pass --base-model"
        )
    if ckpt.shared_lm_head and ckpt.num_layers != 1:
        raise ForgeError(
            f"TGI runs shared-lm_head heads only with 1 layer (MedusaHeadV2); these have "
            f"{ckpt.num_layers}: pass --base-model to give each head its own projection"
        )
    write_safetensors(named_tensors(ckpt, FASTERDECODING), out / HEADS_SAFETENSORS)
    return heads_config(ckpt, base_name)


def write_trtllm(ckpt: HeadsCheckpoint, out: Path, base_name: str) -> dict:
    """``medusa_lm_head.pt`` (read first by every TensorRT-LLM version) with a projection per head."""
    if ckpt.shared_lm_head:
        raise ForgeError(
            "TensorRT-LLM needs a vocab projection per head ({h}.{L}.weight); these heads share the "
            "base lm_head: pass --base-model"
        )
    write_pt(named_tensors(ckpt, FASTERDECODING), out / HEADS_PT)
    return heads_config(ckpt, base_name) | {"num_medusa_heads": ckpt.num_heads}
