"""Medusa heads on disk, in the FasterDecoding layout that TGI also loads.

Directory: ``config.json`` (``medusa_num_heads``, ``medusa_num_layers``,
``base_model_name_or_path``, optional ``version``) and ``medusa_lm_head.safetensors`` (or the
older ``medusa_lm_head.pt``, read with ``torch.load(weights_only=True)`` only). Keys are bare: for
head k and block j < L: ``{k}.{j}.linear.weight`` [H, H] and ``{k}.{j}.linear.bias`` [H]; the
head's vocab projection is ``{k}.{L}.weight`` [V, H]. "Version 2" heads have no ``{k}.{L}.weight``
and use the base ``lm_head`` (as in TGI's fallback).

FasterDecoding's reference model builds ``[ResBlock(h)] * L``, one module repeated, so with L > 1
its checkpoints store L copies of the same tensors; we read each ``{k}.{j}`` independently, which
loads such files exactly and also loads heads whose blocks really differ.
Matched against FasterDecoding/Medusa ``medusa/model/medusa_model.py`` (MedusaModelABC,
``medusa_head`` = ModuleList of Sequential(*[ResBlock]*L, Linear(H, V, bias=False))).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from medusa_forge.errors import ForgeError
from medusa_forge.heads.medusa_head import MedusaHeads, MedusaHeadsConfig

HEADS_SAFETENSORS = "medusa_lm_head.safetensors"
HEADS_PT = "medusa_lm_head.pt"
MAX_HEADS = 16


def heads_to_fasterdecoding(heads: MedusaHeads) -> dict[str, Tensor]:
    """Our stacked tensors -> FasterDecoding's per-head key names."""
    K, L = heads.res_weight.shape[:2]
    sd: dict[str, Tensor] = {}
    for k in range(K):
        for j in range(L):
            sd[f"{k}.{j}.linear.weight"] = heads.res_weight[k, j]
            sd[f"{k}.{j}.linear.bias"] = heads.res_bias[k, j]
        if heads.proj_weight is not None:
            sd[f"{k}.{L}.weight"] = heads.proj_weight[k]
    return {name: t.detach().contiguous().cpu() for name, t in sd.items()}


def read_heads_config(heads_dir: Path) -> dict:
    path = heads_dir / "config.json"
    if not path.is_file():
        raise ForgeError(f"{path}: not found (Medusa heads need config.json with medusa_num_heads, medusa_num_layers)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ForgeError(f"{path}: not valid JSON ({e})") from None
    for key in ("medusa_num_heads", "medusa_num_layers"):
        if not isinstance(d.get(key), int) or d[key] < (1 if key == "medusa_num_heads" else 0):
            raise ForgeError(f"{path}: field {key} missing or not a valid integer")
    if d["medusa_num_heads"] > MAX_HEADS:
        raise ForgeError(f"{path}: medusa_num_heads={d['medusa_num_heads']} is out of range (1..{MAX_HEADS})")
    return d


def _read_tensors(heads_dir: Path) -> tuple[dict[str, Tensor], Path]:
    st, pt = heads_dir / HEADS_SAFETENSORS, heads_dir / HEADS_PT
    if st.is_file():
        try:
            with safe_open(str(st), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, st
        except (SafetensorError, OSError) as e:
            raise ForgeError(f"{st}: not a readable safetensors file ({e})") from None
    if pt.is_file():
        try:
            obj = torch.load(str(pt), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
            raise ForgeError(f"{pt}: cannot be loaded with weights_only=True ({type(e).__name__}: {e})") from None
        if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise ForgeError(f"{pt}: expected a flat dict of tensors")
        return obj, pt
    raise ForgeError(f"{heads_dir}: no {HEADS_SAFETENSORS} or {HEADS_PT} found")


def load_heads(heads_dir: str | Path, hidden_size: int, vocab_size: int,
               dtype: torch.dtype = torch.float32, device="cpu") -> MedusaHeads:
    """Load FasterDecoding-layout heads and check them against the base model's sizes."""
    heads_dir = Path(heads_dir)
    if not heads_dir.is_dir():
        raise ForgeError(f"{heads_dir}: Medusa heads directory not found")
    conf = read_heads_config(heads_dir)
    K, L = conf["medusa_num_heads"], conf["medusa_num_layers"]
    tensors, src = _read_tensors(heads_dir)
    shared = f"0.{L}.weight" not in tensors
    cfg = MedusaHeadsConfig(K, L, hidden_size, vocab_size, shared_lm_head=shared,
                            base_model_name_or_path=conf.get("base_model_name_or_path", ""))

    def take(name: str, shape: tuple[int, ...]) -> Tensor:
        if name not in tensors:
            raise ForgeError(f"{src}: tensor {name} missing (config.json says {K} heads x {L} layers)")
        t = tensors.pop(name)
        if tuple(t.shape) != shape:
            raise ForgeError(f"{src}: tensor {name} has shape {list(t.shape)}, expected {list(shape)} "
                             f"(base model hidden size {hidden_size}, vocab {vocab_size}): heads do not match the base")
        return t

    H, V = hidden_size, vocab_size
    res_w = torch.stack([torch.stack([take(f"{k}.{j}.linear.weight", (H, H)) for j in range(L)]) if L else
                         torch.zeros(0, H, H) for k in range(K)])
    res_b = torch.stack([torch.stack([take(f"{k}.{j}.linear.bias", (H,)) for j in range(L)]) if L else
                         torch.zeros(0, H) for k in range(K)])
    proj = None if shared else torch.stack([take(f"{k}.{L}.weight", (V, H)) for k in range(K)])
    if tensors:
        extra = sorted(tensors)[:3]
        raise ForgeError(f"{src}: unexpected tensors {extra} (config.json says {K} heads x {L} layers)")
    with torch.device("meta"):
        heads = MedusaHeads(cfg)
    sd = {"res_weight": res_w, "res_bias": res_b} | ({} if proj is None else {"proj_weight": proj})
    heads.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, assign=True)
    return heads.eval().requires_grad_(False)


def save_heads(heads: MedusaHeads, out_dir: str | Path, extra_config: dict | None = None) -> None:
    """Write FasterDecoding-layout files into ``out_dir`` (callers wrap this in atomic_output_dir)."""
    out_dir = Path(out_dir)
    cfg = heads.config
    save_file(heads_to_fasterdecoding(heads), str(out_dir / HEADS_SAFETENSORS), metadata={"format": "pt"})
    conf = {
        "medusa_num_heads": cfg.num_heads,
        "medusa_num_layers": cfg.num_layers,
        "base_model_name_or_path": cfg.base_model_name_or_path,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
    }
    if cfg.shared_lm_head:
        conf["version"] = "2"
    conf.update(extra_config or {})
    (out_dir / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
