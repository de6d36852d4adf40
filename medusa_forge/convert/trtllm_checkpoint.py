"""``convert trtllm``: a HF Llama/Mistral/Qwen2 checkpoint + Medusa heads -> a TensorRT-LLM Medusa checkpoint.

Output: ``config.json`` (``trtllm_config``) and ``rank{r}.safetensors`` for r < tp_size holding the tensors of
``trtllm_names.entries`` — what the chosen release's (``trtllm_profiles``: 1.2.1 or 0.11.0)
``examples/medusa/convert_checkpoint.py`` writes for FP16/BF16, and what ``examples/quantization/quantize.py
--qformat fp8 [--kv_cache_dtype fp8] --medusa_model_dir ..`` writes for FP8 — so ``trtllm-build --checkpoint_dir
OUT --speculative_decoding_mode medusa`` of that release takes it. The tokenizer files of the HF directory are
copied beside them (``trtllm-build`` reads only ``config.json`` and the rank files; the copy makes the directory
runnable here and usable as Triton's ``tokenizer_dir``).

Where upstream goes wrong we stop or fix, never copy: head and layer counts come from the heads' own config
(upstream writes the ``--num_medusa_heads`` default, 4), or ``--num-heads`` when that config under-counts them;
a vocabulary tp does not divide is padded (upstream's Medusa converter asserts; 1.x's Qwen2 path writes unsplit
weights to every rank); tied embeddings work (upstream looks up a missing ``lm_head`` parameter); heads are
written in the checkpoint dtype (upstream's FP8 path forces float16); "version 2" heads get the base lm_head per
head. The HF ``config.json`` is read once; ``max_draft_len`` is the serving tree's node count. Everything is
checked before the model is loaded, and the directory appears only when complete (``atomic_output_dir``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from medusa_forge.atomic import atomic_output_dir
from medusa_forge.convert import fp8 as fp8_mod
from medusa_forge.convert.trtllm_config import DEFAULT_TREE, DTYPES, CheckpointSpec, spec_for, trtllm_config
from medusa_forge.convert.trtllm_names import (
    SCALE_DTYPE,
    TORCH_DTYPES,
    entries,
    kv_scale_name,
    pad_vocab,
    scale_names,
    shard,
)
from medusa_forge.convert.trtllm_profiles import TrtllmProfile, get_profile
from medusa_forge.errors import ForgeError
from medusa_forge.heads.medusa_head import MedusaHeads
from medusa_forge.jsonl import read_json_object
from medusa_forge.model.config import ModelConfig
from medusa_forge.tree.choice_tree import ChoiceTree

# FP8 calibration text shipped with the package: what `make engine DTYPE=fp8` uses inside the image.
CALIB_PROMPTS = Path(__file__).parent / "data" / "calib_prompts.jsonl"

# Copied from the HF model directory when present (what AutoTokenizer and generation defaults read).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
)


@dataclass
class ConvertOptions:
    model_dir: Path
    medusa_dir: Path
    out_dir: Path
    dtype: str = "float16"
    tp_size: int = 1
    quantization: str | None = None  # None | "fp8"
    kv_cache_dtype: str | None = None  # None | "fp8" (FP8 checkpoints only)
    calib_prompts: Path | None = None
    calib_size: int = 512
    calib_max_seq_len: int = 512
    max_draft_len: int | None = None  # None: the node count of ``medusa_choices``
    device: str | None = None  # where FP8 calibration runs (default: cuda when available)
    overwrite: bool = False
    trtllm_version: str | None = None  # a trtllm_profiles name; None: the default profile
    medusa_choices: str | None = None  # the tree the engine will serve (sets max_draft_len); None: DEFAULT_TREE
    num_heads: int | None = None  # use the first N heads whatever the heads' config.json says


@dataclass(frozen=True)
class Plan:
    """Everything known before a weight is read."""

    model: ModelConfig
    spec: CheckpointSpec
    config: dict
    profile: TrtllmProfile
    heads_source: object  # heads.layouts Source, head count possibly overridden


@dataclass
class ConvertResult:
    out_dir: Path
    config: dict
    files: dict[str, int]  # file name -> bytes
    tensors_per_rank: int
    calibration: dict = field(default_factory=dict)
    seconds: float = 0.0


def check_options(o: ConvertOptions) -> None:
    """The checks that need no weights, run before anything is loaded."""
    if o.tp_size < 1:
        raise ForgeError(f"--tp-size must be >= 1, got {o.tp_size}")
    if o.dtype not in DTYPES:
        raise ForgeError(f"--dtype {o.dtype!r}: choose {' or '.join(DTYPES)}")
    if o.quantization not in (None, "fp8"):
        raise ForgeError(f"--quantization {o.quantization!r}: only fp8 is supported")
    if o.kv_cache_dtype not in (None, "fp8"):
        raise ForgeError(f"--kv-cache-dtype {o.kv_cache_dtype!r}: only fp8 is supported")
    if o.kv_cache_dtype and o.quantization != "fp8":
        raise ForgeError("--kv-cache-dtype fp8 needs --quantization fp8")
    if o.quantization == "fp8" and o.calib_prompts is not None and not Path(o.calib_prompts).is_file():
        raise ForgeError(
            f"--calib-prompts {o.calib_prompts}: file not found (make: set CALIB=FILE, or leave it "
            "unset for the calibration prompts shipped with medusa-forge)"
        )
    if o.quantization != "fp8" and o.calib_prompts is not None:
        raise ForgeError("--calib-prompts is only used with --quantization fp8")
    out = Path(o.out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not o.overwrite)):
        what = "is not a directory" if not out.is_dir() else "is not empty; pass --overwrite to replace it"
        raise ForgeError(f"output directory {out.absolute()} {what}")


def plan(o: ConvertOptions) -> Plan:
    """Configs only: the HF model's (config.json read once), the spec every split is checked against, and the
    config.json to write for the chosen release."""
    from medusa_forge.heads.layouts import detect

    check_options(o)
    profile = get_profile(o.trtllm_version)
    source = str(Path(o.model_dir) / "config.json")
    raw = read_json_object(Path(source), "not found (expected a Hugging Face model directory)")
    cfg = ModelConfig.from_hf_dict(raw, source)  # unknown architectures fail here, one line
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ForgeError(
            f"{source}: hidden_act {act!r}: TensorRT-LLM's Medusa heads use the model's hidden_act while "
            "Medusa ResBlocks are trained with SiLU; only silu models convert"
        )
    heads = heads_source(detect(o.medusa_dir), o.num_heads)
    spec = spec_for(
        cfg,
        heads.num_heads if o.num_heads is None else o.num_heads,
        heads.num_layers,
        o.tp_size,
        o.dtype,
        fp8=o.quantization == "fp8",
        fp8_kv_cache=o.kv_cache_dtype == "fp8",
    )
    spec.check(f"{o.model_dir} with --tp-size {o.tp_size}")
    config = trtllm_config(cfg, spec, draft_len(o, spec.num_medusa_heads), source, profile)
    return Plan(cfg, spec, config, profile, heads)


def draft_len(o: ConvertOptions, num_heads: int) -> int:
    """--max-draft-len if given, else the serving tree's node count (a named tree must fit the heads; with none,
    the default tree's 63, upstream's --max_medusa_token_len default; `build trtllm` checks the tree it serves)."""
    if o.max_draft_len is not None:
        return o.max_draft_len
    tree = ChoiceTree.parse(o.medusa_choices or DEFAULT_TREE)
    if o.medusa_choices:
        tree.check_heads(num_heads)
    return len(tree.paths)


def heads_source(src, num_heads: int | None):
    """The heads on disk; with ``num_heads`` all heads the files hold are read (the first N are kept), so a
    config.json that under-counts them (medusa-vicuna-7b-v1.3; TensorRT-LLM: --fixed_num_medusa_heads) converts."""
    from medusa_forge.heads.layouts.collect import scan

    if num_heads is None:
        return src
    held = scan(src).heads
    count = max(held) + 1 if held else src.num_heads
    if not 1 <= num_heads <= count:
        raise ForgeError(f"--num-heads {num_heads}: {src.where} holds {count} Medusa head(s)")
    return dataclasses.replace(src, num_heads=count)


def load_heads_for(p: Plan, dtype: torch.dtype, device) -> MedusaHeads:
    from medusa_forge.heads.layouts.collect import HeadsCheckpoint, collect

    ckpt = collect(p.heads_source, p.model.hidden_size, p.model.vocab_size)
    k = p.spec.num_medusa_heads
    if ckpt.num_heads != k:
        proj = None if ckpt.proj_weight is None else ckpt.proj_weight[:k]
        ckpt = HeadsCheckpoint(
            ckpt.res_weight[:k], ckpt.res_bias[:k], proj, ckpt.base_model_name_or_path, ckpt.vocab_size
        )
    return ckpt.to_module(p.model.hidden_size, p.model.vocab_size, dtype, device)


def convert_trtllm(o: ConvertOptions, log: Callable[[str], None] = lambda msg: None) -> ConvertResult:
    """Convert: validate, load (heads first: their size checks are cheap), calibrate if FP8, write atomically."""
    from medusa_forge.model.checkpoint import load_hf_model
    from medusa_forge.model.dtypes import resolve_device_dtype

    t0 = time.perf_counter()
    p = plan(o)
    cfg, spec, config = p.model, p.spec, p.config
    target = TORCH_DTYPES[o.dtype]
    device, dtype = torch.device("cpu"), target  # FP16/BF16: a copy, no compute
    if spec.fp8:  # calibration runs the model: fp32 on CPU, the checkpoint dtype on CUDA
        device, _ = resolve_device_dtype(o.device, None)
        dtype = torch.float32 if device.type == "cpu" else target
    heads = load_heads_for(p, dtype, device)
    log(
        f"TensorRT-LLM {p.profile.version} checkpoint: loading {o.model_dir} ({dtype}, {device}) and "
        f"{heads.config.num_heads} Medusa heads from {o.medusa_dir}"
    )
    model = load_hf_model(o.model_dir, dtype=dtype, device=device, cfg=cfg)
    cal = None
    if spec.fp8:
        from medusa_forge.model.tokenizer import Tokenizer

        calib = o.calib_prompts or CALIB_PROMPTS
        tokens = fp8_mod.calibration_tokens(Tokenizer(o.model_dir), calib, o.calib_size, o.calib_max_seq_len)
        log(f"calibrating FP8 scales on {len(tokens)} prompts ({sum(map(len, tokens))} tokens)")
        cal = fp8_mod.calibrate(model, tokens, kv_cache=spec.kv_cache_quant_algo is not None)
    sources = source_tensors(spec, model.state_dict(), heads)
    quantized = {e.name: fp8_mod.quantize_weight(sources[e.name], target) for e in entries(spec) if e.quantized}
    with atomic_output_dir(o.out_dir, o.overwrite) as tmp:
        for r in range(spec.tp_size):
            tensors = rank_tensors(spec, r, sources, quantized, cal)
            log(f"writing rank{r}.safetensors ({len(tensors)} tensors)")
            save_file(tensors, str(tmp / f"rank{r}.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=4) + "\n")
        for name in TOKENIZER_FILES:
            if (Path(o.model_dir) / name).is_file():
                shutil.copyfile(Path(o.model_dir) / name, tmp / name)
    out = Path(o.out_dir)
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    return ConvertResult(out, config, files, len(tensors), cal.summary() if cal else {}, time.perf_counter() - t0)


def source_tensors(spec: CheckpointSpec, sd: dict[str, Tensor], heads: MedusaHeads) -> dict[str, Tensor]:
    """TensorRT-LLM name -> the unsplit tensor it is made of (views of the native state dict or the heads)."""
    out = {}
    for e in entries(spec):
        if e.source.startswith("heads."):
            stack = getattr(heads, e.source.removeprefix("heads."))
            # "version 2" heads have no projection; TensorRT-LLM needs an lm_head per head: the base one
            t = sd["lm_head.weight"] if stack is None else stack[e.index]
        else:
            t = sd[e.source] if e.rows is None else sd[e.source][e.rows[0] : e.rows[1]]
        t = pad_vocab(e, t)
        if tuple(t.shape) != e.shape:
            raise ForgeError(f"{e.source}: shape {list(t.shape)} does not match {e.name} {list(e.shape)}")
        out[e.name] = t.detach()
    return out


def rank_tensors(
    spec: CheckpointSpec,
    rank: int,
    sources: dict[str, Tensor],
    quantized: dict[str, tuple[Tensor, float]],
    cal: fp8_mod.Calibration | None,
) -> dict[str, Tensor]:
    """Rank ``rank``'s tensors, each its own contiguous CPU copy (as safetensors needs)."""
    dtype = TORCH_DTYPES[spec.dtype]
    out: dict[str, Tensor] = {}
    for e in entries(spec):
        if e.quantized:
            w8, w_scale = quantized[e.name]
            w_name, a_name = scale_names(e)
            out[e.name] = shard(e, w8, spec, rank).cpu().clone()  # w8 is shared by the ranks: copy
            out[w_name] = torch.tensor([w_scale], dtype=SCALE_DTYPE)
            out[a_name] = torch.tensor([cal.input_scales[e.source.removesuffix(".weight")]], dtype=SCALE_DTYPE)
        else:
            src = sources[e.name]
            t = shard(e, src, spec, rank).to(device="cpu", dtype=dtype)
            if t.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():
                t = t.clone()  # still a view of the model (fc/gate rows, tied embedding): safetensors needs its own
            out[e.name] = t
    if spec.kv_cache_quant_algo:
        for i in range(spec.num_layers):
            out[kv_scale_name(i)] = torch.tensor([cal.kv_scales[i]], dtype=SCALE_DTYPE)
    return out
