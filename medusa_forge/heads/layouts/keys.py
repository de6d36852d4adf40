"""Tensor names of Medusa heads in every layout we read or write, pinned to the loaders that use them.

Head ``k`` (0-based) has ``L`` residual blocks ``j`` (``x + SiLU(W x + b)``) and a vocab projection.

FasterDecoding heads-only files (``medusa_lm_head.pt`` / ``.safetensors``), also what TGI and
TensorRT-LLM's ``--medusa_model_dir`` read: bare names ``{k}.{j}.linear.weight`` [H, H],
``{k}.{j}.linear.bias`` [H], ``{k}.{L}.weight`` [V, H]. Source: FasterDecoding/Medusa@e2a5d20
``medusa/model/medusa_model.py`` (``medusa_head = ModuleList([Sequential(*[ResBlock(H)] * L,
Linear(H, V, bias=False))])``, ``ResBlock.linear = nn.Linear(H, H)``) and ``medusa_model_legacy.py``
("version 2": ``Sequential(*[ResBlock(H)] * L)`` only, logits through ``base_model.lm_head``).
TGI@db931fc ``server/text_generation_server/layers/medusa.py`` (``MedusaHead`` prefixes ``{i}.{j}`` for
blocks, ``{i}.{n}`` for the projection; ``MedusaHeadV2`` prefixes ``{i}.0.linear``). TensorRT-LLM
``tensorrt_llm/models/medusa/weight.py`` ``load_medusa_hf`` (``{h}.{l}.linear.weight``/``.bias``,
``{h}.{num_medusa_layers}.weight``).

axolotl full-model checkpoints: the same names under ``medusa_head.``, inside the model's own shards.
Source: ctlllll/axolotl@76bc572 ``src/axolotl/monkeypatch/medusa_utils.py`` (``add_medusa_heads`` sets
``self.medusa_head`` on the causal LM, so ``save_pretrained`` writes ``medusa_head.{k}.{j}.linear.*`` and
``medusa_head.{k}.{L}.weight`` next to ``model.*``); FasterDecoding's Medusa-2 ``MedusaModelABC`` uses
the same attribute name.

vLLM: ``blocks.{k}.layers.{j}.weight``/``.bias`` and ``lm_heads.{k}.weight``, or one ``lm_head.weight``
(``lm_heads.0.weight`` is accepted for it) when ``original_lm_head`` is set; a ``medusa_heads.`` prefix
is stripped on load. Source: vllm-project/vllm@09cddad ``vllm/model_executor/models/medusa.py``
(``Medusa.blocks``, ``ResidualBlock.layers``, ``Medusa.lm_heads`` / ``Medusa.lm_head``, ``load_weights``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class KeyNames:
    """How one layout names a head's tensors: format strings over ``k`` (head), ``j`` (block), ``L``."""

    block_weight: str
    block_bias: str
    proj: str
    prefix: str = ""
    _patterns: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pats = tuple(
            (kind, re.compile(self._regex(fmt)))
            for kind, fmt in (("weight", self.block_weight), ("bias", self.block_bias), ("proj", self.proj))
        )
        object.__setattr__(self, "_patterns", pats)

    def _regex(self, fmt: str) -> str:
        out = re.escape(self.prefix + fmt)
        for name in ("k", "j", "L"):
            out = out.replace(re.escape("{" + name + "}"), r"(\d+)")
        return "^" + out + "$"

    def weight(self, k: int, j: int) -> str:
        return self.prefix + self.block_weight.format(k=k, j=j)

    def bias(self, k: int, j: int) -> str:
        return self.prefix + self.block_bias.format(k=k, j=j)

    def projection(self, k: int, num_layers: int) -> str:
        return self.prefix + self.proj.format(k=k, L=num_layers)

    def parse(self, name: str) -> tuple[str, int, int] | None:
        """``(kind, head, index)`` for a name of this layout, kind in weight|bias|proj; else None.

        For a projection the index is the number after the head (FasterDecoding's ``L``, or 0 where
        the layout has no such number).
        """
        for kind, pat in self._patterns:
            m = pat.match(name)
            if m:
                nums = [int(g) for g in m.groups()]
                return kind, nums[0], nums[1] if len(nums) > 1 else 0
        return None


FASTERDECODING = KeyNames("{k}.{j}.linear.weight", "{k}.{j}.linear.bias", "{k}.{L}.weight")
AXOLOTL = KeyNames("{k}.{j}.linear.weight", "{k}.{j}.linear.bias", "{k}.{L}.weight", prefix="medusa_head.")
VLLM = KeyNames("blocks.{k}.layers.{j}.weight", "blocks.{k}.layers.{j}.bias", "lm_heads.{k}.weight")
VLLM_LM_HEAD = "lm_head.weight"  # Medusa.lm_head when original_lm_head is set
VLLM_LM_HEAD_ALIAS = "lm_heads.0.weight"  # load_weights maps it to lm_head.weight under original_lm_head
VLLM_STRIPPED_PREFIX = "medusa_heads."  # load_weights: name.replace("medusa_heads.", "")
