"""The choice tree (``medusa_choices``) and the buffers derived from it, computed once per tree.

A tree is a list of paths; a path lists one top-k rank per depth (0 = top-1). The root, the base
model's own next token, is implicit. A node at depth d holds the rank-``path[-1]`` token of head
d-1; all candidates at one depth come from the same head at the last accepted position.

Node order everywhere (cache slots, logits rows, TensorRT-LLM's ``medusa_choices``) is FasterDecoding's:
root first, then paths sorted by (length, path).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from medusa_forge.errors import ForgeError
from medusa_forge.tree.presets import presets

TOPK = 10  # candidates taken from each head, as in FasterDecoding (ranks must be < TOPK)
MAX_TREE_NODES = 64  # draft nodes, root excluded


@dataclass(frozen=True)
class ChoiceTree:
    paths: tuple[tuple[int, ...], ...]  # sorted by (len, path), root excluded
    name: str = "custom"

    @classmethod
    def from_paths(
        cls, paths: Sequence[Sequence[int]], name: str = "custom", max_nodes: int = MAX_TREE_NODES, topk: int = TOPK
    ) -> ChoiceTree:
        if not isinstance(paths, (list, tuple)) or not paths:
            raise ForgeError(f"choice tree {name!r}: expected a non-empty list of paths like [[0], [0, 0], [1]]")
        norm: list[tuple[int, ...]] = []
        for p in paths:
            if (
                not isinstance(p, (list, tuple))
                or not p
                or not all(isinstance(r, int) and not isinstance(r, bool) for r in p)
            ):
                raise ForgeError(f"choice tree {name!r}: path {p!r} is not a non-empty list of integers")
            if any(r < 0 or r >= topk for r in p):
                raise ForgeError(f"choice tree {name!r}: path {list(p)} has a rank outside 0..{topk - 1}")
            norm.append(tuple(p))
        if len(set(norm)) != len(norm):
            dup = next(p for p in norm if norm.count(p) > 1)
            raise ForgeError(f"choice tree {name!r}: path {list(dup)} appears twice")
        present = set(norm)
        for p in norm:
            if len(p) > 1 and p[:-1] not in present:
                raise ForgeError(
                    f"choice tree {name!r}: path {list(p)} has no parent {list(p[:-1])} (trees must be prefix-closed)"
                )
        if len(norm) > max_nodes:
            raise ForgeError(f"choice tree {name!r}: {len(norm)} nodes exceed the limit of {max_nodes} (root excluded)")
        return cls(tuple(sorted(norm, key=lambda p: (len(p), p))), name)

    @classmethod
    def parse(cls, spec: str | Sequence[Sequence[int]], **kw) -> ChoiceTree:
        """A preset name, a JSON list literal, or a JSON file holding a list of paths (or an object with
        ``medusa_choices`` or ``paths``). Not an engine manifest: ``manifest.read_tree`` reads those."""
        if not isinstance(spec, str):
            return cls.from_paths(spec, **kw)
        named = presets()
        if spec in named:
            return cls.from_paths(named[spec], name=spec, **kw)
        if spec.lstrip().startswith("["):
            try:
                return cls.from_paths(json.loads(spec), **kw)
            except json.JSONDecodeError as e:
                raise ForgeError(f"choice tree: not valid JSON ({e})") from None
        path = Path(spec)
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ForgeError(f"{path}: not valid JSON ({e})") from None
            if isinstance(data, dict):
                if "kind" in data:
                    raise ForgeError(
                        f"{path}: an engine manifest, not a choice tree; its tree is read with "
                        "EngineManifest.choice_tree (manifest.read_tree)"
                    )
                data = data.get("medusa_choices", data.get("paths"))
            return cls.from_paths(data, name=path.stem, **kw)
        raise ForgeError(f"choice tree {spec!r}: not a preset ({', '.join(sorted(named))}), JSON list, or file")

    @property
    def depth(self) -> int:
        return max(len(p) for p in self.paths)

    @property
    def num_nodes(self) -> int:
        """Tokens verified per step, root included."""
        return len(self.paths) + 1

    def check_heads(self, num_heads: int) -> None:
        if self.depth > num_heads:
            raise ForgeError(
                f"choice tree {self.name!r} has depth {self.depth} but the model has only "
                f"{num_heads} Medusa heads; use a tree of depth <= {num_heads}"
            )

    def to_list(self) -> list[list[int]]:
        return [list(p) for p in self.paths]

    def to_trtllm(self) -> str:
        """tensorrtllm_backend's curly-brace form: ``{0}, {0, 0}, {1}, ...``."""
        return ", ".join("{" + ", ".join(str(r) for r in p) + "}" for p in self.paths)


@dataclass(frozen=True)
class TreeBuffers:
    """Everything a verification step needs, derived from the tree once.

    attn_mask [N, N] bool: node i sees node j iff j is i or an ancestor (the root is everyone's).
    tree_indices [N]: index of each node's token in ``cat([root, topk(head0), topk(head1), ...])``.
    positions [N]: depth of each node (RoPE offset from the first tree slot).
    retrieve_indices [P, D+1]: node indices of each root-to-leaf path, padded with 0.
    retrieve_valid [P, D+1] bool: False at padding.
    parents [N]: parent node of each node (root: 0).
    ancestors [N, D+1] int32: node i's depth-k ancestor at column k (itself at its depth), then -1;
        the tree attention kernel reads each node's keys in this order, as sequential decoding would.
    """

    attn_mask: Tensor
    tree_indices: Tensor
    positions: Tensor
    retrieve_indices: Tensor
    retrieve_valid: Tensor
    parents: Tensor
    ancestors: Tensor

    def to(self, device) -> TreeBuffers:
        return TreeBuffers(
            *(
                t.to(device)
                for t in (
                    self.attn_mask,
                    self.tree_indices,
                    self.positions,
                    self.retrieve_indices,
                    self.retrieve_valid,
                    self.parents,
                    self.ancestors,
                )
            )
        )


def tree_buffers(tree: ChoiceTree, topk: int = TOPK, device="cpu") -> TreeBuffers:
    paths = list(tree.paths)
    index = {p: i + 1 for i, p in enumerate(paths)}  # node id; 0 is the root
    n = len(paths) + 1
    mask = torch.eye(n, dtype=torch.bool)
    mask[:, 0] = True
    tree_indices = torch.zeros(n, dtype=torch.long)
    positions = torch.zeros(n, dtype=torch.long)
    parents = torch.zeros(n, dtype=torch.long)
    for p, i in index.items():
        for d in range(1, len(p)):
            mask[i, index[p[:d]]] = True
        tree_indices[i] = 1 + topk * (len(p) - 1) + p[-1]
        positions[i] = len(p)
        parents[i] = index[p[:-1]] if len(p) > 1 else 0
    leaves = [p for p in paths if not any(q[:-1] == p for q in paths if len(q) == len(p) + 1)]
    leaves.sort(key=lambda p: (len(p), p), reverse=True)  # FasterDecoding's retrieve order
    width = tree.depth + 1
    retrieve = torch.zeros(len(leaves), width, dtype=torch.long)
    valid = torch.zeros(len(leaves), width, dtype=torch.bool)
    for r, leaf in enumerate(leaves):
        nodes = [0] + [index[leaf[:d]] for d in range(1, len(leaf) + 1)]
        retrieve[r, : len(nodes)] = torch.tensor(nodes)
        valid[r, : len(nodes)] = True
    ancestors = torch.full((n, width), -1, dtype=torch.int32)
    ancestors[0, 0] = 0
    for p, i in index.items():
        ancestors[i, : len(p) + 1] = torch.tensor([0] + [index[p[:d]] for d in range(1, len(p) + 1)])
    return TreeBuffers(mask, tree_indices, positions, retrieve, valid, parents, ancestors).to(device)
