"""The engine manifest, ``medusa_forge.json``: one definition for every engine directory.

Both engine kinds carry it. A native engine directory is self-contained:

    medusa_forge.json      this manifest
    model/                 HF-layout base model (config.json, *.safetensors, tokenizer files)
    medusa/                FasterDecoding-layout heads (absent for a base-only engine)

A TensorRT-LLM engine directory holds ``trtllm-build``'s output (``config.json``, ``rank*.engine``)
beside the same manifest, with ``kind = "tensorrt_llm"``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medusa_forge.errors import ForgeError

if TYPE_CHECKING:
    from medusa_forge.tree.choice_tree import ChoiceTree

MANIFEST_NAME = "medusa_forge.json"
KINDS = ("native", "tensorrt_llm")


def read_tree(spec: str | ChoiceTree) -> ChoiceTree:
    """A tree spec (``ChoiceTree.parse``), or an engine directory or its manifest file: the tree that
    engine was built with (how an ``auto`` tree searched for a native engine reaches other engines)."""
    from medusa_forge.tree.choice_tree import ChoiceTree

    if isinstance(spec, ChoiceTree):
        return spec
    if not isinstance(spec, str) or spec.lstrip().startswith(("[", "{")):
        return ChoiceTree.parse(spec)  # a JSON tree, never a path (a long one is no valid file name)
    path = Path(spec)
    engine_dir = path.parent if path.name == MANIFEST_NAME and path.is_file() else path
    if not is_engine_dir(engine_dir):
        return ChoiceTree.parse(spec)
    tree = EngineManifest.load(engine_dir).choice_tree()
    if tree is None:
        raise ForgeError(f"{spec}: the engine has no Medusa heads, so no choice tree")
    return tree


@dataclass
class EngineManifest:
    kind: str  # "native" | "tensorrt_llm"
    dtype: str  # bfloat16 | float16 | float32 | fp8
    medusa_choices: list[list[int]] | None  # None: base-only engine
    max_seq_len: int = 2048
    max_batch_size: int = 1
    num_medusa_heads: int = 0
    sources: dict[str, str] = field(default_factory=dict)  # role -> path it was built from
    sha256: dict[str, str] = field(default_factory=dict)  # relative file -> digest of the inputs
    tool_versions: dict[str, str] = field(default_factory=dict)
    tree_stats: dict[str, Any] = field(default_factory=dict)  # expected / measured acceptance for auto trees
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, engine_dir: str | Path) -> None:
        Path(engine_dir, MANIFEST_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n")

    def choice_tree(self) -> ChoiceTree | None:
        """The engine's own choice tree (None for a base-only engine), named as it was at build
        time (``auto``, a preset, a file's stem) so reports say which tree an engine runs."""
        from medusa_forge.tree.choice_tree import ChoiceTree

        if not self.medusa_choices:
            return None
        return ChoiceTree.from_paths(self.medusa_choices, name=(self.extra or {}).get("tree_name") or "engine")

    @classmethod
    def load(cls, engine_dir: str | Path) -> EngineManifest:
        path = Path(engine_dir) / MANIFEST_NAME
        if not path.is_file():
            raise ForgeError(
                f"{engine_dir}: not an engine directory (no {MANIFEST_NAME}); run `medusa-forge build` first"
            )
        try:
            data = json.loads(path.read_text())
            manifest = cls(**data)
        except (json.JSONDecodeError, TypeError) as e:
            raise ForgeError(f"{path}: malformed engine manifest ({e})") from None
        if manifest.kind not in KINDS:
            raise ForgeError(f"{path}: unknown engine kind {manifest.kind!r} (expected one of {', '.join(KINDS)})")
        return manifest


def is_engine_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
