"""Read a TensorRT-LLM Medusa checkpoint back into our native ``Transformer`` + ``MedusaHeads``.

Every rank file is merged (``trtllm_names.merge``, the inverse of the writer's split) into the native state
dict, so a converted checkpoint — ours or one from TensorRT-LLM's own converter — runs in the native engine
(``load_engine(DIR)``, ``medusa-forge generate --model DIR``) and can be compared with its source here, on
CPU. The checkpoint is validated first (``trtllm_inspect.validate``, headers and scales).

FP8 checkpoints run their block GEMMs as ``model.fp8_linear.FP8Linear`` with the static activation scales: what
TensorRT-LLM's ``FP8Linear`` computes. ``fc`` and ``gate`` are fused into our ``w_gate_up`` the way
TensorRT-LLM's ``fuse_gate_mlp`` fuses them at build time: dequantize, requantize with the larger weight scale,
larger activation scale. On CPU the FP8 GEMMs are emulated only when asked (``fp8_emulate`` or
``MEDUSA_FORGE_FP8_EMULATE=1``), as for native FP8 engines.

Heads whose per-head ``lm_head`` equals the base ``lm_head`` (converted from "version 2" heads) come back as
shared-lm_head heads, so they cost no extra memory here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from medusa_forge.convert.trtllm_config import ARCHITECTURE, CheckpointConfig, read_config
from medusa_forge.convert.trtllm_inspect import validate
from medusa_forge.convert.trtllm_names import entries, merge, scale_names, unpad_vocab
from medusa_forge.errors import ForgeError
from medusa_forge.heads.medusa_head import MedusaHeads, MedusaHeadsConfig
from medusa_forge.model.checkpoint import build_model
from medusa_forge.model.fp8_linear import E4M3, FP8_MAX, FP8Linear, emulation_requested, fp8_backend
from medusa_forge.model.llama import Transformer


@dataclass
class LoadedCheckpoint:
    config: CheckpointConfig
    model: Transformer
    heads: MedusaHeads
    dtype: str  # compute dtype the model was loaded in


def is_trtllm_checkpoint(path: str | Path) -> bool:
    """A TensorRT-LLM Medusa checkpoint dir: config.json with ``architecture`` (HF has ``architectures``) + rank0."""
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "rank0.safetensors").is_file():
        return False
    try:
        return json.loads((path / "config.json").read_text()).get("architecture") == ARCHITECTURE
    except (json.JSONDecodeError, AttributeError, OSError):
        return False


def _token_ids(ckpt_dir: Path) -> tuple[tuple[int, ...], int | None]:
    """eos/bos ids from the copied ``generation_config.json`` (TensorRT-LLM's config has none)."""
    path = ckpt_dir / "generation_config.json"
    if not path.is_file():
        return (), None
    d = json.loads(path.read_text())
    eos = d.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
    return tuple(int(e) for e in eos), d.get("bos_token_id")


def read_tensors(ckpt: CheckpointConfig) -> dict[str, Tensor]:
    """TensorRT-LLM name -> unsplit tensor, every rank merged (scales: rank 0's, validate checked they agree);
    lm_heads lose the rows that pad the vocabulary to a multiple of tp."""
    files = [safe_open(str(ckpt.rank_file(r)), framework="pt") for r in range(ckpt.spec.tp_size)]
    out = {}
    for e in entries(ckpt.spec):
        out[e.name] = unpad_vocab(e, merge(e, [f.get_tensor(e.name) for f in files], ckpt.spec))
        if e.quantized:
            out.update({n: files[0].get_tensor(n) for n in scale_names(e)})
    return out


def load_trtllm_checkpoint(
    ckpt_dir: str | Path,
    device: str | None = None,
    dtype: str | None = None,
    fp8_emulate: bool | None = None,
    dequantize: bool = False,
) -> LoadedCheckpoint:
    """Validate, merge the ranks and build the native model and heads.

    Compute dtype: ``dtype`` if given, else fp32 on CPU and the checkpoint's dtype on CUDA.
    ``dequantize``: an FP8 checkpoint's weights become ``e4m3 * weight_scale`` in the compute dtype and
    run as ordinary linears (what the weights lost to FP8, without activation quantization).
    """
    from medusa_forge.model.dtypes import resolve_device_dtype

    ckpt = read_config(ckpt_dir)
    problems = validate(ckpt, check_values=False)
    if problems:
        raise ForgeError(
            f"{ckpt.directory}: not a valid TensorRT-LLM checkpoint: {problems[0]} ({len(problems)} "
            f"problem(s); run `medusa-forge convert inspect {ckpt.directory}`)"
        )
    spec = ckpt.spec
    dev, _ = resolve_device_dtype(device, None)
    name = dtype or ("float32" if dev.type == "cpu" else spec.dtype)
    _, dt = resolve_device_dtype(str(dev), name)
    backend = fp8_backend(dev, emulation_requested(fp8_emulate), "static") if spec.fp8 and not dequantize else None
    tensors = read_tensors(ckpt)
    sd: dict[str, Tensor] = {}
    fp8: dict[str, list[tuple[Tensor, float, float]]] = {}  # native linear -> [(w8, w_scale, act_scale)] by rows
    for e in entries(spec):
        if e.source.startswith("heads."):
            continue
        t = tensors[e.name]
        if e.quantized:
            w_name, a_name = scale_names(e)
            fp8.setdefault(e.source, []).append((t, float(tensors[w_name][0]), float(tensors[a_name][0])))
            t = t.float() * float(tensors[w_name][0])  # dequantized; replaced by an FP8Linear below
        sd[e.source] = torch.cat([sd[e.source], t]) if e.source in sd else t  # fc then gate rows: w_gate_up
    eos, bos = _token_ids(ckpt.directory)
    model = build_model(ckpt.model_config(eos, bos), sd, dt, dev)
    for weight_name, parts in fp8.items() if not dequantize else ():
        _swap_fp8(model, weight_name.removesuffix(".weight"), parts, dt, backend)
    heads = _heads(ckpt, tensors, tensors["lm_head.weight"]).to(device=dev, dtype=dt)
    return LoadedCheckpoint(ckpt, model, heads, name)


def fuse_fp8(parts: list[tuple[Tensor, float, float]]) -> tuple[Tensor, float, float]:
    """Row-concatenate FP8 weights with one scale: requantize to the largest weight scale (fuse_gate_mlp)."""
    if len(parts) == 1:
        return parts[0]
    w_scale = max(s for _, s, _ in parts)
    w = torch.cat([w8.float() * s / w_scale for w8, s, _ in parts]).clamp(-FP8_MAX, FP8_MAX).to(E4M3)
    return w, w_scale, max(a for _, _, a in parts)


def _swap_fp8(model: Transformer, name: str, parts, dtype: torch.dtype, backend: str) -> None:
    w8, w_scale, a_scale = fuse_fp8(parts)
    parent_name, attr = name.rsplit(".", 1)
    parent = model.get_submodule(parent_name)
    if not isinstance(getattr(parent, attr), nn.Linear):
        raise ForgeError(f"{name}: expected a linear layer to hold FP8 weights")
    dev = model.lm_head.weight.device
    bias = getattr(parent, attr).bias  # Qwen2's q/k/v: kept in the compute dtype, added after the GEMM
    setattr(parent, attr, FP8Linear(w8.to(dev), torch.tensor(w_scale), torch.tensor(a_scale), dtype, backend, bias))


def _heads(ckpt: CheckpointConfig, tensors: dict[str, Tensor], lm_head: Tensor) -> MedusaHeads:
    s = ckpt.spec
    K, L, H = s.num_medusa_heads, s.num_medusa_layers, s.hidden_size

    def stacked(suffix: str, shape: tuple[int, ...]) -> Tensor:
        rows = [tensors[f"medusa_heads.{k}.medusa_layers.{j}.linear.{suffix}"] for k in range(K) for j in range(L)]
        return torch.stack(rows).reshape(K, L, *shape) if rows else torch.zeros(K, 0, *shape, dtype=lm_head.dtype)

    projs = [tensors[f"medusa_heads.{k}.lm_head.weight"] for k in range(K)]
    shared = all(torch.equal(p, lm_head) for p in projs)
    with torch.device("meta"):  # no throw-away zero init of [K, V, H]
        heads = MedusaHeads(
            MedusaHeadsConfig(K, L, H, s.vocab_size, shared_lm_head=shared, base_model_name_or_path=str(ckpt.directory))
        )
    heads.res_weight = nn.Parameter(stacked("weight", (H, H)), requires_grad=False)
    heads.res_bias = nn.Parameter(stacked("bias", (H,)), requires_grad=False)
    if not shared:
        heads.proj_weight = nn.Parameter(torch.stack(projs), requires_grad=False)
    return heads.eval()
