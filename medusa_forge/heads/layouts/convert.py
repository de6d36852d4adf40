"""Export heads to another tool's layout, and inspect what a directory holds.

Shared-lm_head ("version 2") heads stay shared wherever the target can run them that way
(FasterDecoding, TGI with one layer, vLLM via ``original_lm_head``) and get a copy of the base lm_head
per head only where the target's loader needs one (TensorRT-LLM, axolotl, TGI with more than one
layer); both the copy and vLLM's stored lm_head come from ``--base-model``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from medusa_forge.atomic import atomic_output_dir
from medusa_forge.errors import ForgeError
from medusa_forge.heads.layouts import axolotl, fasterdecoding, vllm
from medusa_forge.heads.layouts.base import BaseModel
from medusa_forge.heads.layouts.collect import HeadsCheckpoint, Source, collect, scan
from medusa_forge.heads.layouts.detect import detect


@dataclass(frozen=True)
class Target:
    name: str
    loader: str  # what reads the output, for docs and messages
    expand: Callable[[HeadsCheckpoint], str | None]  # why shared heads need a projection per head, or None
    base: Callable[[HeadsCheckpoint], str | None]  # why the base model is needed otherwise, or None
    write: Callable[[HeadsCheckpoint, Path, str, BaseModel | None], dict]


def _never(ckpt: HeadsCheckpoint) -> None:
    return None


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "fasterdecoding",
            "FasterDecoding MedusaModel.from_pretrained (medusa_lm_head.pt)",
            _never,
            _never,
            lambda c, out, name, base: fasterdecoding.write_fasterdecoding(c, out, name),
        ),
        Target(
            "tgi",
            "TGI --model-id DIR (medusa_lm_head.safetensors)",
            lambda c: "TGI runs shared-lm_head heads only with 1 layer (MedusaHeadV2)" if c.num_layers != 1 else None,
            _never,
            lambda c, out, name, base: fasterdecoding.write_tgi(c, out, name),
        ),
        Target(
            "vllm",
            "vLLM speculative_config model=DIR (model_type medusa)",
            _never,
            lambda c: (
                "vLLM keeps its own copy of the base lm_head for shared heads (original_lm_head)"
                if c.shared_lm_head
                else None
            ),
            lambda c, out, name, base: vllm.write_vllm(c, out, name, base.lm_head() if base else None),
        ),
        Target(
            "trtllm-medusa-dir",
            "TensorRT-LLM examples/medusa/convert_checkpoint.py --medusa_model_dir DIR",
            lambda c: "TensorRT-LLM reads a vocab projection per head ({h}.{L}.weight)",
            _never,
            lambda c, out, name, base: fasterdecoding.write_trtllm(c, out, name),
        ),
        Target(
            "axolotl",
            "transformers / axolotl / FasterDecoding MedusaModelABC full model (medusa_head.* in the shards)",
            lambda c: "axolotl heads end in their own Linear(H, V)",
            lambda c: "axolotl checkpoints are full models (base weights + medusa_head.*)",
            lambda c, out, name, base: axolotl.write_axolotl(c, out, name, base),
        ),
    )
}


def read(directory: str | Path, base: BaseModel | None = None) -> tuple[Source, HeadsCheckpoint]:
    """Detect and read strictly; with a base model, sizes and vLLM's stored lm_head are checked against it."""
    src = detect(directory)
    ckpt = collect(src, base.hidden_size if base else None, base.vocab_size if base else None)
    if base is not None:
        copy = vllm.lm_head_copy(src)
        if copy is not None and not torch.equal(copy, base.lm_head().to(copy.dtype)):
            raise ForgeError(
                f"{src.where}: the stored {src.extra_names[0]} differs from {base.directory}'s lm_head; "
                "these heads were trained against another base model"
            )
    return src, ckpt


@dataclass
class ExportResult:
    source: str
    layout: str
    target: str
    out: str
    files: list[str]
    expanded: bool
    num_heads: int
    num_layers: int
    shared_lm_head: bool


def export_heads(
    src_dir: str | Path, target: str, out: str | Path, base_model: str | Path | None = None, overwrite: bool = False
) -> ExportResult:
    if target not in TARGETS:
        raise ForgeError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    t = TARGETS[target]
    base = BaseModel.open(base_model) if base_model is not None else None
    src, ckpt = read(src_dir, base)
    expand_why = t.expand(ckpt) if ckpt.shared_lm_head else None
    why = expand_why or t.base(ckpt)
    if why and base is None:
        what = "each head's projection from the base lm_head" if expand_why else "the base model"
        raise ForgeError(f"--to {target}: {why}, so it needs {what}: pass --base-model DIR")
    expanded = expand_why is not None
    if expanded:
        ckpt = ckpt.with_projections(base.lm_head())
    name = ckpt.base_model_name_or_path or (str(base.directory.resolve()) if base else "")
    with atomic_output_dir(out, overwrite) as tmp:
        config = t.write(ckpt, tmp, name, base)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        files = sorted(f.name for f in tmp.iterdir())
    return ExportResult(
        str(src.directory),
        src.layout,
        target,
        str(Path(out)),
        files,
        expanded,
        ckpt.num_heads,
        ckpt.num_layers,
        ckpt.shared_lm_head,
    )


@dataclass
class Inspection:
    directory: str
    layout: str | None = None
    files: list[str] = field(default_factory=list)
    heads: int | None = None
    layers: int | None = None
    hidden: int | None = None
    vocab: int | None = None
    shared_lm_head: bool | None = None
    dtype: str | None = None
    base_model_name_or_path: str = ""
    loads_in: list[str] = field(default_factory=list)
    export_needed: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def inspect_heads(directory: str | Path, base_model: str | Path | None = None) -> Inspection:
    """Everything ``heads inspect`` prints; failures become ``problems`` instead of exceptions."""
    rep = Inspection(str(directory))
    try:
        base = BaseModel.open(base_model) if base_model is not None else None
        src = detect(directory)
    except ForgeError as e:
        rep.problems.append(str(e))
        return rep
    found = scan(src)
    rep.layout, rep.files = src.layout, [str(f) for f in src.files]
    rep.heads, rep.layers = len(found.heads) or None, found.layers
    rep.hidden, rep.vocab = found.hidden or src.hidden_hint, found.vocab or src.vocab_hint
    rep.shared_lm_head = src.shared if src.shared is not None else (not found.proj_heads if found.heads else None)
    rep.dtype = ", ".join(found.dtypes) or None
    rep.base_model_name_or_path = src.base_model_name_or_path
    try:
        src, ckpt = read(directory, base)
    except ForgeError as e:
        rep.problems.append(str(e))
        return rep
    rep.heads, rep.layers, rep.hidden = ckpt.num_heads, ckpt.num_layers, ckpt.hidden_size
    rep.vocab, rep.shared_lm_head = ckpt.vocab_size, ckpt.shared_lm_head
    rep.loads_in, rep.export_needed = compatibility(src, ckpt)
    return rep


def compatibility(src: Source, ckpt: HeadsCheckpoint) -> tuple[list[str], dict[str, str]]:
    """Which tools load the directory as it is, and why the others need ``heads export``."""
    ok, need = ["native (medusa-forge --medusa)"], {}
    fd = src.layout == "fasterdecoding"
    suffix = src.files[0].suffix if fd else ""

    def verdict(target: str, why: str | None) -> None:
        if why is None:
            ok.append(target)
        else:
            need[target] = why

    verdict("fasterdecoding", None if fd and suffix == ".pt" else "MedusaModel.from_pretrained opens medusa_lm_head.pt")
    tgi_why = (
        "TGI opens medusa_lm_head.safetensors"
        if not (fd and suffix == ".safetensors")
        else "config.json has 'architectures', so TGI does not treat it as Medusa"
        if "architectures" in src.config
        else "config.json lacks base_model_name_or_path"
        if not src.base_model_name_or_path
        else "TGI runs shared-lm_head heads with 1 layer only"
        if ckpt.shared_lm_head and ckpt.num_layers != 1
        else None
    )
    verdict("tgi", tgi_why)
    verdict("vllm", None if src.layout == "vllm" else "vLLM needs model_type medusa and blocks.*/lm_heads.* names")
    trt_why = (
        "TensorRT-LLM reads medusa_lm_head.pt/.safetensors"
        if not fd
        else "TensorRT-LLM needs a vocab projection per head"
        if ckpt.shared_lm_head
        else None
    )
    verdict("trtllm-medusa-dir", trt_why)
    verdict("axolotl", None if src.layout == "axolotl" else "a full model with medusa_head.* shards")
    return ok, need
