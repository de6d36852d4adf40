"""``convert trtllm``: a HF Llama/Mistral checkpoint + Medusa heads -> a TensorRT-LLM Medusa checkpoint.

Output: ``config.json`` (``trtllm_config``) and ``rank{r}.safetensors`` for r < tp_size holding the tensors of
``trtllm_names.entries`` — what TensorRT-LLM v0.11.0's ``examples/medusa/convert_checkpoint.py`` writes for
FP16/BF16, and what ``examples/quantization/quantize.py --qformat fp8 [--kv_cache_dtype fp8] --medusa_model_dir ..``
writes for FP8 — so ``trtllm-build --checkpoint_dir OUT --speculative_decoding_mode medusa`` of that release
takes it. The tokenizer files of the HF directory are copied beside them (``trtllm-build`` reads only
``config.json`` and the rank files; the copy makes the directory runnable here and usable as Triton's
``tokenizer_dir``).

Where upstream goes wrong we stop or fix, never copy: head and layer counts come from the heads' own config
(upstream writes the ``--num_medusa_heads`` default, 4); a vocabulary tp does not divide is an error; tied
embeddings work (upstream looks up a missing ``lm_head`` parameter); heads are written in the checkpoint dtype
(upstream's FP8 path forces float16); "version 2" heads get the base lm_head per head. Everything is checked
before the model is loaded, and the directory appears only when complete (``atomic_output_dir``).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import Tensor

from medusa_forge.atomic import atomic_output_dir
from medusa_forge.convert import fp8 as fp8_mod
from medusa_forge.convert.trtllm_config import DEFAULT_MAX_DRAFT_LEN, DTYPES, CheckpointSpec, spec_for, trtllm_config
from medusa_forge.convert.trtllm_names import SCALE_DTYPE, TORCH_DTYPES, entries, kv_scale_name, scale_names, shard
from medusa_forge.errors import ForgeError
from medusa_forge.heads.medusa_head import MedusaHeads
from medusa_forge.model.config import ModelConfig

# Copied from the HF model directory when present (what AutoTokenizer and generation defaults read).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "generation_config.json")


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
    max_draft_len: int = DEFAULT_MAX_DRAFT_LEN
    device: str | None = None  # where FP8 calibration runs (default: cuda when available)
    overwrite: bool = False


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
    if o.quantization == "fp8" and o.calib_prompts is None:
        raise ForgeError("--quantization fp8 needs --calib-prompts FILE (JSONL with a 'prompt' field per line)")
    if o.quantization != "fp8" and o.calib_prompts is not None:
        raise ForgeError("--calib-prompts is only used with --quantization fp8")
    out = Path(o.out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not o.overwrite)):
        what = "is not a directory" if not out.is_dir() else "is not empty; pass --overwrite to replace it"
        raise ForgeError(f"output directory {out.absolute()} {what}")


def plan(o: ConvertOptions) -> tuple[ModelConfig, CheckpointSpec, dict]:
    """Configs only: the HF model's, the spec every split is checked against, and the config.json to write."""
    from medusa_forge.heads.layouts import detect

    check_options(o)
    cfg = ModelConfig.from_dir(o.model_dir)  # unknown architectures fail here, one line
    source = str(Path(o.model_dir) / "config.json")
    act = json.loads(Path(source).read_text()).get("hidden_act", "silu")
    if act != "silu":
        raise ForgeError(f"{source}: hidden_act {act!r}: TensorRT-LLM's Medusa heads use the model's hidden_act while "
                         "Medusa ResBlocks are trained with SiLU; only silu models convert")
    heads = detect(o.medusa_dir)  # head and layer counts from the heads' own config.json
    spec = spec_for(cfg, heads.num_heads, heads.num_layers, o.tp_size, o.dtype, fp8=o.quantization == "fp8",
                    fp8_kv_cache=o.kv_cache_dtype == "fp8")
    spec.check(f"{o.model_dir} with --tp-size {o.tp_size}")
    return cfg, spec, trtllm_config(cfg, spec, o.max_draft_len, source)


def convert_trtllm(o: ConvertOptions, log: Callable[[str], None] = lambda msg: None) -> ConvertResult:
    """Convert: validate, load (heads first: their size checks are cheap), calibrate if FP8, write atomically."""
    from medusa_forge.heads.checkpoint import load_heads
    from medusa_forge.model.checkpoint import load_hf_model
    from medusa_forge.model.dtypes import resolve_device_dtype

    t0 = time.perf_counter()
    cfg, spec, config = plan(o)
    target = TORCH_DTYPES[o.dtype]
    device, dtype = torch.device("cpu"), target  # FP16/BF16: a copy, no compute
    if spec.fp8:  # calibration runs the model: fp32 on CPU, the checkpoint dtype on CUDA
        device, _ = resolve_device_dtype(o.device, None)
        dtype = torch.float32 if device.type == "cpu" else target
    heads = load_heads(o.medusa_dir, cfg.hidden_size, cfg.vocab_size, dtype=dtype, device=device)
    log(f"loading {o.model_dir} ({dtype}, {device}) and {heads.config.num_heads} Medusa heads from {o.medusa_dir}")
    model = load_hf_model(o.model_dir, dtype=dtype, device=device)
    cal = None
    if spec.fp8:
        from medusa_forge.model.tokenizer import Tokenizer

        tokens = fp8_mod.calibration_tokens(Tokenizer(o.model_dir), o.calib_prompts, o.calib_size, o.calib_max_seq_len)
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
            t = sd[e.source] if e.rows is None else sd[e.source][e.rows[0]:e.rows[1]]
        if tuple(t.shape) != e.shape:
            raise ForgeError(f"{e.source}: shape {list(t.shape)} does not match {e.name} {list(e.shape)}")
        out[e.name] = t.detach()
    return out


def rank_tensors(spec: CheckpointSpec, rank: int, sources: dict[str, Tensor],
                 quantized: dict[str, tuple[Tensor, float]], cal: "fp8_mod.Calibration | None") -> dict[str, Tensor]:
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
