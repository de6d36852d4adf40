"""Build a self-contained native engine directory (layout in ``medusa_forge/manifest.py``).

    medusa_forge.json   manifest: sources, sha256 of the inputs, dtype, tree (+ tree_stats), tool versions
    model/              HF-layout base model in the engine dtype (+ tokenizer files, generation config);
                        for fp8 the FP8 layout of ``model/fp8_linear.py``
    medusa/             FasterDecoding-layout heads in the compute dtype (absent for a base-only engine)

Every input is validated before anything is written; the directory is assembled in a temporary
sibling, loaded back through ``load_engine`` and made to generate (Medusa output must equal plain
greedy decoding) and only then renamed into place, so a failed build leaves nothing behind.
"""

from __future__ import annotations

import gc
import json
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from medusa_forge import __version__
from medusa_forge.atomic import atomic_output_dir
from medusa_forge.build.compare import split_prompts
from medusa_forge.build.tree_search import SearchConfig, device_name, encode_prompts, search_tree, tree_report
from medusa_forge.convert import fp8_native
from medusa_forge.convert.trtllm_checkpoint import TOKENIZER_FILES
from medusa_forge.engine.generation import GenerationConfig
from medusa_forge.engine.load import DEFAULT_TREE, load_engine
from medusa_forge.errors import ForgeError
from medusa_forge.heads.checkpoint import load_heads, read_heads_config, save_heads
from medusa_forge.manifest import EngineManifest, read_tree, sha256_file
from medusa_forge.model import fp8_linear as fp8
from medusa_forge.model.checkpoint import checkpoint_files, expected_hf_shapes, load_hf_model, read_tensor_headers
from medusa_forge.model.config import ModelConfig
from medusa_forge.model.dtypes import canonical_dtype, resolve_device_dtype
from medusa_forge.model.tokenizer import Tokenizer
from medusa_forge.prompts import read_prompts

SHARD_BYTES = 4 << 30
VERIFY_PROMPT = "def main():\n"


@dataclass
class NativeBuildConfig:
    model_dir: Path
    out_dir: Path
    dtype: str = "bfloat16"
    medusa_dir: Path | None = None
    tree: str | None = None  # preset | JSON file | JSON list | "auto"; None: mc_sim_7b_63 with heads
    calib_prompts: Path | None = None
    calib_split: str = "all"  # all | even | odd lines of the prompt file (keep benchmark prompts out)
    max_seq_len: int | None = None
    device: str | None = None
    fp8_emulate: bool = False
    fp8_activation: str = "dynamic"
    fp8_compute_dtype: str = "bfloat16"  # embedding, norms, lm_head and heads of an fp8 engine
    fp8_keep: tuple[str, ...] = ()  # GEMM kinds left unquantized, e.g. ("attn.wqkv",)
    overwrite: bool = False
    verify_tokens: int = 16
    search: SearchConfig = field(default_factory=SearchConfig)


def build_native(cfg: NativeBuildConfig) -> EngineManifest:
    """Validate, build, verify and atomically publish a native engine; returns its manifest."""
    dtype = canonical_dtype(cfg.dtype)
    model_cfg = ModelConfig.from_dir(cfg.model_dir)
    headers = read_tensor_headers(checkpoint_files(Path(cfg.model_dir)))
    device, work_dtype = _work_device_dtype(cfg, dtype)
    backend = fp8.fp8_backend(device, cfg.fp8_emulate, cfg.fp8_activation) if dtype == "fp8" else None
    if cfg.medusa_dir is None and cfg.tree is not None:
        raise ForgeError("--medusa-choices needs Medusa heads (--medusa DIR)")
    texts = None
    if cfg.calib_prompts is not None:
        texts = [p.prompt for p in split_prompts(read_prompts(cfg.calib_prompts), cfg.calib_split)]
    if cfg.tree == "auto" and texts is None:
        raise ForgeError("--medusa-choices auto needs calibration prompts (--calib-prompts FILE)")
    if dtype == "fp8" and cfg.fp8_activation == "static" and texts is None:
        raise ForgeError("--fp8-activation static needs calibration prompts (--calib-prompts FILE)")
    tree = None
    if cfg.medusa_dir is not None:
        if not Path(cfg.medusa_dir).is_dir():
            raise ForgeError(f"{cfg.medusa_dir}: Medusa heads directory not found")
        num_heads = read_heads_config(Path(cfg.medusa_dir))["medusa_num_heads"]
        if cfg.tree != "auto":
            tree = read_tree(cfg.tree or DEFAULT_TREE)
            tree.check_heads(num_heads)
    max_seq_len = min(cfg.max_seq_len or 2048, model_cfg.max_position_embeddings)
    if max_seq_len < 16:
        raise ForgeError(f"--max-seq-len {max_seq_len} is too small (need >= 16)")
    tokenizer = Tokenizer(cfg.model_dir)
    tokenizer.check_fits(model_cfg.vocab_size)

    with atomic_output_dir(cfg.out_dir, cfg.overwrite) as tmp:
        model = load_hf_model(cfg.model_dir, dtype=work_dtype, device=device)
        heads = None
        if cfg.medusa_dir is not None:
            heads = load_heads(
                cfg.medusa_dir, model_cfg.hidden_size, model_cfg.vocab_size, dtype=work_dtype, device=device
            )
        extra: dict = {"build_device": device_name(device)}
        if cfg.calib_prompts is not None:
            extra["calib_split"] = cfg.calib_split
        if dtype == "fp8":
            extra["fp8"] = _quantize(model, tokenizer, texts, backend, cfg)
        tree_stats: dict = {}
        if heads is not None and cfg.tree == "auto":
            tree, tree_stats = search_tree(model, heads, tokenizer, texts, cfg.search)
        elif heads is not None and texts is not None:
            tree_stats = tree_report(model, heads, tokenizer, texts, tree, cfg.search)
        _write_model(Path(cfg.model_dir), tmp / "model", model, headers, dtype, cfg)
        if heads is not None:
            (tmp / "medusa").mkdir()
            save_heads(heads.to(getattr(torch, _storage_dtype(dtype, cfg))), tmp / "medusa")
        manifest = EngineManifest(
            kind="native",
            dtype=dtype,
            medusa_choices=tree.to_list() if tree else None,
            max_seq_len=max_seq_len,
            num_medusa_heads=heads.config.num_heads if heads is not None else 0,
            sources=_sources(cfg),
            sha256=_input_digests(cfg),
            tool_versions=tool_versions(),
            tree_stats=tree_stats,
            extra={**extra, "tree_name": tree.name if tree else None},
        )
        del model, heads
        _free()
        manifest.save(tmp)
        manifest.extra["verify"] = verify_engine(tmp, cfg, texts)
        manifest.save(tmp)
    return manifest


def _work_device_dtype(cfg: NativeBuildConfig, dtype: str) -> tuple[torch.device, torch.dtype]:
    """Device and dtype the build computes in (calibration, search, verification)."""
    if dtype == "fp8":
        device, _ = resolve_device_dtype(cfg.device, None)
        compute = canonical_dtype(cfg.fp8_compute_dtype)
        if compute == "fp8":
            raise ForgeError("--fp8-compute-dtype must be bfloat16, float16 or float32")
        # CPU emulation computes in fp32 (bf16 GEMMs on CPU are slow and add nothing to the check).
        return device, torch.float32 if device.type == "cpu" else getattr(torch, compute)
    return resolve_device_dtype(cfg.device, dtype)


def _storage_dtype(dtype: str, cfg: NativeBuildConfig) -> str:
    """dtype of the unquantized tensors written to disk."""
    return canonical_dtype(cfg.fp8_compute_dtype) if dtype == "fp8" else dtype


def _quantize(model, tokenizer, texts, backend: str, cfg: NativeBuildConfig) -> dict:
    scales = None
    if cfg.fp8_activation == "static":
        ids = encode_prompts(tokenizer, texts[: cfg.search.calib_limit], cfg.search.prompt_tokens)
        scales = fp8_native.calibrate_input_scales(model, ids)
    swapped = fp8.swap_linears(model, backend, scales, cfg.fp8_keep)
    skipped = sorted(set(fp8.linear_names(model)) - set(swapped))
    return {
        "activation_scheme": cfg.fp8_activation,
        "compute_dtype": canonical_dtype(cfg.fp8_compute_dtype),
        "weight_scaling": "per-tensor",
        "quantized": len(swapped),
        "unquantized": skipped,
        "kept_high_precision": ["embed", "lm_head", "medusa heads"],
    }


def _write_model(src: Path, dst: Path, model, headers: dict, dtype: str, cfg: NativeBuildConfig) -> None:
    """HF-layout weights in the engine dtype (FP8 layout for fp8), config.json and tokenizer files."""
    dst.mkdir()
    storage = getattr(torch, _storage_dtype(dtype, cfg))
    replaced: dict[str, torch.Tensor] = {}
    if dtype == "fp8":
        replaced = fp8_native.fp8_hf_tensors(model, expected_hf_shapes(model.config))
    tensors = dict(replaced)
    from safetensors import safe_open  # local: only this writer streams source tensors

    for f in sorted({f for f, _ in headers.values()}):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                if name in replaced or name.startswith("medusa_head"):
                    continue
                t = sf.get_tensor(name)
                tensors[name] = t.to(storage) if t.is_floating_point() else t
    _save_shards(tensors, dst)
    config = json.loads((src / "config.json").read_text())
    for key in ("torch_dtype", "dtype"):
        if key in config or key == "torch_dtype":
            config[key] = _storage_dtype(dtype, cfg)
    if dtype == "fp8":
        config["quantization_config"] = fp8_native.quantization_config(cfg.fp8_activation)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _save_shards(tensors: dict[str, torch.Tensor], dst: Path) -> None:
    """One model.safetensors, or HF-style shards plus model.safetensors.index.json past SHARD_BYTES."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(dst / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(dst / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )


def verify_engine(engine_dir: Path, cfg: NativeBuildConfig, texts: list[str] | None) -> dict:
    """Load the finished directory the way users will and generate; Medusa must equal plain greedy."""
    engine = load_engine(engine_dir, device=cfg.device, fp8_emulate=cfg.fp8_emulate)
    prompt = VERIFY_PROMPT if not texts else engine.tokenizer.decode(encode_prompts(engine.tokenizer, texts[:1], 64)[0])
    base = engine.generate(
        prompt, GenerationConfig(max_new_tokens=cfg.verify_tokens, use_medusa=False, ignore_eos=True)
    )
    out = {"prompt_chars": len(prompt), "tokens": len(base.tokens), "text": base.text}
    if engine.tree is not None:
        med = engine.generate(
            prompt, GenerationConfig(max_new_tokens=cfg.verify_tokens, use_medusa=True, ignore_eos=True)
        )
        out.update(
            {
                "medusa_equals_greedy": med.tokens == base.tokens,
                "medusa_steps": med.steps,
                "medusa_acceptance_length": round(med.mean_accepted, 4),
            }
        )
        if med.tokens != base.tokens:
            first = next(i for i, (a, b) in enumerate(zip(med.tokens + [-1], base.tokens + [-2])) if a != b)
            out["first_difference"] = first
    del engine
    _free()
    return out


def _sources(cfg: NativeBuildConfig) -> dict[str, str]:
    out = {"model": str(Path(cfg.model_dir).resolve())}
    if cfg.medusa_dir is not None:
        out["medusa"] = str(Path(cfg.medusa_dir).resolve())
    if cfg.calib_prompts is not None:
        out["calib_prompts"] = str(Path(cfg.calib_prompts).resolve())
    return out


def _input_digests(cfg: NativeBuildConfig) -> dict[str, str]:
    """sha256 of every input file, keyed ``<role>/<file>``."""
    out = {}
    for role, d in (("model", cfg.model_dir), ("medusa", cfg.medusa_dir)):
        if d is None:
            continue
        for f in sorted(Path(d).iterdir()):
            if f.is_file():
                out[f"{role}/{f.name}"] = sha256_file(f)
    if cfg.calib_prompts is not None:
        out[f"calib_prompts/{Path(cfg.calib_prompts).name}"] = sha256_file(cfg.calib_prompts)
    return out


def tool_versions() -> dict[str, str]:
    import safetensors
    import transformers

    out = {
        "medusa_forge": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
