"""Self-distillation prompts cut from the Python sources installed on this machine.

A code model's heads are best trained on what the base model writes after code it knows. The
interpreter's standard library and site-packages are such code (pycoder-26m was pretrained on
files like them), and they exist wherever training runs, with no download. The evaluation set must
stay unseen, so every file whose path matches a held-out ``source`` (e.g.
``torch/utils/data/datapipes/iter/filelister.py``) is skipped, and so is any file that begins
like a held-out prompt (the prompts are file beginnings), which also catches vendored copies.

Prompts are file prefixes (like the held-out prompts) or windows starting at a random line, cut at
line ends to a random length in [min_tokens, max_tokens] tokens.
"""

from __future__ import annotations

import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from medusa_forge.errors import ForgeError
from medusa_forge.jsonl import read_jsonl
from medusa_forge.model.tokenizer import Tokenizer

PREFIX_CHARS = 120  # a file that starts with a held-out prompt's first 120 characters is excluded
MIN_OVERLAP_CHARS = 60  # a training prompt this long that starts a held-out prompt is a copy of it
MIN_FILE_BYTES, MAX_FILE_BYTES = 200, 512_000
CHARS_PER_TOKEN = 3.0  # rough, only to pick how many lines to take before tokenizing


@dataclass
class HeldOut:
    """What must never be trained on: source paths and prompt beginnings of an evaluation file."""

    sources: frozenset[str] = frozenset()
    prefixes: frozenset[str] = frozenset()
    short_prompts: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()

    @classmethod
    def from_file(cls, path: str | Path | None) -> HeldOut:
        if path is None:
            return cls()
        path = Path(path)
        sources, prefixes, short, prompts = set(), set(), [], []
        for n, obj in read_jsonl(path, "held-out prompts file"):
            if isinstance(obj.get("source"), str) and obj["source"]:
                sources.add(obj["source"].replace("\\", "/").lstrip("/"))
            prompt = obj.get("prompt")
            if isinstance(prompt, str) and prompt:
                prompts.append(prompt)
                (prefixes.add(prompt[:PREFIX_CHARS]) if len(prompt) >= PREFIX_CHARS else short.append(prompt))
        return cls(frozenset(sources), frozenset(prefixes), tuple(short), tuple(prompts))

    def excludes_path(self, rel: str) -> bool:
        parts = rel.split("/")
        return any("/".join(parts[i:]) in self.sources for i in range(len(parts)))

    def excludes_text(self, text: str) -> bool:
        return text[:PREFIX_CHARS] in self.prefixes or any(text.startswith(p) for p in self.short_prompts)

    def overlaps(self, prompt: str) -> bool:
        """True when a training prompt begins with a held-out prompt, or is a sizable start of one."""
        if self.excludes_text(prompt):
            return True
        return len(prompt) >= MIN_OVERLAP_CHARS and any(p.startswith(prompt) for p in self.prompts)


def default_roots() -> list[Path]:
    """The standard library and site-packages of the running interpreter."""
    paths = sysconfig.get_paths()
    roots: list[Path] = []
    for key in ("stdlib", "purelib", "platlib"):
        p = Path(paths[key]).resolve() if paths.get(key) else None
        if p is not None and p.is_dir() and p not in roots:
            roots.append(p)
    return roots


def list_source_files(roots: list[Path], held_out: HeldOut) -> tuple[list[Path], int]:
    """Sorted candidate .py files under the roots, and how many were excluded by path."""
    found: dict[Path, None] = {}
    excluded = 0
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            # site-packages sits under stdlib: walk it only as its own root, so paths stay package-relative
            dirnames[:] = [d for d in dirnames if Path(dirpath, d).resolve() not in roots]
            for name in filenames:
                if not name.endswith(".py"):
                    continue
                path = Path(dirpath, name)
                rel = path.relative_to(root).as_posix()
                if held_out.excludes_path(rel):
                    excluded += 1
                    continue
                try:
                    size = path.stat().st_size
                except OSError:
                    continue
                if MIN_FILE_BYTES <= size <= MAX_FILE_BYTES:
                    found[path] = None
    return sorted(found), excluded


def _cut(lines: list[str], start: int, target_tokens: int) -> str:
    budget = target_tokens * CHARS_PER_TOKEN
    out, size = [], 0
    for line in lines[start:]:
        out.append(line)
        size += len(line)
        if size >= budget:
            break
    return "".join(out)


def source_prompts(
    n: int,
    tok: Tokenizer,
    held_out: HeldOut,
    *,
    roots: list[Path] | None = None,
    min_tokens: int = 32,
    max_tokens: int = 384,
    prefix_fraction: float = 0.7,
    seed: int = 0,
) -> tuple[list[list[int]], dict]:
    """``n`` prompts (token ids, BOS first) and a summary of where they came from."""
    roots = [Path(r).resolve() for r in (roots or default_roots())]
    for r in roots:
        if not r.is_dir():
            raise ForgeError(f"{r}: sources root is not a directory")
    files, excluded_paths = list_source_files(roots, held_out)
    if not files:
        raise ForgeError(f"no Python source files found under {', '.join(map(str, roots))}")
    rng = random.Random(seed)
    min_tokens = max(2, min(min_tokens, max_tokens))
    prompts: list[list[int]] = []
    excluded_text, used = 0, set()
    attempts = 0
    while len(prompts) < n and attempts < 4 * n + 100:
        attempts += 1
        path = files[rng.randrange(len(files))]
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if held_out.excludes_text(text):
            excluded_text += 1
            continue
        lines = text.splitlines(keepends=True)
        start = 0 if rng.random() < prefix_fraction else rng.randrange(len(lines))
        if (path, start) in used:
            continue
        snippet = _cut(lines, start, rng.randint(min_tokens, max_tokens))
        ids = tok.encode(snippet)[:max_tokens]
        if len(ids) < min_tokens:
            continue
        used.add((path, start))
        prompts.append(ids)
    if not prompts:
        raise ForgeError(f"could not cut any prompt of >= {min_tokens} tokens from {len(files)} source files")
    summary = {
        "roots": [str(r) for r in roots],
        "files": len(files),
        "excluded_by_path": excluded_paths,
        "excluded_by_content": excluded_text,
        "prompts": len(prompts),
        "files_used": len({p for p, _ in used}),
        "prompt_tokens": sum(map(len, prompts)),
    }
    return prompts, summary
