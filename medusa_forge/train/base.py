"""The frozen base model as training needs it: batched decoding (its full-sequence hidden states are
``model.forward.hidden_states``), on the one decoder through its static KV cache sized for the batch.

Batched decoding left-pads the prompts of a batch to one length, so every row shares positions and
cache slots and each step is one [B, 1] forward. A row's padding is masked out of every other
token's keys; RoPE scores depend only on position differences, so a prompt shifted right by its
padding attends exactly as it would unpadded (pad queries attend to themselves only, which keeps
their values finite).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from medusa_forge.errors import ForgeError
from medusa_forge.model.forward import ensure_caches
from medusa_forge.model.llama import Transformer
from medusa_forge.model.step_meta import StepMeta


def _pick(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def _generate_batch(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator | None,
    eos_ids: Sequence[int],
    pad_id: int,
) -> list[list[int]]:
    dev = model.lm_head.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    ensure_caches(model, B, P + max_new_tokens)
    S = model.max_seq_len
    tokens = torch.full((B, P), pad_id, dtype=torch.long)
    valid = torch.zeros(B, S, dtype=torch.bool)
    for b, p in enumerate(prompts):
        tokens[b, P - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        valid[b, P - len(p) : P] = True
    tokens, valid = tokens.to(dev), valid.to(dev)
    cols = torch.arange(S, device=dev)
    rows = torch.arange(P, device=dev)
    own = cols[None, :] == rows[:, None]
    mask = (cols[None, :] <= rows[:, None])[None] & (valid[:, None, :] | own[None])
    hidden = model(tokens, StepMeta(rows, rows, mask[:, None]))[:, -1]
    eos = torch.tensor(sorted(set(eos_ids)) or [-1], device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    out = []
    for step in range(max_new_tokens):
        nxt = _pick(model.logits(hidden), temperature, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out.append(nxt)
        done |= torch.isin(nxt, eos)
        if step == max_new_tokens - 1 or (step % 16 == 15 and bool(done.all())):  # sync rarely
            break
        pos = torch.full((1,), P + step, dtype=torch.long, device=dev)
        valid[:, P + step] = True
        step_mask = (valid & (cols <= P + step))[:, None, None, :]
        hidden = model(nxt[:, None], StepMeta(pos, pos, step_mask))[:, -1]
    gen = torch.stack(out, dim=1).tolist()
    eos_set = set(eos_ids)
    result = []
    for row in gen:
        cut = next((i + 1 for i, t in enumerate(row) if t in eos_set), len(row))
        result.append(row[:cut])
    return result


def batched_generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    batch_size: int,
    temperature: float = 0.0,
    seed: int = 0,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    progress: bool = True,
    desc: str = "generate",
    on_batch: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """New tokens for every prompt (up to and including the first EOS), greedy unless temperature > 0.

    Prompts are batched by length (least padding); results come back in the input order.
    """
    if any(len(p) == 0 for p in prompts):
        raise ForgeError("empty prompt: every prompt needs at least one token")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    dev = model.lm_head.weight.device
    generator = torch.Generator(device=dev).manual_seed(seed) if temperature > 0 else None
    results: list[list[int]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts), desc=desc, unit="seq", disable=not progress, dynamic_ncols=True)
    produced = 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        outs = _generate_batch(
            model, [prompts[i] for i in idx], max_new_tokens, temperature, generator, eos_ids, pad_id
        )
        for i, o in zip(idx, outs):
            results[i] = o
        produced += sum(len(o) for o in outs)
        bar.update(len(idx))
        bar.set_postfix(tokens=produced)
        if on_batch is not None:
            on_batch(len(idx))
    bar.close()
    return results
