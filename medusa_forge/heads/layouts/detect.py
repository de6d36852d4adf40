"""Which layout a heads directory is in, decided from its config.json, file names and tensor names (no data).

- ``model_type: "medusa"`` or ``architectures: ["MedusaModel"]``: vLLM.
- ``medusa_num_heads`` (or TensorRT-LLM's ``num_medusa_heads``) with ``medusa_lm_head.safetensors`` or
  ``medusa_lm_head.pt``: FasterDecoding heads-only (also what TGI and TensorRT-LLM read).
- ``medusa_num_heads`` with model shards that hold ``medusa_head.*``: axolotl full model.

Anything else, or two layouts in one directory (a vLLM config beside ``medusa_lm_head.*``, or a heads file
beside model shards that hold ``medusa_head.*``), is an error naming what was found.
"""

from __future__ import annotations

from pathlib import Path

from medusa_forge.errors import ForgeError
from medusa_forge.heads.layouts import axolotl, fasterdecoding, vllm
from medusa_forge.heads.layouts.collect import Source
from medusa_forge.jsonl import read_json_object

LAYOUTS = ("fasterdecoding", "axolotl", "vllm")


def read_config(directory: Path) -> dict:
    return read_json_object(
        directory / "config.json", "not found (Medusa heads need config.json with medusa_num_heads, medusa_num_layers)"
    )


def detect(directory: str | Path) -> Source:
    """Open the heads in ``directory`` in whichever layout they are (tensors are read later, lazily)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ForgeError(f"{directory}: Medusa heads directory not found")
    config = read_config(directory)
    if vllm.is_vllm_config(config):
        stray = fasterdecoding.weight_files(directory)
        if stray:
            raise ForgeError(
                f"{directory}: config.json declares vLLM's Medusa layout but "
                f"{stray[0].name} (FasterDecoding layout) is here too: ambiguous, vLLM would skip its "
                "tensors as unknown names; keep one layout per directory"
            )
        return vllm.open_source(directory, config)
    if isinstance(config.get("medusa"), dict):
        raise ForgeError(
            f"{directory}: a ModelOpt quantized Medusa checkpoint (config.json 'medusa' section) is not "
            "supported; export the heads unquantized"
        )
    if not any(f in config for f in (*fasterdecoding.HEADS_FIELDS, "medusa_num_layers")):
        raise ForgeError(
            f"{directory / 'config.json'}: not a Medusa heads config: no medusa_num_heads (FasterDecoding, "
            "TGI, TensorRT-LLM, axolotl) and model_type is not 'medusa' (vLLM)"
        )
    heads_files = fasterdecoding.weight_files(directory)
    if heads_files:
        if axolotl.has_model_shards(directory):
            full = axolotl_or_none(directory, config)
            if full is not None:
                raise ForgeError(
                    f"{directory}: holds heads twice: {heads_files[0].name} and medusa_head.* tensors in "
                    "the model shards (ambiguous); keep one"
                )
        return fasterdecoding.open_source(directory, config)
    if axolotl.has_model_shards(directory):
        return axolotl.open_source(directory, config)
    fasterdecoding.head_counts(config, directory / "config.json")
    if any(directory.glob("*.bin")):
        raise ForgeError(
            f"{directory}: no {fasterdecoding.HEADS_SAFETENSORS} or {fasterdecoding.HEADS_PT}, and the "
            "model weights are PyTorch .bin (an axolotl full model?): pickled checkpoints are not "
            "loaded; re-save it with safetensors"
        )
    raise ForgeError(f"{directory}: no {fasterdecoding.HEADS_SAFETENSORS} or {fasterdecoding.HEADS_PT} found")


def axolotl_or_none(directory: Path, config: dict) -> Source | None:
    try:
        return axolotl.open_source(directory, config)
    except ForgeError:
        return None
