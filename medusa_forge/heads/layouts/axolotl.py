"""axolotl (Medusa-2) full-model checkpoints: the heads live inside the model's own shards.

Pinned to ctlllll/axolotl@76bc572 (the fork FasterDecoding's README points to for training)
``src/axolotl/monkeypatch/medusa_utils.py``: ``add_medusa_heads`` sets ``config.medusa_num_heads`` and
``config.medusa_num_layers`` on the model config and ``model.medusa_head = ModuleList([Sequential(
*[ResBlock(H)] * L, Linear(H, V, bias=False))])``, initialising each projection from ``lm_head``; the
trainer's ``save_pretrained`` then writes ``medusa_head.{k}.{j}.linear.weight``/``.bias`` and
``medusa_head.{k}.{L}.weight`` into the shards next to ``model.*`` and ``lm_head.weight``.
FasterDecoding's ``MedusaModelABC.from_pretrained`` (medusa/model/medusa_model.py@e2a5d20) loads the
same directory with the same attribute name.

The directory is also a complete base model, so ``--model DIR --medusa DIR`` runs it natively.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from medusa_forge.errors import ForgeError
from medusa_forge.heads.layouts.base import BaseModel
from medusa_forge.heads.layouts.collect import HeadsCheckpoint, Source, named_tensors
from medusa_forge.heads.layouts.fasterdecoding import head_counts
from medusa_forge.heads.layouts.keys import AXOLOTL
from medusa_forge.heads.layouts.store import TensorStore, write_safetensors
from medusa_forge.model.checkpoint import checkpoint_files

INDEX = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def has_model_shards(directory: Path) -> bool:
    return (directory / INDEX).is_file() or any(
        not f.name.startswith("medusa_") for f in directory.glob("*.safetensors")
    )


def open_source(directory: Path, config: dict) -> Source:
    K, L, field = head_counts(config, directory / "config.json")
    files = checkpoint_files(directory)
    store = TensorStore.from_safetensors(files, keep=lambda n: n if n.startswith(AXOLOTL.prefix) else None)
    if not store.keys():
        raise ForgeError(
            f"{directory}: config.json has {field} but the model shards hold no "
            f"{AXOLOTL.prefix}* tensors (and there is no medusa_lm_head.safetensors or .pt)"
        )
    return Source(
        layout="axolotl",
        directory=directory,
        files=tuple(files),
        config=config,
        num_heads=K,
        num_layers=L,
        names=AXOLOTL,
        store=store,
        heads_field=field,
        hidden_hint=config.get("hidden_size"),
        vocab_hint=config.get("vocab_size"),
        base_model_name_or_path=str(config.get("_name_or_path") or ""),
    )


def write_axolotl(ckpt: HeadsCheckpoint, out: Path, base_name: str, base: BaseModel) -> dict:
    """The base model's shards renamed into an index, plus one shard with the heads.

    Every head gets a projection (axolotl's heads always end in ``Linear(H, V)``). transformers
    prefers ``model.safetensors`` over an index, so the base shards are always renumbered.
    """
    if ckpt.shared_lm_head:
        raise ForgeError("axolotl heads end in their own Linear(H, V); expand shared heads first (needs --base-model)")
    if any(n.startswith(AXOLOTL.prefix) for n in base.headers):
        raise ForgeError(f"{base.directory}: already holds {AXOLOTL.prefix}* tensors; give the plain base model")
    n = len(base.files) + 1
    shard = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    weight_map, total = {}, 0
    for src, name in zip(base.files, shard):
        shutil.copyfile(src, out / name)
    for tensor, (path, shape) in base.headers.items():
        weight_map[tensor] = shard[base.files.index(path)]
    heads = named_tensors(ckpt, AXOLOTL)
    write_safetensors(heads, out / shard[-1])
    weight_map.update({name: shard[-1] for name in heads})
    for f in out.glob("model-*.safetensors"):
        total += f.stat().st_size
    (out / INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n"
    )
    for f in sorted(base.directory.iterdir()):
        if f.is_file() and f.name not in ("config.json", INDEX) and not f.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copyfile(f, out / f.name)
    config = json.loads((base.directory / "config.json").read_text())
    # _name_or_path: what FasterDecoding's MedusaModelABC takes as base_model_name_or_path (its tokenizer)
    return config | {
        "_name_or_path": base_name,
        "medusa_num_heads": ckpt.num_heads,
        "medusa_num_layers": ckpt.num_layers,
    }
