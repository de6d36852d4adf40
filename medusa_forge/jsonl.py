"""JSON Lines input, read one way everywhere (prompts, training data, held-out sets)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

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
