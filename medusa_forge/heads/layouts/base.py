"""The base model as the layouts need it: its sizes, its lm_head, and its files (never its full weights)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from torch import Tensor

from medusa_forge.errors import ForgeError
from medusa_forge.model.checkpoint import checkpoint_files, read_tensor_headers
from medusa_forge.model.config import ModelConfig


@dataclass
class BaseModel:
    directory: Path
    config: ModelConfig
    files: list[Path]
    headers: dict[str, tuple[Path, tuple[int, ...]]]

    @classmethod
    def open(cls, directory: str | Path) -> BaseModel:
        directory = Path(directory)
        if not directory.is_dir():
            raise ForgeError(f"{directory}: base model directory not found")
        cfg = ModelConfig.from_dir(directory)
        files = checkpoint_files(directory)
        return cls(directory, cfg, files, read_tensor_headers(files))

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def lm_head(self) -> Tensor:
        """``lm_head.weight``, or the embedding when the two are tied (as load_hf_model does)."""
        name = "lm_head.weight" if "lm_head.weight" in self.headers else "model.embed_tokens.weight"
        if name not in self.headers:
            raise ForgeError(
                f"{self.directory}: neither lm_head.weight nor model.embed_tokens.weight in the checkpoint"
            )
        path, shape = self.headers[name]
        if shape != (self.vocab_size, self.hidden_size):
            raise ForgeError(
                f"{path}: tensor {name} has shape {list(shape)}, config.json implies "
                f"{[self.vocab_size, self.hidden_size]}"
            )
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)
