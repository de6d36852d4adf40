"""What the package ships for the demo: small Medusa heads for pycoder-26m and MMLU-format questions.

``medusa_forge/data/heads/pycoder-26m/`` holds heads the project trained on one GPU (the command is
in docs/train.md and in the directory's ``train_report.json``), in bf16, with ``tree.json``: the
choice tree the demo's engine uses on a CPU. ``medusa_forge/data/mmlu/`` holds questions written for
this project in the original MMLU release's CSV layout; they check the pipeline, not a model.
"""

from __future__ import annotations

from pathlib import Path

from medusa_forge.errors import ForgeError

DATA = Path(__file__).resolve().parent.parent / "data"
HEADS = DATA / "heads" / "pycoder-26m"
MMLU = DATA / "mmlu"
TREE_FILE = "tree.json"


def _existing(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise ForgeError(f"{path}: the package's {what} are missing (reinstall medusa-forge)")
    return path


def shipped_heads() -> Path:
    return _existing(HEADS, "demo heads")


def shipped_mmlu() -> Path:
    return _existing(MMLU, "MMLU-format demo questions")


def heads_tree(heads: Path) -> str | None:
    """The tree file shipped beside the heads (a JSON list of paths), if any."""
    tree = Path(heads) / TREE_FILE
    return str(tree) if tree.is_file() else None
