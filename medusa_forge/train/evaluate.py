"""How good are the heads: per-head top-1/top-5 accuracy and the engine's mean acceptance length.

Accuracy follows FasterDecoding/Medusa ``medusa/eval/heads_accuracy.py`` (@ 6294228): decode
greedily with the base model and check, at every position of the continuation, whether head k's
top-k contains the base's own token k+2 places ahead. That is exactly what greedy Medusa decoding
needs from the heads. :func:`prompt_continuations` builds those sequences from held-out prompts in
one batched pass; :func:`evaluate_heads` scores any examples (also the training data's held-out
split, where the targets are the data's tokens).

The acceptance length comes from the real native engine with a choice tree (mean tokens committed
per tree step, the root included), on the same prompts.
"""

from __future__ import annotations

import contextlib
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from medusa_forge.engine.generation import GenerationConfig
from medusa_forge.engine.medusa_engine import MedusaEngine
from medusa_forge.errors import ForgeError
from medusa_forge.heads.medusa_head import MedusaHeads
from medusa_forge.model.forward import hidden_states
from medusa_forge.model.llama import Transformer
from medusa_forge.model.tokenizer import Tokenizer
from medusa_forge.prompts import read_prompts
from medusa_forge.train.base import batched_generate
from medusa_forge.train.data import IGNORE_INDEX, Example, collate, make_example
from medusa_forge.train.loss import shifted_targets
from medusa_forge.tree.choice_tree import ChoiceTree

TOPK_REPORTED = (1, 5)


@dataclass
class HeadMetrics:
    loss: list[float]
    top1: list[float]
    top5: list[float]
    positions: list[int]

    def to_dict(self) -> dict:
        return {k: [round(x, 5) for x in v] if k != "positions" else v for k, v in asdict(self).items()}


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast when the base runs in bf16 (heads keep fp32 master weights)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate_heads(
    model: Transformer, heads: MedusaHeads, examples: list[Example], *, batch_size: int, pad_id: int, amp: bool
) -> HeadMetrics:
    """Mean CE, top-1 and top-5 accuracy of every head over the targets of ``examples``."""
    K = heads.res_weight.shape[0]
    dev = model.lm_head.weight.device
    loss_sum = torch.zeros(K, dtype=torch.float64, device=dev)
    hits = torch.zeros(len(TOPK_REPORTED), K, dtype=torch.long, device=dev)
    counts = torch.zeros(K, dtype=torch.long, device=dev)
    ordered = sorted(examples, key=lambda ex: len(ex.ids))
    was_training = heads.training
    heads.eval()
    for start in range(0, len(ordered), batch_size):
        tokens, labels = collate(ordered[start : start + batch_size], pad_id)
        tokens, labels = tokens.to(dev), labels.to(dev)
        hidden = hidden_states(model, tokens)
        targets = shifted_targets(labels, K)
        sel = (targets != IGNORE_INDEX).any(0)
        if not bool(sel.any()):
            continue
        t = targets[:, sel]
        with autocast(dev, amp):
            h = hidden[sel] if amp else hidden[sel].to(heads.res_weight.dtype)
            logits = heads(h, model.lm_head.weight).float()
        valid = t != IGNORE_INDEX
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), t, ignore_index=IGNORE_INDEX, reduction="none")
        loss_sum += ce.sum(1).double()
        counts += valid.sum(1)
        top = logits.topk(max(TOPK_REPORTED), dim=-1).indices
        for i, k in enumerate(TOPK_REPORTED):
            hits[i] += ((top[..., :k] == t[..., None]).any(-1) & valid).sum(1)
    heads.train(was_training)
    n = counts.clamp(min=1)
    return HeadMetrics((loss_sum / n).tolist(), (hits[0] / n).tolist(), (hits[1] / n).tolist(), counts.tolist())


def encode_eval_prompts(tok: Tokenizer, path: str | Path, max_tokens: int) -> list[list[int]]:
    return [tok.encode(p.prompt)[:max_tokens] for p in read_prompts(path)]


def prompt_continuations(
    model: Transformer,
    prompts: list[list[int]],
    *,
    new_tokens: int,
    batch_size: int,
    eos_ids: tuple[int, ...],
    pad_id: int,
    progress: bool,
) -> list[Example]:
    """prompt + greedy continuation of the base model, the continuation being the target."""
    outs = batched_generate(
        model,
        prompts,
        new_tokens,
        batch_size=batch_size,
        eos_ids=eos_ids,
        pad_id=pad_id,
        progress=progress,
        desc="eval continuations",
    )
    return [make_example(p + o, len(p)) for p, o in zip(prompts, outs)]


def acceptance_length(
    model: Transformer, heads: MedusaHeads, tok: Tokenizer, prompts: list[list[int]], *, tree: str, new_tokens: int
) -> dict:
    """Mean tokens per Medusa step of the native engine (greedy, so output = plain greedy decoding)."""
    choice_tree = ChoiceTree.parse(tree)
    # room for the tree beyond prompt + new tokens (the engine keeps a step ahead in flight): generous
    margin = 4 * choice_tree.num_nodes + 16
    limit = model.config.max_position_embeddings
    keep = limit - new_tokens - margin
    if keep < 1:
        raise ForgeError(
            f"--eval-new-tokens {new_tokens} plus the {choice_tree.name} tree do not fit the model's {limit} positions"
        )
    prompts = [p[:keep] for p in prompts]
    max_len = min(max(len(p) for p in prompts) + new_tokens + margin, limit)
    engine = MedusaEngine(model, heads, choice_tree, tok, max_seq_len=max_len)
    gcfg = GenerationConfig(max_new_tokens=new_tokens, use_medusa=True)
    per_prompt, steps, accepted = [], 0, 0
    for ids in prompts:
        r = engine.generate_ids(ids, gcfg)
        if r.steps:
            per_prompt.append(r.mean_accepted)
            steps += r.steps
            accepted += sum(r.accepted_per_step)
    return {
        "tree": choice_tree.name,
        "tree_nodes": choice_tree.num_nodes,
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "steps": steps,
        "mean_accepted": round(accepted / steps, 4) if steps else 0.0,
        "per_prompt_median": round(statistics.median(per_prompt), 4) if per_prompt else 0.0,
        "per_prompt_min": round(min(per_prompt), 4) if per_prompt else 0.0,
        "per_prompt_max": round(max(per_prompt), 4) if per_prompt else 0.0,
    }
