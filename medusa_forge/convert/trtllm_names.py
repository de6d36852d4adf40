"""The one definition of a TensorRT-LLM Medusa checkpoint's tensors: names, sources, shapes, TP splits.

Every weight of ``rank{r}.safetensors`` is an :class:`Entry`: its TensorRT-LLM name, where it comes from in
our native model (the ``Transformer`` state dict, built from HF names by ``model.checkpoint.hf_to_native``)
or in the stacked ``MedusaHeads``, its unsplit shape, and how tensor parallelism splits it. The writer shards
with :func:`shard`, the reader merges with :func:`merge`, and ``inspect`` validates files against
:func:`expected_tensors` — so the three cannot disagree.

Pinned to TensorRT-LLM v0.11.0 (commit in ``trtllm_config``): ``examples/medusa/convert_checkpoint.py``
``convert_hf_llama``, ``tensorrt_llm/models/convert_utils.py`` (``split`` = equal ``Tensor.split`` of rank r,
asserting divisibility; ``split_matrix_tp(dim)``; ``dup_kv_weight``), ``tensorrt_llm/models/medusa/weight.py``
``load_medusa_hf`` and ``tensorrt_llm/models/medusa/model.py`` (``MedusaLayer.linear`` and ``MedusaHead.lm_head``
are ``ColumnLinear(gather_output=True)``):

==================================================  ========================  =====================
TensorRT-LLM name                                   HF / heads source         split over TP
==================================================  ========================  =====================
transformer.vocab_embedding.weight [V, H]           model.embed_tokens        none
transformer.layers.{l}.input_layernorm.weight       input_layernorm           none
transformer.layers.{l}.attention.qkv.weight         q_proj, k_proj, v_proj    per rank: cat(q_r, k_r, v_r)
transformer.layers.{l}.attention.dense.weight       o_proj                    dim 1 (input)
transformer.layers.{l}.post_layernorm.weight        post_attention_layernorm  none
transformer.layers.{l}.mlp.fc.weight                **gate_proj**             dim 0
transformer.layers.{l}.mlp.gate.weight              **up_proj**               dim 0
transformer.layers.{l}.mlp.proj.weight              down_proj                 dim 1 (input)
transformer.ln_f.weight                             model.norm                none
lm_head.weight [V, H]                               lm_head (embed if tied)   dim 0
medusa_heads.{k}.medusa_layers.{j}.linear.weight    {k}.{j}.linear.weight     dim 0 (output)
medusa_heads.{k}.medusa_layers.{j}.linear.bias      {k}.{j}.linear.bias       dim 0
medusa_heads.{k}.lm_head.weight [V, H]              {k}.{L}.weight            dim 0
==================================================  ========================  =====================

Watch the MLP: TensorRT-LLM's ``mlp.fc`` is HF ``gate_proj`` (the SiLU branch) and ``mlp.gate`` is HF
``up_proj``. Our ``ffn.w_gate_up`` is ``cat(gate_proj, up_proj)``, so ``fc`` is its first ``intermediate_size``
rows. QKV is GQA-aware: q, k and v are split separately and each rank gets its own q, k, v rows concatenated;
with fewer KV heads than ranks each KV head is first repeated ``tp // kv`` times (``dup_kv_weight``), so rank r
holds KV head ``r // (tp // kv)``. "Version 2" heads (no per-head projection) get the base lm_head as each
head's ``lm_head``: TensorRT-LLM's ``MedusaHead`` always has one.

FP8 (``quant_algo: FP8``): the four block GEMMs' ``.weight`` is ``float8_e4m3fn`` and each gains
``.weights_scaling_factor`` and ``.activation_scaling_factor``, float32 of shape [1] (``FP8Linear`` /
``FP8RowLinear`` Parameters in ``tensorrt_llm/quantization/layers.py`` @05316d33); ``kv_cache_quant_algo: FP8``
adds ``transformer.layers.{l}.attention.kv_cache_scaling_factor`` [1] float32. Scales are per tensor over the
unsplit weight, so every rank carries the same value (as ModelOpt's export does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from medusa_forge.convert.trtllm_config import CheckpointSpec
from medusa_forge.model.dtypes import TORCH_DTYPES

FP8_DTYPE = torch.float8_e4m3fn
SCALE_DTYPE = torch.float32
WEIGHT_SCALE = "weights_scaling_factor"
ACT_SCALE = "activation_scaling_factor"
KV_SCALE = "kv_cache_scaling_factor"

# split kinds
NONE, COLUMN, ROW, QKV = "none", "column", "row", "qkv"


@dataclass(frozen=True)
class Entry:
    """One weight tensor of the checkpoint (its FP8 scales are derived from ``quantized``)."""

    name: str  # TensorRT-LLM name
    shape: tuple[int, ...]  # unsplit
    split: str
    source: str  # native state-dict name, or "heads.<res_weight|res_bias|proj_weight>"
    index: tuple[int, ...] = ()  # head/block index into a stacked heads tensor
    rows: tuple[int, int] | None = None  # row range of a fused native tensor (fc/gate of w_gate_up)
    quantized: bool = False
    vocab_rows: int = 0  # > 0: an lm_head whose source rows are zero-padded to shape[0] (vocab not divisible by tp)

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]


def entries(spec: CheckpointSpec) -> list[Entry]:
    """Every weight tensor, base model first, in the order the writer emits them."""
    H, I, V, D = spec.hidden_size, spec.intermediate_size, spec.vocab_padded, spec.head_size
    pad = spec.vocab_size if V != spec.vocab_size else 0
    q, kv = spec.num_heads * D, spec.num_kv_heads * D
    fp8 = spec.fp8
    out = [Entry("transformer.vocab_embedding.weight", (spec.vocab_size, H), NONE, "embed.weight")]
    for i in range(spec.num_layers):
        p, n = f"transformer.layers.{i}.", f"layers.{i}."
        out += [
            Entry(p + "input_layernorm.weight", (H,), NONE, n + "attn_norm.weight"),
            Entry(p + "attention.qkv.weight", (q + 2 * kv, H), QKV, n + "attn.wqkv.weight", quantized=fp8),
            *([Entry(p + "attention.qkv.bias", (q + 2 * kv,), QKV, n + "attn.wqkv.bias")] if spec.qkv_bias else []),
            Entry(p + "attention.dense.weight", (H, q), ROW, n + "attn.wo.weight", quantized=fp8),
            Entry(p + "post_layernorm.weight", (H,), NONE, n + "ffn_norm.weight"),
            Entry(p + "mlp.fc.weight", (I, H), COLUMN, n + "ffn.w_gate_up.weight", rows=(0, I), quantized=fp8),
            Entry(p + "mlp.gate.weight", (I, H), COLUMN, n + "ffn.w_gate_up.weight", rows=(I, 2 * I), quantized=fp8),
            Entry(p + "mlp.proj.weight", (H, I), ROW, n + "ffn.w_down.weight", quantized=fp8),
        ]
    out += [
        Entry("transformer.ln_f.weight", (H,), NONE, "norm.weight"),
        Entry("lm_head.weight", (V, H), COLUMN, "lm_head.weight", vocab_rows=pad),
    ]
    for k in range(spec.num_medusa_heads):
        p = f"medusa_heads.{k}."
        for j in range(spec.num_medusa_layers):
            out += [
                Entry(p + f"medusa_layers.{j}.linear.weight", (H, H), COLUMN, "heads.res_weight", (k, j)),
                Entry(p + f"medusa_layers.{j}.linear.bias", (H,), COLUMN, "heads.res_bias", (k, j)),
            ]
        out.append(Entry(p + "lm_head.weight", (V, H), COLUMN, "heads.proj_weight", (k,), vocab_rows=pad))
    return out


def scale_names(e: Entry) -> tuple[str, str]:
    """(weights_scaling_factor, activation_scaling_factor) names of a quantized entry's module."""
    return f"{e.module}.{WEIGHT_SCALE}", f"{e.module}.{ACT_SCALE}"


def kv_scale_name(layer: int) -> str:
    return f"transformer.layers.{layer}.attention.{KV_SCALE}"


def rank_shape(e: Entry, spec: CheckpointSpec) -> tuple[int, ...]:
    tp = spec.tp_size
    if e.split == NONE:
        return e.shape
    if e.split == QKV:
        return ((spec.num_heads // tp + 2 * spec.kv_heads_per_rank) * spec.head_size, *e.shape[1:])
    dim = 0 if e.split == COLUMN else 1
    return tuple(s // tp if d == dim else s for d, s in enumerate(e.shape))


def expected_tensors(spec: CheckpointSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of every tensor in each rank file (all ranks hold the same names)."""
    dtype = TORCH_DTYPES[spec.dtype]
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for e in entries(spec):
        out[e.name] = (rank_shape(e, spec), FP8_DTYPE if e.quantized else dtype)
        if e.quantized:
            for name in scale_names(e):
                out[name] = ((1,), SCALE_DTYPE)
    if spec.kv_cache_quant_algo:
        for i in range(spec.num_layers):
            out[kv_scale_name(i)] = ((1,), SCALE_DTYPE)
    return out


def _split(t: Tensor, tp: int, rank: int, dim: int) -> Tensor:
    """convert_utils.split: equal parts (the spec checked divisibility), part ``rank``."""
    return t.split(t.shape[dim] // tp, dim=dim)[rank].contiguous()


def _qkv_parts(t: Tensor, spec: CheckpointSpec, kv_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    q = t.shape[0] - 2 * kv_rows
    return t[:q], t[q : q + kv_rows], t[q + kv_rows :]


def _dup_kv(t: Tensor, spec: CheckpointSpec) -> Tensor:
    """convert_utils.dup_kv_weight: each KV head repeated tp // kv times, consecutively."""
    reps = spec.tp_size // spec.num_kv_heads
    heads = t.reshape(spec.num_kv_heads, spec.head_size, *t.shape[1:])
    return heads.repeat_interleave(reps, dim=0).reshape(-1, *t.shape[1:])


def pad_vocab(e: Entry, t: Tensor) -> Tensor:
    """An lm_head with zero rows appended up to the padded vocabulary (convert_hf_llama's np.pad)."""
    if not e.vocab_rows or t.shape[0] == e.shape[0]:
        return t
    return cat([t, t.new_zeros(e.shape[0] - t.shape[0], *t.shape[1:])])


def unpad_vocab(e: Entry, t: Tensor) -> Tensor:
    return t[: e.vocab_rows] if e.vocab_rows else t


def shard(e: Entry, t: Tensor, spec: CheckpointSpec, rank: int) -> Tensor:
    """Rank ``rank``'s part of the unsplit tensor ``t`` (FP8 weights are quantized whole, then sharded)."""
    tp = spec.tp_size
    if e.split == NONE or tp == 1:
        return t.contiguous()
    if e.split == QKV:
        q, k, v = _qkv_parts(t, spec, spec.num_kv_heads * spec.head_size)
        if spec.num_kv_heads < tp:
            k, v = _dup_kv(k, spec), _dup_kv(v, spec)
        return cat([_split(q, tp, rank, 0), _split(k, tp, rank, 0), _split(v, tp, rank, 0)])
    return _split(t, tp, rank, 0 if e.split == COLUMN else 1)


def merge(e: Entry, parts: list[Tensor], spec: CheckpointSpec) -> Tensor:
    """Inverse of :func:`shard`: the unsplit tensor from every rank's part (rank order).

    Replicated parts (unsplit tensors, duplicated KV heads) are taken from the first rank holding them;
    ``inspect`` checks that the copies agree.
    """
    tp = spec.tp_size
    if e.split == NONE or tp == 1:
        return parts[0]
    if e.split == QKV:
        split = [rank_qkv_parts(p, spec) for p in parts]
        keep = range(0, tp, tp // spec.num_kv_heads) if spec.num_kv_heads < tp else range(tp)
        return cat(
            [
                cat([s[0] for s in split]),
                cat([split[r][1] for r in keep]),
                cat([split[r][2] for r in keep]),
            ]
        )
    return cat(parts, dim=0 if e.split == COLUMN else 1)


def cat(parts: list[Tensor], dim: int = 0) -> Tensor:
    """torch.cat, float8 through a uint8 view: torch 2.4 (the 24.07 image's) has no CPU cat for float8."""
    if parts[0].dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return torch.cat([p.view(torch.uint8) for p in parts], dim).view(parts[0].dtype)
    return torch.cat(parts, dim)


def rank_qkv_parts(part: Tensor, spec: CheckpointSpec) -> tuple[Tensor, Tensor, Tensor]:
    """(q, k, v) rows of one rank's ``attention.qkv.weight``."""
    return _qkv_parts(part, spec, spec.kv_heads_per_rank * spec.head_size)


def replica_groups(e: Entry, spec: CheckpointSpec) -> list[list[int]]:
    """Ranks whose parts of ``e`` must be identical copies (for qkv: their k and v rows)."""
    tp = spec.tp_size
    if tp == 1:
        return []
    if e.split == NONE:
        return [list(range(tp))]
    if e.split == QKV and spec.num_kv_heads < tp:
        reps = tp // spec.num_kv_heads
        return [list(range(g, g + reps)) for g in range(0, tp, reps)]
    return []
