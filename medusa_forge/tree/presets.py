"""Named choice trees.

``mc_sim_7b_63`` is FasterDecoding/Medusa's default tree for Vicuna-7B (medusa/model/medusa_choices.py,
commit 11af0aa5): 63 paths, 64 tokens with the root, the tree TensorRT-LLM's Medusa example and
tensorrtllm_backend configs use. Chains take the top-1 token of each head; ``chain-N`` is the
degenerate tree of depth N, ``topk-N`` the widest depth-1 tree.
"""

from __future__ import annotations

MC_SIM_7B_63: list[list[int]] = [
    [0],
    [0, 0],
    [1],
    [0, 1],
    [2],
    [0, 0, 0],
    [1, 0],
    [0, 2],
    [3],
    [0, 3],
    [4],
    [0, 4],
    [2, 0],
    [0, 5],
    [0, 0, 1],
    [5],
    [0, 6],
    [6],
    [0, 7],
    [0, 1, 0],
    [1, 1],
    [7],
    [0, 8],
    [0, 0, 2],
    [3, 0],
    [0, 9],
    [8],
    [9],
    [1, 0, 0],
    [0, 2, 0],
    [1, 2],
    [0, 0, 3],
    [4, 0],
    [2, 1],
    [0, 0, 4],
    [0, 0, 5],
    [0, 0, 0, 0],
    [0, 1, 1],
    [0, 0, 6],
    [0, 3, 0],
    [5, 0],
    [1, 3],
    [0, 0, 7],
    [0, 0, 8],
    [0, 0, 9],
    [6, 0],
    [0, 4, 0],
    [1, 4],
    [7, 0],
    [0, 1, 2],
    [2, 0, 0],
    [3, 1],
    [2, 2],
    [8, 0],
    [0, 5, 0],
    [1, 5],
    [1, 0, 1],
    [0, 2, 1],
    [9, 0],
    [0, 6, 0],
    [0, 0, 0, 1],
    [1, 6],
    [0, 7, 0],
]

# A small tree for CPU tests and small models: two branches at depth 1, three deep on the top-1.
SMALL_TREE: list[list[int]] = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 0, 0]]


def chain(depth: int) -> list[list[int]]:
    return [[0] * d for d in range(1, depth + 1)]


def presets() -> dict[str, list[list[int]]]:
    named = {"mc_sim_7b_63": MC_SIM_7B_63, "small": SMALL_TREE}
    named.update({f"chain-{d}": chain(d) for d in range(1, 9)})
    named.update({f"topk-{k}": [[i] for i in range(k)] for k in (2, 4, 10)})
    return named
