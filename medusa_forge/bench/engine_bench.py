"""Per-topic tokens/s of our base decoding vs Medusa decoding on one engine, side by side.

Both modes run on the same engine object (same weights, same KV cache, same CUDA graphs
machinery), interleaved prompt by prompt after a warm-up, so clocks and caches treat them alike.
Greedy output identity between the two is checked on every prompt.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from tqdm import tqdm

from medusa_forge.engine.generation import GenerationConfig, GenerationResult
from medusa_forge.engine.medusa_engine import MedusaEngine
from medusa_forge.prompts import Prompt


@dataclass
class ModeStats:
    tokens: int = 0
    seconds: float = 0.0
    steps: int = 0

    def add(self, r: GenerationResult) -> None:
        self.tokens += len(r.tokens)
        self.seconds += r.total_s
        self.steps += r.steps

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass
class TopicStats:
    base: ModeStats = field(default_factory=ModeStats)
    medusa: ModeStats = field(default_factory=ModeStats)
    identical: int = 0
    prompts: int = 0
    accepted: list[float] = field(default_factory=list)

    def row(self) -> dict:
        b, m = self.base.tokens_per_s, self.medusa.tokens_per_s
        return {
            "prompts": self.prompts,
            "base_tokens_per_s": round(b, 2),
            "medusa_tokens_per_s": round(m, 2),
            "speedup": round(m / b, 3) if b else 0.0,
            "mean_accepted": round(statistics.mean(self.accepted), 3) if self.accepted else 0.0,
            "identical": f"{self.identical}/{self.prompts}",
        }


def truncate_prompt(engine: MedusaEngine, text: str, max_prompt_tokens: int) -> list[int]:
    """Keep the last ``max_prompt_tokens`` tokens (prompts are file prefixes; the tail matters)."""
    ids = engine.tokenizer.encode(text)
    if len(ids) <= max_prompt_tokens:
        return ids
    head = ids[:1] if engine.cfg.bos_token_id is not None and ids[0] == engine.cfg.bos_token_id else []
    return head + ids[len(ids) - max_prompt_tokens + len(head) :]


def bench_engine(
    engine: MedusaEngine,
    prompts: list[Prompt],
    max_new_tokens: int = 128,
    max_prompt_tokens: int = 512,
    warmup: int = 2,
    progress: bool = True,
) -> dict:
    """Run base and Medusa greedy decoding on every prompt; return per-topic and overall figures."""
    base_cfg = GenerationConfig(max_new_tokens=max_new_tokens, use_medusa=False, ignore_eos=True)
    med_cfg = GenerationConfig(max_new_tokens=max_new_tokens, use_medusa=True, ignore_eos=True)
    encoded = [truncate_prompt(engine, p.prompt, max_prompt_tokens) for p in prompts]
    for ids in encoded[:warmup]:
        engine.generate_ids(ids, base_cfg)
        engine.generate_ids(ids, med_cfg)
    topics: dict[str, TopicStats] = {}
    mismatches: list[dict] = []
    for p, ids in tqdm(list(zip(prompts, encoded)), desc="bench engine", disable=not progress):
        t = topics.setdefault(p.topic, TopicStats())
        base = engine.generate_ids(ids, base_cfg)
        med = engine.generate_ids(ids, med_cfg)
        t.base.add(base)
        t.medusa.add(med)
        t.prompts += 1
        t.accepted.append(med.mean_accepted)
        if base.tokens == med.tokens:
            t.identical += 1
        else:
            first = next((i for i, (a, b) in enumerate(zip(base.tokens, med.tokens)) if a != b), None)
            mismatches.append({"source": p.source, "topic": p.topic, "first_diff": first})
    total = TopicStats()
    for t in topics.values():
        for mode in ("base", "medusa"):
            agg, part = getattr(total, mode), getattr(t, mode)
            agg.tokens += part.tokens
            agg.seconds += part.seconds
            agg.steps += part.steps
        total.prompts += t.prompts
        total.identical += t.identical
        total.accepted += t.accepted
    overall = total.row()
    overall["mean_accepted"] = round(total.medusa.tokens / total.medusa.steps, 3) if total.medusa.steps else 0.0
    return {
        "tree": engine.tree.name if engine.tree else None,
        "tree_nodes": engine.tree.num_nodes if engine.tree else 0,
        "max_new_tokens": max_new_tokens,
        "overall": overall,
        "per_topic": {k: v.row() for k, v in sorted(topics.items())},
        "mismatches": mismatches,
        "base_step_ms": round(1e3 * total.base.seconds / max(1, total.base.steps + total.prompts), 4),
        "medusa_step_ms": round(1e3 * total.medusa.seconds / max(1, total.medusa.steps + total.prompts), 4),
    }


def topic_table(result: dict) -> str:
    """Markdown table of a bench_engine result."""
    lines = [
        "| topic | prompts | base tok/s | Medusa tok/s | speedup | tokens/step | identical |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = list(result["per_topic"].items()) + [("**all**", result["overall"])]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['prompts']} | {r['base_tokens_per_s']:.1f} | {r['medusa_tokens_per_s']:.1f} | "
            f"{r['speedup']:.2f}x | {r['mean_accepted']:.2f} | {r['identical']} |"
        )
    return "\n".join(lines)
