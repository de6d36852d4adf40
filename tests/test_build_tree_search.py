"""The `auto` choice tree's arithmetic: path-conditional acceptance, greedy growth, size choice.

Pure functions on hand-made rank vectors (row t: rank of the true token in head d's top-10, -1 if
absent), so every figure here can be checked by hand. The search itself runs on pycoder-26m in
test_build_native.py (the `auto` engine fixture).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medusa_forge.build.tree_search import Calibration, choose_size, tree_from_nodes
from medusa_forge.tree.choice_tree import ChoiceTree


def calibration(rows: list[list[int]]) -> Calibration:
    return Calibration(torch.tensor(rows), prompts=1)


def test_acceptance_is_conditional_on_the_path_not_a_product_of_marginals():
    # Head 1 is right at rank 1 exactly when head 0 was right at rank 0, and vice versa.
    cal = calibration([[0, 1], [0, 1], [1, 0], [1, 0]])
    counts = cal.path_counts()
    assert counts[(0,)] == counts[(1,)] == 2
    assert counts[(0, 1)] == counts[(1, 0)] == 2
    # Marginals would give (0, 0) probability 0.5 * 0.5; it is never accepted.
    assert counts[(0, 0)] == 0 and counts[(1, 1)] == 0
    assert cal.expected_tokens_per_step(ChoiceTree.from_paths([[0], [0, 0]])) == pytest.approx(1.5)
    assert cal.expected_tokens_per_step(ChoiceTree.from_paths([[0], [0, 1]])) == pytest.approx(2.0)


def test_a_miss_stops_the_path_even_if_deeper_heads_were_right():
    cal = calibration([[-1, 0, 0], [0, -1, 0], [0, 0, 0]])
    counts = cal.path_counts()
    assert counts == {(0,): 2, (0, 0): 1, (0, 0, 0): 1}
    # E[tokens/step] = 1 + P([0]) + P([0,0]) + P([0,0,0]) = 1 + 2/3 + 1/3 + 1/3
    assert cal.expected_tokens_per_step(ChoiceTree.parse("chain-3")) == pytest.approx(1 + 4 / 3)


def test_growth_order_ranks_by_count_and_respects_the_depth_limit():
    cal = calibration([[0, 0, 0]] * 5 + [[1, 0, -1]] * 3 + [[2, -1, -1]])
    nodes = cal.ranked_nodes(max_depth=2)
    assert nodes == [((0,), 5), ((0, 0), 5), ((1,), 3), ((1, 0), 3), ((2,), 1)]
    assert tree_from_nodes(nodes, 3).paths == ((0,), (1,), (0, 0))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(-1, 3), min_size=3, max_size=3), min_size=1, max_size=40))
def test_every_prefix_of_the_growth_order_is_a_valid_tree_with_the_counted_expectation(rows):
    cal = calibration(rows)
    nodes = cal.ranked_nodes(max_depth=3)
    expected = 1.0 + np.cumsum([c for _, c in nodes]) / cal.positions
    for n in range(1, len(nodes) + 1):
        tree = tree_from_nodes(nodes, n)  # raises unless prefix-closed
        assert len(tree.paths) == n
        assert cal.expected_tokens_per_step(tree) == pytest.approx(expected[n - 1])


def test_size_choice_maximises_expected_tokens_per_second():
    expected = np.array([1.5, 1.8, 2.0, 2.1])
    # Flat step time: every extra node is free, the largest tree wins.
    n, _, tps = choose_size(expected, [1, 4], [10.0, 10.0])
    assert n == 4 and tps[3] == pytest.approx(210.0)
    # Steep step time: 1 node at 10 ms (150 tok/s) beats 4 nodes at 20 ms (105 tok/s).
    n, _, tps = choose_size(expected, [1, 4], [10.0, 20.0])
    assert n == 1 and tps[0] == pytest.approx(150.0)
    # Sizes between the timed ones are interpolated (12, 14 ms): the optimum can lie inside.
    n, _, tps = choose_size(np.array([1.5, 2.0, 2.1, 2.15]), [1, 4], [10.0, 16.0])
    assert n == 2 and tps.round(1).tolist() == [150.0, 166.7, 150.0, 134.4]


def test_timer_noise_never_makes_a_bigger_tree_look_faster():
    n, clipped, _ = choose_size(np.array([1.2, 1.3, 1.35, 1.4]), [1, 2, 4], [10.0, 9.0, 11.0])
    assert clipped.tolist() == [10.0, 10.0, 11.0]
    assert n == 2  # 1.3 tokens per 10 ms: the 9 ms reading is not believed
