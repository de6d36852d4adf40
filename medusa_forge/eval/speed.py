"""Per-topic speed of the Medusa model against its base, measured side by side in one session.

For every prompt and trial the two models answer the same greedy request back to back, in an order
that alternates from pair to pair (so neither always runs on the warmer machine), after a few
warm-up pairs that are not recorded. Per topic and overall, for each model:

* tokens/s: generated tokens / summed request wall time (request sent -> last token received);
* TTFT: request sent -> first streamed response (the prefill plus one step);
* latency percentiles p50/p90/p99 of the whole request, and TPOT = (latency - TTFT) / (tokens - 1),
  as vLLM's ``benchmarks/benchmark_serving.py`` (commit 0049e29c) defines them, ``np.percentile``;
* mean acceptance length: tokens per decoding step. From ``accepted_per_step`` when the server sends
  it (native engine: one entry per step after the prefill), else from tensorrtllm_backend's
  ``total_accepted_draft_tokens`` as tokens / (tokens - accepted drafts), since every iteration emits
  one token of its own plus the drafts it accepted;
* output identity: greedy Medusa must reproduce the base output token for token (text when the
  server returns no ids).

Finished pairs go into a resumable cache; the result is written only when every pair is done.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from medusa_forge.errors import ForgeError
from medusa_forge.eval.backends import Backend
from medusa_forge.eval.cache import ResultCache
from medusa_forge.prompts import Prompt
from medusa_forge.stats import percentiles

MODELS = ("base", "medusa")


@dataclass(frozen=True)
class SpeedConfig:
    max_tokens: int = 128
    trials: int = 3
    warmup: int = 2  # unrecorded (base, medusa) pairs before measuring
    max_prompt_chars: int = 2000  # keep the tail of longer prompts (they are source-file prefixes)
    stream: bool | None = None  # streaming gives a real TTFT; None: stream when both models can
    ignore_eos: bool = True  # every request generates max_tokens (vLLM's --ignore-eos), so lengths match
    medusa_temperature: float = 0.0  # > 0: typical acceptance (not exact; outputs are expected to differ)


def clip_prompt(text: str, max_chars: int) -> str:
    """The last ``max_chars`` characters, starting at a line boundary when one is in reach."""
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    tail = text[-max_chars:]
    cut = tail.find("\n")
    return tail[cut + 1 :] if 0 <= cut < len(tail) // 2 else tail


def prompts_digest(prompts: list[Prompt]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([p.topic, p.source, p.prompt]).encode())
    return h.hexdigest()[:16]


def measure(backend: Backend, prompt: str, cfg: SpeedConfig, count_tokens: Callable[[str], int] | None) -> dict:
    c = backend.complete(prompt, cfg.max_tokens, stream=cfg.stream, ignore_eos=cfg.ignore_eos)
    if c.output_tokens is not None:
        n = len(c.output_tokens)
    elif count_tokens is not None:
        n = count_tokens(c.text)
    else:
        raise ForgeError(f"model {backend.label} returns no output_tokens; pass --tokenizer DIR to count tokens")
    return {
        "tokens": n,
        "ttft_s": c.ttft_s,
        "total_s": c.total_s,
        "steps": len(c.accepted_per_step),
        "step_tokens": sum(c.accepted_per_step),
        "accepted_drafts": c.total_accepted_draft_tokens,
        "draft_tokens": c.total_draft_tokens,
        "ids": c.output_tokens,
        "text": c.text,
    }


def _same_output(a: dict, b: dict) -> tuple[bool, int | None]:
    """(identical, first differing position) on token ids when both have them, else on text."""
    x, y = (a["ids"], b["ids"]) if a["ids"] is not None and b["ids"] is not None else (a["text"], b["text"])
    if x == y:
        return True, None
    return False, next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))


def run_pairs(
    prompts: list[Prompt],
    base: Backend,
    medusa: Backend,
    cfg: SpeedConfig,
    cache: ResultCache,
    count_tokens: Callable[[str], int] | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """Measure every (trial, prompt) pair not yet cached; return all pairs by key ``t{trial}/p{index}``."""
    keys = [(t, i) for t in range(cfg.trials) for i in range(len(prompts))]
    todo = [(t, i) for t, i in keys if f"t{t}/p{i}" not in cache]
    by_name = {"base": base, "medusa": medusa}
    try:
        if todo:
            for w in range(cfg.warmup):
                for b in (base, medusa):
                    measure(b, prompts[w % len(prompts)].prompt, cfg, count_tokens)
        for t, i in tqdm(
            todo, desc="speed", unit="pair", initial=len(keys) - len(todo), total=len(keys), disable=not progress
        ):
            order = MODELS if (t + i) % 2 == 0 else MODELS[::-1]
            pair = {name: measure(by_name[name], prompts[i].prompt, cfg, count_tokens) for name in order}
            pair["order"] = list(order)
            cache.put(f"t{t}/p{i}", pair)
    except BaseException as e:
        cache.flush()
        if isinstance(e, ForgeError):
            raise ForgeError(
                f"{e} ({len(cache.results)} of {len(keys)} pairs kept in {cache.path}; "
                "rerun the same command to resume)"
            ) from None
        raise
    cache.flush()
    return {f"t{t}/p{i}": cache.get(f"t{t}/p{i}") for t, i in keys}


def _spread(values: list[float]) -> dict[str, float]:
    """mean, p50, p90 and p99, in ms, of one measure over the requests."""
    summary = percentiles(values)
    return {k: summary[k] for k in ("mean", "p50", "p90", "p99")}


def summarize(records: list[dict]) -> dict[str, Any]:
    """Figures for one model over a set of requests."""
    tokens = sum(r["tokens"] for r in records)
    seconds = sum(r["total_s"] for r in records)
    lat = [1e3 * r["total_s"] for r in records]
    ttft = [1e3 * r["ttft_s"] for r in records]
    tpot = [1e3 * (r["total_s"] - r["ttft_s"]) / (r["tokens"] - 1) for r in records if r["tokens"] > 1]
    steps = sum(r["steps"] for r in records)
    accepted = [r["accepted_drafts"] for r in records if r["accepted_drafts"] is not None]
    drafts = [r["draft_tokens"] for r in records if r["draft_tokens"] is not None]
    if steps:
        acceptance = sum(r["step_tokens"] for r in records) / steps
    elif accepted and len(accepted) == len(records) and tokens > sum(accepted):
        acceptance = tokens / (tokens - sum(accepted))
    else:
        acceptance = None
    return {
        "requests": len(records),
        "tokens": tokens,
        "seconds": round(seconds, 6),
        "tokens_per_s": round(tokens / seconds, 3) if seconds else 0.0,
        "ttft_ms": _spread(ttft),
        "latency_ms": _spread(lat),
        "tpot_ms": round(float(np.mean(tpot)), 3) if tpot else 0.0,
        "mean_acceptance_length": round(acceptance, 4) if acceptance is not None else None,
        "acceptance_rate": round(sum(accepted) / sum(drafts), 4) if drafts and sum(drafts) else None,
    }


def _group(pairs: list[tuple[Prompt, int, dict]]) -> dict[str, Any]:
    base = summarize([p["base"] for _, _, p in pairs])
    med = summarize([p["medusa"] for _, _, p in pairs])
    prompts: dict[int, bool] = {}
    for _, i, p in pairs:
        prompts[i] = prompts.get(i, True) and _same_output(p["base"], p["medusa"])[0]
    identical = sum(prompts.values())
    return {
        "prompts": len(prompts),
        "base": base,
        "medusa": med,
        "speedup": round(med["tokens_per_s"] / base["tokens_per_s"], 4) if base["tokens_per_s"] else 0.0,
        "identical": identical,
        "identical_fraction": round(identical / len(prompts), 4) if prompts else 0.0,
    }


def build_result(prompts: list[Prompt], pairs: dict[str, dict], cfg: SpeedConfig, meta: dict[str, Any]) -> dict:
    """The complete ``kind: speed`` document from all measured pairs."""
    rows = []  # (prompt, index, pair)
    requests, mismatches = [], []
    for key, pair in pairs.items():
        t, i = (int(x[1:]) for x in key.split("/"))
        p = prompts[i]
        rows.append((p, i, pair))
        same, first = _same_output(pair["base"], pair["medusa"])
        if not same:
            mismatches.append(
                {"topic": p.topic, "source": p.source, "prompt_index": i, "trial": t, "first_diff": first}
            )
        for name in MODELS:
            r = pair[name]
            requests.append(
                {
                    "topic": p.topic,
                    "prompt_index": i,
                    "trial": t,
                    "model": name,
                    "sent": pair["order"].index(name),
                    "tokens": r["tokens"],
                    "ttft_s": round(r["ttft_s"], 6),
                    "total_s": round(r["total_s"], 6),
                    "steps": r["steps"],
                }
            )
    topics = sorted({p.topic for p, _, _ in rows})
    per_topic = {topic: _group([r for r in rows if r[0].topic == topic]) for topic in topics}
    overall = _group(rows)
    overall["min_topic_speedup"] = min((v["speedup"] for v in per_topic.values()), default=0.0)
    overall["all_identical"] = not mismatches
    return {
        "kind": "speed",
        "complete": True,
        **meta,
        "config": asdict(cfg),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "per_topic": per_topic,
        "overall": overall,
        "mismatches": mismatches,
        "requests": requests,
    }
