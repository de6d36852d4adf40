"""Choice trees: parsing, validation and the buffers derived from them."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medusa_forge.errors import ForgeError
from medusa_forge.manifest import EngineManifest, read_tree
from medusa_forge.tree import ChoiceTree, tree_buffers
from medusa_forge.tree.choice_tree import MAX_TREE_NODES, TOPK


def test_worked_example_matches_fasterdecoding():
    b = tree_buffers(ChoiceTree.parse([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]))
    assert b.tree_indices.tolist() == [0, 1, 2, 11, 12, 11, 21]
    assert b.positions.tolist() == [0, 1, 1, 2, 2, 2, 3]
    # leaves in FasterDecoding's order (reverse of the (len, path) sort), padded
    assert b.retrieve_indices.tolist() == [[0, 1, 3, 6], [0, 2, 5, 0], [0, 1, 4, 0]]
    assert b.retrieve_valid.tolist() == [[True] * 4, [True, True, True, False], [True, True, True, False]]


def test_reference_tree_has_64_tokens_and_depth_4():
    tree = ChoiceTree.parse("mc_sim_7b_63")
    assert tree.num_nodes == 64 and tree.depth == 4
    assert tree.to_list()[:7] == [[0], [1], [2], [3], [4], [5], [6]]
    assert tree.to_trtllm().startswith("{0}, {1}, {2}")


def test_tree_from_json_file(tmp_path):
    f = tmp_path / "tree.json"
    f.write_text(json.dumps({"medusa_choices": [[0], [0, 0]]}))
    assert ChoiceTree.parse(str(f)).paths == ((0,), (0, 0))


@pytest.fixture
def auto_engine_dir(tmp_path):
    EngineManifest(
        kind="native",
        dtype="float32",
        medusa_choices=[[0], [1], [0, 0]],
        num_medusa_heads=2,
        extra={"tree_name": "auto"},
    ).save(tmp_path)
    return tmp_path


def test_parse_refuses_an_engine_manifest_and_read_tree_reads_it(auto_engine_dir):
    manifest = auto_engine_dir / "medusa_forge.json"
    with pytest.raises(ForgeError, match="an engine manifest, not a choice tree"):
        ChoiceTree.parse(str(manifest))
    for spec in (str(manifest), str(auto_engine_dir)):
        tree = read_tree(spec)
        assert tree.paths == ((0,), (1,), (0, 0)) and tree.name == "auto"
    assert read_tree("small") == ChoiceTree.parse("small")


@pytest.mark.parametrize(
    "paths, message",
    [
        ([[0, 0]], "has no parent [0]"),
        ([[0], [0]], "appears twice"),
        ([[0], [10]], "rank outside 0..9"),
        ([], "non-empty list of paths"),
        ([[0], "x"], "is not a non-empty list of integers"),
        ([[i] for i in range(10)] + [[i, j] for i in range(10) for j in range(6)], "exceed the limit of 64"),
    ],
)
def test_invalid_trees_are_refused(paths, message):
    with pytest.raises(ForgeError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        ChoiceTree.from_paths(paths)


def test_tree_deeper_than_heads_is_refused():
    with pytest.raises(ForgeError, match="depth 4 but the model has only 3 Medusa heads"):
        ChoiceTree.parse("mc_sim_7b_63").check_heads(3)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ForgeError, match="not a preset"):
        ChoiceTree.parse("mc_sim_13b")


@st.composite
def trees(draw):
    """Random prefix-closed trees: grow by adding children of existing nodes."""
    paths: list[tuple[int, ...]] = []
    for _ in range(draw(st.integers(1, MAX_TREE_NODES))):
        parent = draw(st.sampled_from([()] + paths)) if paths else ()
        if len(parent) >= 5:
            continue
        used = {p[-1] for p in paths if p[:-1] == parent and len(p) == len(parent) + 1}
        free = [r for r in range(TOPK) if r not in used]
        if free:
            paths.append(parent + (draw(st.sampled_from(free)),))
    return paths


@settings(max_examples=60, deadline=None)
@given(trees())
def test_buffers_are_consistent_for_every_valid_tree(paths):
    tree = ChoiceTree.from_paths(paths)
    b = tree_buffers(tree)
    n = tree.num_nodes
    assert b.attn_mask.shape == (n, n) and b.attn_mask.diagonal().all() and b.attn_mask[:, 0].all()
    sorted_paths = [()] + list(tree.paths)
    for i, p in enumerate(sorted_paths):
        # each node sees exactly itself and its ancestors
        ancestors = {sorted_paths.index(p[:d]) for d in range(len(p) + 1)}
        assert set(torch.nonzero(b.attn_mask[i]).flatten().tolist()) == ancestors
        assert b.positions[i].item() == len(p)
        if p:
            assert b.tree_indices[i].item() == 1 + TOPK * (len(p) - 1) + p[-1]
    # every leaf appears exactly once as a retrieve path, and each path is a chain of parents
    leaves = {p for p in tree.paths if not any(q[:-1] == p for q in tree.paths)}
    assert b.retrieve_indices.shape[0] == len(leaves)
    for row, valid in zip(b.retrieve_indices.tolist(), b.retrieve_valid.tolist()):
        nodes = [r for r, v in zip(row, valid) if v]
        assert nodes[0] == 0
        for parent, child in zip(nodes, nodes[1:]):
            assert b.parents[child].item() == parent
        assert sorted_paths[nodes[-1]] in leaves


def test_read_tree_takes_a_json_list_too_long_to_be_a_file_name():
    paths = [[i] for i in range(8)] + [[i, j] for i in range(4) for j in range(8)] + [[0, 0, k] for k in range(8)]
    spec = json.dumps(paths, indent=4)
    assert len(spec) > 255
    assert read_tree(spec) == ChoiceTree.parse(spec)
