"""One ``eval mmlu`` / ``eval speed`` run: data in, cached requests, a complete results file out.

The output file is written (atomically) only after every item is answered; until then the work
lives in ``<out>.partial.json`` and a rerun of the same command resumes from it.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from medusa_forge.atomic import atomic_write_json
from medusa_forge.errors import ForgeError
from medusa_forge.eval.backends import Backend
from medusa_forge.eval.cache import ResultCache, cache_path_for
from medusa_forge.eval.mmlu import make_items, run_items, score
from medusa_forge.eval.mmlu_data import load_split
from medusa_forge.eval.speed import SpeedConfig, build_result, clip_prompt, prompts_digest, run_pairs
from medusa_forge.prompts import Prompt


def _open_cache(out: Path, fingerprint: dict[str, Any]) -> ResultCache:
    cache = ResultCache(cache_path_for(out), fingerprint)
    if cache.stale:
        print(f"note: {cache.path} was made with other settings; starting afresh", file=sys.stderr)
    elif cache.resumed:
        print(f"note: resuming {cache.resumed} finished item(s) from {cache.path}", file=sys.stderr)
    return cache


def _strip_echo(prompt: str, text: str) -> str:
    """Servers configured to echo the input (exclude_input_in_output=false) prepend the prompt."""
    return text[len(prompt) :] if text.startswith(prompt) else text


def run_mmlu(
    backend: Backend,
    data: Path,
    split: str,
    subjects: list[str],
    shots: int,
    limit: int | None,
    concurrency: int,
    out: Path,
    count_tokens: Callable[[str], int] | None = None,
    max_prompt_tokens: int = 2048,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> dict:
    test = load_split(data, split, subjects or None)
    dev = load_split(data, "dev", list(test)) if shots > 0 else None
    items = make_items(test, dev, shots, limit, count_tokens, max_prompt_tokens)
    digest = hashlib.sha256(json.dumps([[i.id, i.prompt] for i in items]).encode()).hexdigest()[:16]
    fingerprint = {"kind": "mmlu", "model": backend.label, "backend": backend.kind, "items": digest}
    t0 = time.perf_counter()
    with _open_cache(out, fingerprint) as cache:
        records = run_items(items, lambda p: _strip_echo(p, backend.complete(p, 1).text), cache, concurrency, progress)
    doc = {
        "kind": "mmlu",
        "complete": True,
        "model": backend.label,
        "backend": backend.kind,
        **(meta or {}),
        "data": str(Path(data).resolve()),
        "split": split,
        "shots": shots,
        "limit": limit,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": round(time.perf_counter() - t0, 3),
        "resumed_items": cache.resumed,
        **score(records),
        "questions": records,
    }
    atomic_write_json(out, doc)
    cache.discard()
    return doc


def run_speed(
    prompts: list[Prompt],
    base: Backend,
    medusa: Backend,
    cfg: SpeedConfig,
    out: Path,
    prompts_file: str | Path | None = None,
    count_tokens: Callable[[str], int] | None = None,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> dict:
    if cfg.stream is None:
        cfg = replace(cfg, stream=base.can_stream and medusa.can_stream)
    elif cfg.stream and not (base.can_stream and medusa.can_stream):
        names = [b.label for b in (base, medusa) if not b.can_stream]
        raise ForgeError(
            f"model(s) {', '.join(names)} cannot stream (not decoupled); drop --stream, or serve them "
            "from a repository made with `triton-repo --decoupled`"
        )
    clipped = [Prompt(clip_prompt(p.prompt, cfg.max_prompt_chars), p.topic, p.source) for p in prompts]
    fingerprint = {
        "kind": "speed",
        "base": base.label,
        "medusa": medusa.label,
        "backend": medusa.kind,
        "prompts": prompts_digest(clipped),
        "config": [cfg.max_tokens, cfg.trials, cfg.stream, cfg.ignore_eos, cfg.medusa_temperature],
    }
    with _open_cache(out, fingerprint) as cache:
        pairs = run_pairs(clipped, base, medusa, cfg, cache, count_tokens, progress)
    info = {
        "backend": medusa.kind,
        "base_model": base.label,
        "medusa_model": medusa.label,
        **(meta or {}),
        "prompts_file": str(Path(prompts_file).resolve()) if prompts_file else None,
        "num_prompts": len(clipped),
        "resumed_pairs": cache.resumed,
    }
    if hasattr(medusa, "engine"):
        info["device"] = _device_name(medusa.engine.device)
    doc = build_result(clipped, pairs, cfg, info)
    atomic_write_json(out, doc)
    cache.discard()
    return doc


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"
