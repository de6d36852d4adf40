"""The speculation policy: nested trees by rank, the measured cost model, and the tree per load."""

from __future__ import annotations

import time

import pytest

from medusa_forge.engine.speculation import (
    CostModel,
    Ladder,
    Policy,
    parse_speculation,
    ranked_paths,
)
from medusa_forge.errors import ForgeError
from medusa_forge.tree import ChoiceTree


@pytest.mark.parametrize("name", ["small", "mc_sim_7b_63", "chain-4", "topk-10"])
def test_every_prefix_of_the_ranked_paths_is_a_valid_tree_led_by_the_top_1_chain(name):
    tree = ChoiceTree.parse(name)
    paths = ranked_paths(tree)
    assert sorted(paths) == sorted(tree.paths)
    for k in range(1, len(paths) + 1):
        ChoiceTree.from_paths([list(p) for p in paths[:k]])  # raises where a path lacks its parent
    chain = [p for p in paths if not any(p)]
    assert paths[: len(chain)] == chain


def test_the_ladder_runs_from_plain_decoding_to_the_whole_tree_and_maps_nodes_to_ranks():
    tree = ChoiceTree.parse("mc_sim_7b_63")
    ladder = Ladder.of(tree, "cpu")
    assert ladder.sizes == [0, 1, 2, 4, 8, 16, 32, 63]
    for k in ladder.sizes[1:]:
        b = ladder.buffers[k]
        assert b.tree_indices.shape[0] == k + 1
        ranks = ladder.path_ranks[k]
        assert ranks[0] == [] and all(len(r) == int(b.positions[j]) for j, r in enumerate(ranks))
        assert all(ladder.paths[r[-1] - 1] == ladder.paths[r[-1] - 1][: len(r)] for r in ranks[1:])


@pytest.mark.parametrize(
    "rows, slots, want",
    [
        (1, 1, 1.0 + 0.5),
        (3, 1, 2.0 + 0.5),
        (4, 2, 2.5 + 1.0),
        (12, 1, 2.5 + 8 * 0.5 + 0.5),
        (2, 4, 1.5 + 2.0),
    ],
)
def test_the_cost_model_interpolates_between_measured_rows_and_extrapolates_past_them(rows, slots, want):
    cost = CostModel(rows=[1, 2, 4], seconds=[1.0, 1.5, 2.5], per_slot=0.5)
    assert cost.time(rows, slots) == pytest.approx(want)


@pytest.mark.parametrize("size, depth", [(0, 0), (1, 1), (2, 2), (4, 4), (63, 4)])
def test_a_tree_pays_for_the_heads_as_deep_as_it_reads(size, depth):
    ladder = Ladder.of(ChoiceTree.parse("mc_sim_7b_63"), "cpu")
    policy = Policy("auto", ladder, CostModel(rows=[1, 512], seconds=[1.0, 1.0], per_slot=0.0, heads=5.0))
    assert ladder.depth(size) == depth
    assert policy.predict(size, tree_slots=2, other_rows=0, other_slots=0) == pytest.approx(1.0 + 5.0 * depth / 4)


def test_a_disturbed_measurement_never_makes_more_rows_look_cheaper():
    delays = {1: 0.03, 2: 0.004, 4: 0.008, 8: 0.012}  # the 1-row runs were slowed by a neighbour
    measured = CostModel.measure(lambda rows, slots: time.sleep(delays[rows]), max_rows=8, max_slots=1, reps=1)
    assert measured.rows == [1, 2, 4, 8]
    assert measured.seconds[0] == measured.seconds[1] < 0.02
    assert measured.seconds == sorted(measured.seconds)


def policy(spec: str, seconds: list[float], accept: float | None = None) -> Policy:
    ladder = Ladder.of(ChoiceTree.parse("mc_sim_7b_63"), "cpu")
    rows = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    p = Policy(spec, ladder, CostModel(rows=rows, seconds=seconds, per_slot=0.0))
    if accept is not None:  # every node accepted with this chance, after many observed steps
        p.acceptance.tried[1:] = 1e6
        p.acceptance.hits[1:] = accept * 1e6
    return p


FLAT = [1.0] * 12  # rows are free: the GEMMs read the weights once whatever the row count
LINEAR = [float(r) for r in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)]  # compute bound


@pytest.mark.parametrize(
    "spec, seconds, accept, slots, want",
    [
        ("auto", FLAT, 0.05, 1, 63),  # rows cost nothing: the whole tree
        ("auto", LINEAR, 0.05, 8, 0),  # every row costs and drafts rarely land: plain decoding
        ("auto", LINEAR, 0.9, 1, 0),  # all cost is per row: even likely drafts do not pay for theirs
        ("fixed", LINEAR, 0.0, 32, 63),
        ("off-above:4", FLAT, 0.5, 4, 63),
        ("off-above:4", FLAT, 0.5, 5, 0),
    ],
)
def test_the_policy_picks_the_tree_with_the_most_tokens_per_second(spec, seconds, accept, slots, want):
    assert policy(spec, seconds, accept).choose(slots, 0, 0) == want


def test_auto_shrinks_the_tree_as_slots_grow_on_a_cost_that_bends_upwards():
    seconds = [1.0, 1.0, 1.0, 1.0, 1.0, 1.1, 1.3, 2.0, 4.0, 8.0, 16.0, 32.0]  # flat, then compute bound
    p = policy("auto", seconds, accept=0.3)
    sizes = [p.choose(slots, 0, 0) for slots in (1, 2, 4, 8, 16, 32)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]


def test_accepted_steps_raise_a_nodes_estimate_and_rejected_ones_lower_it():
    p = policy("auto", FLAT)
    before = p.acceptance.probs()
    for _ in range(50):
        p.acceptance.record(2, [1])  # the top-1 draft accepted, its sibling or child not
    after = p.acceptance.probs()
    assert after[1] > before[1] and after[2] < before[2] and after[3] == before[3]


@pytest.mark.parametrize(
    "spec, want", [("auto", ("auto", 0)), ("fixed", ("fixed", 0)), ("off-above:8", ("off-above", 8))]
)
def test_speculation_specs_parse(spec, want):
    assert parse_speculation(spec) == want


@pytest.mark.parametrize("spec", ["", "on", "off-above:", "off-above:0", "off-above:x"])
def test_a_bad_speculation_spec_is_one_clear_error(spec):
    with pytest.raises(ForgeError, match="expected auto, fixed or off-above:N"):
        parse_speculation(spec)


@pytest.mark.parametrize("heads_s, want", [(0.0, 63), (1.0, 0)])
def test_the_heads_time_of_a_tree_step_counts_against_the_tree(heads_s, want):
    p = policy("auto", FLAT, accept=0.01)
    p.cost.heads = heads_s  # as long as the step itself: drafts accepted 1.6 times a step no longer pay
    assert p.choose(4, 0, 0) == want


def test_a_tree_that_barely_beats_plain_decoding_on_paper_is_not_taken():
    p = policy("auto", FLAT, accept=0.0035)  # the whole tree promises 1.22x plain decoding's rate
    assert p.choose(1, 0, 0) == 0
    p = policy("auto", FLAT, accept=0.0045)  # 1.28x
    assert p.choose(1, 0, 0) == 63


@pytest.mark.parametrize(
    "tree_ran, plain_ran, want",
    [
        (1.0, 1.0, 63),  # steps took what the model said: the whole tree still pays on free rows
        (3.0, 1.0, 0),  # tree steps ran 3x their prediction: plain decoding gives more tokens per second
        (3.0, 3.0, 63),  # everything ran 3x slower (a busy machine): the comparison is unchanged
        (1.0, 0.3, 0),  # plain steps ran far under their prediction: the tree no longer pays
    ],
)
def test_auto_falls_back_to_plain_decoding_when_served_tree_steps_run_slower_than_predicted(tree_ran, plain_ran, want):
    p = policy("auto", FLAT, accept=0.01)
    for _ in range(50):  # many served steps, each taking its mode's multiple of the prediction
        p.observe(True, 1.0, tree_ran)
        p.observe(False, 1.0, plain_ran)
    assert p.choose(1, 0, 0) == want


def test_one_preempted_step_does_not_turn_speculation_off():
    p = policy("auto", FLAT, accept=0.01)
    p.observe(True, 1.0, 1000.0)  # the scheduler was descheduled for a second
    assert p.choose(1, 0, 0) == 63
