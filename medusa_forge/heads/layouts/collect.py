"""From named tensors of any layout to stacked heads, and back, with one-line errors for partial input.

A :class:`Source` is what detection found on disk (layout, declared head and layer counts, the
tensor store and its naming). :func:`collect` reads it strictly: every head and block present,
biases where the layout has them, one version for all heads (own projections or the base lm_head),
no stray tensors, shapes consistent with each other and with the base model when it is known.
The result, :class:`HeadsCheckpoint`, holds the stacked tensors in their stored dtype; it becomes
the one head module with :meth:`HeadsCheckpoint.to_module`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from medusa_forge.errors import ForgeError
from medusa_forge.heads.layouts.keys import KeyNames
from medusa_forge.heads.layouts.store import TensorStore
from medusa_forge.heads.medusa_head import MedusaHeads, MedusaHeadsConfig

MAX_HEADS = 16


@dataclass
class HeadsCheckpoint:
    """Stacked head tensors between layouts: ``res_weight [K,L,H,H]``, ``res_bias [K,L,H]``,
    ``proj_weight [K,V,H]`` or None for heads that use the base model's lm_head."""

    res_weight: Tensor
    res_bias: Tensor
    proj_weight: Tensor | None
    base_model_name_or_path: str = ""
    vocab_size: int | None = None  # known from the projections, else from a config hint

    @property
    def num_heads(self) -> int:
        return self.res_weight.shape[0]

    @property
    def num_layers(self) -> int:
        return self.res_weight.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.res_weight.shape[-1]

    @property
    def shared_lm_head(self) -> bool:
        return self.proj_weight is None

    @property
    def dtype(self) -> torch.dtype:
        return self.res_weight.dtype

    @classmethod
    def from_module(cls, heads: MedusaHeads) -> HeadsCheckpoint:
        cfg = heads.config
        proj = None if heads.proj_weight is None else heads.proj_weight.detach()
        return cls(
            heads.res_weight.detach(),
            heads.res_bias.detach(),
            proj,
            cfg.base_model_name_or_path,
            cfg.vocab_size if cfg.vocab_size > 0 else None,
        )

    def to_module(self, hidden_size: int, vocab_size: int, dtype: torch.dtype, device) -> MedusaHeads:
        """The one head module, for a base model of ``hidden_size``/``vocab_size`` (checked by collect)."""
        cfg = MedusaHeadsConfig(
            self.num_heads,
            self.num_layers,
            hidden_size,
            vocab_size,
            shared_lm_head=self.shared_lm_head,
            base_model_name_or_path=self.base_model_name_or_path,
        )
        with torch.device("meta"):
            heads = MedusaHeads(cfg)
        sd = {"res_weight": self.res_weight, "res_bias": self.res_bias}
        if self.proj_weight is not None:
            sd["proj_weight"] = self.proj_weight
        heads.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, assign=True)
        return heads.eval().requires_grad_(False)

    def with_projections(self, lm_head_weight: Tensor) -> HeadsCheckpoint:
        """Shared-lm_head heads as per-head projections: each head gets a copy of the base lm_head."""
        if self.proj_weight is not None:
            return self
        proj = lm_head_weight.detach().to(self.dtype)[None].expand(self.num_heads, *lm_head_weight.shape).clone()
        return HeadsCheckpoint(self.res_weight, self.res_bias, proj, self.base_model_name_or_path, proj.shape[1])


@dataclass
class Source:
    """A heads checkpoint found on disk, before its tensors are read."""

    layout: str
    directory: Path
    files: tuple[Path, ...]
    config: dict
    num_heads: int
    num_layers: int
    names: KeyNames
    store: TensorStore
    shared: bool | None = None  # declared by the config (version 2 / original_lm_head); None: the tensors decide
    shared_reason: str = ""  # the config field that declares it, for messages
    bias: bool = True  # the layout's ResBlocks carry biases
    bias_reason: str = ""  # the config field that says they do not, for messages
    heads_field: str = "medusa_num_heads"
    layers_field: str = "medusa_num_layers"
    hidden_hint: int | None = None
    vocab_hint: int | None = None
    base_model_name_or_path: str = ""
    extra_names: tuple[str, ...] = ()  # tensors that belong to the layout but not to the heads (vLLM's lm_head copy)
    notes: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return str(self.files[0]) if len(self.files) == 1 else str(self.directory)

    @property
    def shape_note(self) -> str:
        return f"config.json says {self.num_heads} heads x {self.num_layers} layers"


@dataclass
class Scan:
    """What the tensor names say, before any strict check (for ``heads inspect``)."""

    heads: list[int]
    layers: int
    proj_heads: list[int]
    biases: int
    unknown: list[str]
    dtypes: list[str]
    hidden: int | None
    vocab: int | None


def scan(src: Source) -> Scan:
    heads, proj, blocks, biases, unknown = set(), set(), set(), 0, []
    hidden = vocab = None
    for name in src.store.keys():
        if name in src.extra_names:
            continue
        parsed = src.names.parse(name)
        if parsed is None:
            unknown.append(name)
            continue
        kind, k, j = parsed
        heads.add(k)
        shape = src.store.shape(name)
        if kind == "proj":
            proj.add(k)
            vocab = vocab or (shape[0] if len(shape) == 2 else None)
        else:
            blocks.add(j)
            biases += kind == "bias"
            hidden = hidden or (shape[-1] if kind == "weight" and shape else None)
    dtypes = sorted({src.store.dtype(n) for n in src.store.keys() if n not in src.extra_names})
    return Scan(
        sorted(heads), max(blocks) + 1 if blocks else 0, sorted(proj), biases, sorted(unknown), dtypes, hidden, vocab
    )


def collect(src: Source, hidden_size: int | None = None, vocab_size: int | None = None) -> HeadsCheckpoint:
    """Read ``src`` strictly; ``hidden_size``/``vocab_size`` are the base model's when known."""
    K, L, where = src.num_heads, src.num_layers, src.where
    if not 1 <= K <= MAX_HEADS:
        raise ForgeError(f"{src.directory / 'config.json'}: {src.heads_field}={K} is out of range (1..{MAX_HEADS})")
    found = scan(src)
    _check_counts(src, found)
    shared = _decide_version(src, found)
    if not src.bias and found.biases:
        name = next(n for n in src.store.keys() if (p := src.names.parse(n)) and p[0] == "bias")
        raise ForgeError(
            f"{where}: tensor {name} present but {src.bias_reason} (the loader would ignore it): "
            "ambiguous, fix config.json or drop the biases"
        )
    base_known = hidden_size is not None
    H = hidden_size or found.hidden or src.hidden_hint
    V = vocab_size if vocab_size is not None else (found.vocab or src.vocab_hint)
    if H is None:
        raise ForgeError(f"{where}: no Medusa head tensors found ({src.shape_note})")
    for name in src.extra_names:  # a stored copy of the base lm_head (vLLM original_lm_head)
        shape = src.store.shape(name)
        if len(shape) != 2 or shape[1] != H or (V and shape[0] != V):
            raise ForgeError(f"{where}: tensor {name} has shape {list(shape)}, expected [{V or 'vocab'}, {H}]")
    remaining = set(src.store.keys()) - set(src.extra_names)

    def take(name: str, shape: tuple[int | None, ...], what: str = "") -> Tensor:
        if name not in src.store:
            raise ForgeError(f"{where}: tensor {name} missing{what} ({src.shape_note})")
        remaining.discard(name)
        got = src.store.shape(name)
        if len(got) != len(shape) or any(e is not None and g != e for g, e in zip(got, shape)):
            expect = [e if e is not None else g for g, e in zip(got, shape)] if len(got) == len(shape) else list(shape)
            why = (
                f"(base model hidden size {hidden_size}, vocab {vocab_size}): heads do not match the base"
                if base_known
                else f"(hidden size {H} from the first block{f', vocab {V}' if V else ''}): inconsistent heads"
            )
            raise ForgeError(f"{where}: tensor {name} has shape {list(got)}, expected {expect} {why}")
        return src.store.get(name)

    bias_note = ": ResBlocks need a bias (nn.Linear(H, H) with bias=True) for every head x layer"
    weights, biases = [], []
    for k in range(K):
        weights.append([take(src.names.weight(k, j), (H, H)) for j in range(L)])
        if src.bias:
            biases.append([take(src.names.bias(k, j), (H,), bias_note) for j in range(L)])
    dtype = weights[0][0].dtype if L else None
    proj = None
    if not shared:
        proj_list = []
        for k in range(K):
            t = take(src.names.projection(k, L), (V, H))
            V = V or t.shape[0]
            proj_list.append(t)
        proj = torch.stack(proj_list)
        dtype = dtype or proj.dtype
    if remaining:
        raise ForgeError(f"{where}: unexpected tensors {sorted(remaining)[:3]} ({src.shape_note})")
    for key, hint, got in (("hidden_size", src.hidden_hint, found.hidden), ("vocab_size", src.vocab_hint, found.vocab)):
        if hint and got and hint != got:
            raise ForgeError(f"{src.directory / 'config.json'}: {key}={hint} but the head tensors have {got}")
    dtype = dtype or torch.float32
    res_w = torch.stack([torch.stack(w) if L else torch.zeros(0, H, H, dtype=dtype) for w in weights])
    if src.bias:
        res_b = torch.stack([torch.stack(b) if L else torch.zeros(0, H, dtype=dtype) for b in biases])
    else:  # vLLM without medusa_fc_bias: nn.Linear(bias=False) computes exactly what a zero bias does
        res_b = torch.zeros(K, L, H, dtype=res_w.dtype)
    return HeadsCheckpoint(res_w, res_b, proj, src.base_model_name_or_path, V)


def _check_counts(src: Source, found: Scan) -> None:
    """Wrong head or layer counts, named by what the config says and what the tensors hold."""
    K, L, where = src.num_heads, src.num_layers, src.where
    extra_heads = [k for k in found.heads if k >= K]
    if extra_heads:
        n = max(found.heads) + 1
        raise ForgeError(
            f"{where}: holds {n} Medusa heads (0..{n - 1}) but config.json says {src.heads_field}={K}: "
            f"fix {src.heads_field} in config.json"
        )
    missing = [k for k in range(K) if k not in found.heads]
    if found.heads and missing:
        raise ForgeError(
            f"{where}: config.json says {src.heads_field}={K} but head(s) {missing} have no tensors "
            f"(found heads {found.heads})"
        )
    if found.heads and found.layers != L and found.layers > 0:
        raise ForgeError(
            f"{where}: holds {found.layers} ResBlock(s) per head but config.json says "
            f"{src.layers_field}={L}: fix {src.layers_field} in config.json"
        )
    projection_index = [
        src.names.parse(n)[2]
        for n in src.store.keys()
        if n not in src.extra_names and (p := src.names.parse(n)) and p[0] == "proj"
    ]
    if "{L}" in src.names.proj and any(i != L for i in projection_index):
        bad = sorted(set(projection_index) - {L})
        raise ForgeError(
            f"{where}: vocab projections stored after {bad} block(s) but config.json says "
            f"{src.layers_field}={L}: fix {src.layers_field} in config.json"
        )


def _decide_version(src: Source, found: Scan) -> bool:
    """True when the heads use the base lm_head ("version 2"); mixed files are refused."""
    K, L, where = src.num_heads, src.num_layers, src.where
    have = found.proj_heads
    if src.shared is True and have:
        raise ForgeError(
            f"{where}: {src.shared_reason} (heads use the base lm_head) but "
            f"{src.names.projection(have[0], L)} (a per-head vocab projection) is present: mixed versions"
        )
    if src.shared is True:
        return True
    if have and len(have) < K:
        lacking = [k for k in range(K) if k not in have]
        raise ForgeError(
            f"{where}: mixed versions: head(s) {have} have their own vocab projection "
            f"({src.names.projection(have[0], L)}) but head(s) {lacking} do not "
            f"({src.names.projection(lacking[0], L)} missing; version 2 heads use the base lm_head)"
        )
    if src.shared is False and not have:
        raise ForgeError(
            f"{where}: no per-head vocab projections ({src.names.projection(0, L)} missing) and "
            f"{src.shared_reason or 'the config'} does not declare a shared lm_head"
        )
    return not have


def named_tensors(ckpt: HeadsCheckpoint, names: KeyNames) -> dict[str, Tensor]:
    """Stacked tensors -> one layout's names (projections only for heads that have them)."""
    K, L = ckpt.num_heads, ckpt.num_layers
    out: dict[str, Tensor] = {}
    for k in range(K):
        for j in range(L):
            out[names.weight(k, j)] = ckpt.res_weight[k, j]
            out[names.bias(k, j)] = ckpt.res_bias[k, j]
        if ckpt.proj_weight is not None:
            out[names.projection(k, L)] = ckpt.proj_weight[k]
    return out
