"""JSON input read one way everywhere: JSON Lines (prompts, training data, held-out sets) and config files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medusa_forge.errors import ForgeError


def read_jsonl(path: str | Path, what: str = "file") -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for every non-blank line; a missing file or a line that is not JSON
    is one ForgeError naming the file and the line (``what`` says which input it is)."""
    path = Path(path)
    if not path.is_file():
        raise ForgeError(f"{path}: {what} not found")
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise ForgeError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def read_json_object(path: Path, missing: str) -> dict:
    """A config.json-like file as a dict: ``missing`` completes the not-found error ("{path}: {missing}");
    a file that is not JSON, or not an object, is one ForgeError naming it."""
    if not path.is_file():
        raise ForgeError(f"{path}: {missing}")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ForgeError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ForgeError(f"{path}: expected a JSON object")
    return d
