"""Partial results: a resumable cache beside each output, and the check that an output is complete.

An MMLU or speed run sends thousands of requests; a dropped connection at question 9,000 must not
cost the first 8,999. Every finished item goes into ``<out>.partial.json`` (rewritten atomically,
at most every ``flush_every_s`` seconds and on exit, including on errors). A rerun with the same
settings (the *fingerprint*) resumes from it; different settings start afresh. The cache file says
``"complete": false`` and the real output is written only once every item is done, so a partial
result can never be mistaken for a finished one: :func:`read_complete` refuses it.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from medusa_forge.atomic import atomic_write_json
from medusa_forge.errors import ForgeError

PARTIAL_KIND = "partial"


def cache_path_for(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial.json")


class ResultCache:
    """Finished items by key, persisted atomically; ``resumed`` counts what a previous run left."""

    def __init__(self, path: str | Path, fingerprint: dict[str, Any], flush_every_s: float = 2.0):
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # normalised as it will be stored
        self.flush_every_s = flush_every_s
        self.results: dict[str, Any] = {}
        self.stale = False  # a cache for other settings was found (and will be replaced)
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # snapshots reach the disk in the order they were taken
        self._dirty = False
        self._last_flush = 0.0
        self._load()
        self.resumed = len(self.results)

    def _load(self) -> None:
        if not self.path.is_file():
            return
        try:
            doc = json.loads(self.path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.stale = True
            return
        if not isinstance(doc, dict) or doc.get("kind") != PARTIAL_KIND or doc.get("fingerprint") != self.fingerprint:
            self.stale = True
            return
        self.results = dict(doc.get("results") or {})

    def __contains__(self, key: str) -> bool:
        return key in self.results

    def get(self, key: str) -> Any:
        return self.results[key]

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self.results[key] = value
            self._dirty = True
            due = time.monotonic() - self._last_flush >= self.flush_every_s
        if due:
            self.flush()

    def flush(self) -> None:
        with self._write_lock:
            with self._lock:
                if not self._dirty:
                    return
                doc = {
                    "kind": PARTIAL_KIND,
                    "complete": False,
                    "fingerprint": self.fingerprint,
                    "results": dict(self.results),
                }
                self._dirty = False
                self._last_flush = time.monotonic()
            atomic_write_json(self.path, doc)

    def discard(self) -> None:
        """Remove the cache once the complete output has been written."""
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> ResultCache:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()


def read_json(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ForgeError(f"{path}: {what} not found")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ForgeError(f"{path}: {what} is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ForgeError(f"{path}: {what} must be a JSON object")
    return doc


def read_complete(path: str | Path, kind: str | tuple[str, ...]) -> dict[str, Any]:
    """Load a results file of ``kind`` and insist that it is a finished run, never a partial cache."""
    kinds = (kind,) if isinstance(kind, str) else kind
    doc = read_json(path, f"{kinds[0]} results")
    if doc.get("kind") == PARTIAL_KIND or doc.get("complete") is not True:
        done = len(doc.get("results") or {})
        raise ForgeError(
            f"{path}: partial results ({done} items), not a finished run; rerun the same "
            "`medusa-forge eval` command to resume and complete it"
        )
    if doc.get("kind") not in kinds:
        raise ForgeError(f"{path}: expected {' or '.join(kinds)} results, found kind {doc.get('kind')!r}")
    return doc
