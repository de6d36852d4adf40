"""Self-distillation: the frozen base model writes the training targets itself.

Medusa-1 heads only have to predict what the base model will say next; when the fine-tuning data
is gone (or never matched the base), the cleanest targets are the base's own continuations
(Medusa paper, section 2.3.2; reference-formats.md "Self-distillation"). Greedy continuations teach
exactly what greedy Medusa decoding verifies; sampled ones (temperature > 0, several per prompt)
spread the heads over the base's distribution for typical-acceptance decoding.

Prompts are context (no loss), the continuation is the target, as the engine only ever drafts
tokens after a prompt.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from medusa_forge.errors import ForgeError
from medusa_forge.model.llama import Transformer
from medusa_forge.train.base import batched_generate
from medusa_forge.train.data import Example, make_example
from medusa_forge.train.source_prompts import HeldOut


@dataclass
class DistillStats:
    prompts: int
    samples_per_prompt: int
    temperature: float
    new_tokens: int
    generated_tokens: int
    eos_fraction: float
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"tokens_per_s": round(self.tokens_per_s, 1)}


def check_no_overlap(prompts: Sequence[str], held_out: HeldOut, source: str) -> None:
    """Refuse to train on the evaluation prompts."""
    hits = sum(held_out.overlaps(p) for p in prompts)
    if hits:
        raise ForgeError(
            f"{source}: {hits} prompt(s) overlap the held-out evaluation prompts; "
            "training on them would make the head-quality report meaningless"
        )


def distill(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    new_tokens: int,
    max_seq_len: int,
    samples_per_prompt: int = 1,
    temperature: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    progress: bool = True,
) -> tuple[list[Example], DistillStats]:
    """Prompt + base continuation examples (loss on the continuation), batched on the model's device."""
    keep = max_seq_len - new_tokens
    if keep < 1:
        raise ForgeError(
            f"--distill-new-tokens {new_tokens} leaves no room for a prompt in --max-seq-len {max_seq_len}"
        )
    cut = [list(p[:keep]) for p in prompts if len(p)]
    if not cut:
        raise ForgeError("self-distillation got no non-empty prompts")
    t0 = time.perf_counter()
    examples: list[Example] = []
    generated, eos_hits = 0, 0
    eos_set = set(eos_ids)
    for s in range(samples_per_prompt):
        outs = batched_generate(
            model,
            cut,
            new_tokens,
            batch_size=batch_size,
            temperature=temperature,
            seed=seed + s,
            eos_ids=eos_ids,
            pad_id=pad_id,
            progress=progress,
            desc=f"self-distill {s + 1}/{samples_per_prompt}",
        )
        for p, o in zip(cut, outs):
            generated += len(o)
            eos_hits += bool(o) and o[-1] in eos_set
            ex = make_example(p + o, len(p))
            if ex.num_targets > 0:
                examples.append(ex)
    seconds = time.perf_counter() - t0
    n = len(cut) * samples_per_prompt
    if not examples:
        raise ForgeError("self-distillation produced no usable continuation (every one ended at once)")
    return examples, DistillStats(
        len(cut), samples_per_prompt, temperature, new_tokens, generated, round(eos_hits / n, 4), round(seconds, 3)
    )
