"""Prompt files: JSONL with a ``prompt`` field (``topic`` optional), as in ../shared/data/code_prompts.jsonl."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medusa_forge.errors import ForgeError
from medusa_forge.jsonl import read_jsonl


@dataclass(frozen=True)
class Prompt:
    prompt: str
    topic: str = "all"
    source: str = ""


def read_prompts(path: str | Path, limit: int | None = None, per_topic: int | None = None) -> list[Prompt]:
    """Read a prompts JSONL; ``per_topic`` keeps the first N of each topic (for quick runs)."""
    path = Path(path)
    out: list[Prompt] = []
    counts: dict[str, int] = {}
    for n, obj in read_jsonl(path, "prompts file"):
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
            raise ForgeError(f"{path}:{n}: each line needs a non-empty string field 'prompt'")
        topic = str(obj.get("topic", "all"))
        if per_topic is not None and counts.get(topic, 0) >= per_topic:
            continue
        counts[topic] = counts.get(topic, 0) + 1
        out.append(Prompt(obj["prompt"], topic, str(obj.get("source", ""))))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ForgeError(f"{path}: no prompts found")
    return out
