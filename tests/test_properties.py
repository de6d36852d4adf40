"""Properties, checked on random inputs (hypothesis): choice-tree validation, tree buffers, and the
Triton request parser.

- Every prefix-closed tree of <= 64 draft nodes with ranks < TOPK is accepted in any path order;
  removing a proper prefix, asking for more depth than there are heads, or going past 64 nodes is
  refused with the message that names exactly that.
- For every valid tree the buffers are the tree: each node attends to its ancestors and itself,
  positions are depths, retrieve paths are the root-to-leaf chains (one per leaf), every index is in range.
- A well-formed request parses to the GenerationConfig its tensors say; anything else raises a
  one-line ForgeError, never another exception.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MODEL_DIR
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from medusa_forge.contract import INPUTS
from medusa_forge.engine.generation import GenerationConfig
from medusa_forge.errors import ForgeError
from medusa_forge.model.tokenizer import Tokenizer
from medusa_forge.serve.request import parse_request
from medusa_forge.tree.choice_tree import MAX_TREE_NODES, TOPK, ChoiceTree, tree_buffers

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_DEPTH = 6


# ---------------------------------------------------------------------------------------------- trees
@st.composite
def prefix_closed(draw, min_nodes: int = 1, max_nodes: int = MAX_TREE_NODES, max_depth: int = MAX_DEPTH):
    """A random prefix-closed tree as a list of paths, in a random order (each node a child of one drawn before)."""
    target = draw(st.integers(min_nodes, max_nodes))
    paths: list[tuple[int, ...]] = []
    present: set[tuple[int, ...]] = set()
    while len(paths) < target:
        parent = draw(st.sampled_from([()] + [p for p in paths if len(p) < max_depth]))
        free = [r for r in range(TOPK) if parent + (r,) not in present]
        if not free:
            continue
        child = parent + (draw(st.sampled_from(free)),)
        paths.append(child)
        present.add(child)
    order = draw(st.permutations(range(len(paths))))
    return [list(paths[i]) for i in order]


@SETTINGS
@given(prefix_closed())
def test_every_prefix_closed_tree_within_the_limits_is_accepted_in_any_order(paths):
    tree = ChoiceTree.from_paths(paths)
    assert set(tree.paths) == {tuple(p) for p in paths}
    assert list(tree.paths) == sorted(tree.paths, key=lambda p: (len(p), p))  # FasterDecoding's node order
    assert tree.num_nodes == len(paths) + 1 and tree.depth == max(map(len, paths))
    tree.check_heads(tree.depth)  # exactly as many heads as the depth is enough
    assert ChoiceTree.parse(repr(paths)).paths == tree.paths  # the JSON-list spelling is the same tree


@SETTINGS
@given(prefix_closed(max_nodes=40), st.data())
def test_a_tree_missing_a_prefix_is_refused_naming_the_orphan(paths, data):
    inner = sorted({tuple(p[:d]) for p in paths for d in range(1, len(p))})  # nodes that have descendants
    assume(inner)
    gone = data.draw(st.sampled_from(inner))
    rest = [p for p in paths if tuple(p) != gone]
    present = {tuple(p) for p in rest}
    orphan = next(p for p in rest if len(p) > 1 and tuple(p[:-1]) not in present)  # the first, in input order
    with pytest.raises(ForgeError) as exc:
        ChoiceTree.from_paths(rest)
    assert str(exc.value) == (
        f"choice tree 'custom': path {orphan} has no parent {orphan[:-1]} (trees must be prefix-closed)"
    )


@SETTINGS
@given(prefix_closed(), st.data())
def test_a_tree_deeper_than_the_heads_is_refused(paths, data):
    tree = ChoiceTree.from_paths(paths, name="t")
    assume(tree.depth > 1)
    heads = data.draw(st.integers(1, tree.depth - 1))
    with pytest.raises(ForgeError) as exc:
        tree.check_heads(heads)
    assert str(exc.value) == (
        f"choice tree 't' has depth {tree.depth} but the model has only {heads} Medusa heads; "
        f"use a tree of depth <= {heads}"
    )


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example, HealthCheck.data_too_large],
)
@given(prefix_closed(min_nodes=MAX_TREE_NODES + 1, max_nodes=3 * MAX_TREE_NODES))
def test_a_tree_past_64_draft_nodes_is_refused(paths):
    with pytest.raises(ForgeError) as exc:
        ChoiceTree.from_paths(paths)
    assert str(exc.value) == (
        f"choice tree 'custom': {len(paths)} nodes exceed the limit of {MAX_TREE_NODES} (root excluded)"
    )
    ChoiceTree.from_paths(paths, max_nodes=len(paths))  # the same tree is fine under a larger limit


@SETTINGS
@given(prefix_closed(), st.data())
def test_ranks_outside_topk_and_repeated_paths_are_refused(paths, data):
    p = data.draw(st.sampled_from(paths))
    with pytest.raises(ForgeError, match=r"appears twice$"):
        ChoiceTree.from_paths(paths + [p])
    bad = p[:-1] + [data.draw(st.one_of(st.integers(TOPK, 10**6), st.integers(-(10**6), -1)))]
    with pytest.raises(ForgeError) as exc:
        ChoiceTree.from_paths(paths + [bad])
    assert str(exc.value) == f"choice tree 'custom': path {bad} has a rank outside 0..{TOPK - 1}"


@SETTINGS
@given(prefix_closed())
def test_buffers_are_the_tree(paths):
    tree = ChoiceTree.from_paths(paths)
    b = tree_buffers(tree)
    nodes = [()] + list(tree.paths)  # node i is nodes[i]; 0 is the root
    index = {p: i for i, p in enumerate(nodes)}
    n, depth = len(nodes), tree.depth

    assert b.attn_mask.shape == (n, n) and b.attn_mask.dtype == torch_bool()
    for i, p in enumerate(nodes):
        ancestors_and_self = {index[p[:d]] for d in range(len(p) + 1)}
        assert {j for j in range(n) if b.attn_mask[i, j]} == ancestors_and_self
    assert b.positions.tolist() == [len(p) for p in nodes]
    assert b.parents.tolist() == [0] + [index[p[:-1]] for p in nodes[1:]]
    assert all(b.parents[i] < i for i in range(1, n))  # parents come first: one pass computes the tree

    candidates = 1 + TOPK * depth  # cat([root, topk(head_0), ..., topk(head_{depth-1})])
    ti = b.tree_indices.tolist()
    assert ti[0] == 0 and all(0 < t < candidates for t in ti[1:])
    assert ti[1:] == [1 + TOPK * (len(p) - 1) + p[-1] for p in nodes[1:]]

    leaves = [p for p in nodes[1:] if not any(q[:-1] == p for q in nodes[1:] if len(q) == len(p) + 1)]
    assert b.retrieve_indices.shape == b.retrieve_valid.shape == (len(leaves), depth + 1)
    assert int(b.retrieve_indices.min()) >= 0 and int(b.retrieve_indices.max()) < n
    got = []
    for row, valid in zip(b.retrieve_indices.tolist(), b.retrieve_valid.tolist()):
        k = sum(valid)
        assert valid == [True] * k + [False] * (depth + 1 - k)  # a prefix of the row, then padding
        assert row[k:] == [0] * (depth + 1 - k)
        leaf = nodes[row[k - 1]]
        assert row[:k] == [index[leaf[:d]] for d in range(len(leaf) + 1)]  # the root-to-leaf chain
        got.append(leaf)
    assert got == sorted(leaves, key=lambda p: (len(p), p), reverse=True)  # each leaf once, FasterDecoding's order


def torch_bool():
    import torch

    return torch.bool


# ---------------------------------------------------------------------------------------------- requests
TOKENIZER = Tokenizer(MODEL_DIR)  # stop / bad / bias words become ids as the backend's preprocessing makes them


def _b(values, dtype) -> np.ndarray:
    return np.array([values], dtype=dtype)


def _parse(inputs, use_medusa, max_batch_size, decoupled):
    return parse_request(inputs, use_medusa, max_batch_size=max_batch_size, decoupled=decoupled, tokenizer=TOKENIZER)


@st.composite
def well_formed(draw):
    """Contract tensors of one valid request (as Triton hands them to the model) and the config they mean."""
    prompt = draw(st.text(min_size=1, max_size=40))
    max_tokens = draw(st.integers(1, 2**31 - 1))
    decoupled = draw(st.booleans())
    inputs = {"text_input": _b([prompt.encode("utf-8")], np.object_), "max_tokens": _b([max_tokens], np.int32)}
    want = dict(
        max_new_tokens=max_tokens,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        stop_strings=(),
        seed=None,
        eos_token_ids=None,
        ignore_eos=False,
    )
    stream = False
    if draw(st.booleans()):
        stream = draw(st.booleans()) and decoupled
        inputs["stream"] = _b([stream], bool)
    if draw(st.booleans()):
        t = np.float32(draw(st.floats(0, 10, width=32)))
        inputs["temperature"], want["temperature"] = _b([t], np.float32), float(t)
    if draw(st.booleans()):
        k = draw(st.integers(0, 2**31 - 1))
        inputs["top_k"], want["top_k"] = _b([k], np.int32), k
    if draw(st.booleans()):
        p = np.float32(draw(st.floats(0, 1, width=32)))
        inputs["top_p"], want["top_p"] = _b([p], np.float32), float(p) or 1.0  # 0: off
    if (
        want["top_k"] == 1
        or (want["top_k"] == 0 and "top_p" not in inputs)
        or (want["top_k"] == 0 and inputs["top_p"][0, 0] == 0)
    ):  # TensorRT-LLM's greedy cases
        want["temperature"], want["top_k"] = 0.0, 0
    if draw(st.booleans()):
        seed = draw(st.integers(0, 2**64 - 1))
        inputs["random_seed"], want["seed"] = _b([seed], np.uint64), seed
    if draw(st.booleans()):
        end = draw(st.integers(-(2**31), 2**31 - 1))
        inputs["end_id"] = _b([end], np.int32)
        want["eos_token_ids"], want["ignore_eos"] = ((end,), False) if end >= 0 else (None, True)
    if draw(st.booleans()):
        stops = draw(st.lists(st.text(max_size=8), min_size=1, max_size=3))
        inputs["stop_words"] = _b([s.encode("utf-8") for s in stops], np.object_)
        ids = (tuple(TOKENIZER.hf.encode(s, add_special_tokens=False)) for s in stops if s)
        want["stop_words"] = tuple(i for i in ids if i)
    if draw(st.booleans()):
        inputs["bad_words"] = _b([b""], np.object_)  # empty bad_words are allowed (and ignored)
    if draw(st.booleans()):
        inputs["pad_id"] = _b([draw(st.integers(0, 2**31 - 1))], np.int32)  # accepted, unused
    use_medusa = draw(st.booleans())
    return inputs, decoupled, prompt, stream, GenerationConfig(use_medusa=use_medusa, **want)


@SETTINGS
@given(well_formed())
def test_well_formed_requests_parse_to_the_config_their_tensors_say(case):
    inputs, decoupled, prompt, stream, want = case
    rows = _parse(inputs, want.use_medusa, max_batch_size=1, decoupled=decoupled)
    assert len(rows) == 1
    assert (rows[0].prompt, rows[0].stream, rows[0].gcfg) == (prompt, stream, want)


# Each mutation turns a well-formed request into a bad one and names the message it must get.
def _set(name, value):
    return lambda inputs: {**inputs, name: value}


MUTATIONS = {
    "missing text_input": (
        lambda i: {k: v for k, v in i.items() if k != "text_input"},
        "missing required input 'text_input'",
    ),
    "missing max_tokens": (
        lambda i: {k: v for k, v in i.items() if k != "max_tokens"},
        "missing required input 'max_tokens'",
    ),
    "unknown input": (_set("beam_widths", _b([2], np.int32)), "unknown input(s) beam_widths; this model takes "),
    "list instead of array": (_set("max_tokens", [[4]]), "input(s) max_tokens must be arrays with a batch dimension"),
    "empty prompt": (_set("text_input", _b([b""], np.object_)), "input 'text_input' is an empty prompt"),
    "no prompt cell": (_set("text_input", np.zeros((1, 0), np.object_)), "input 'text_input' is an empty prompt"),
    "0-d prompt": (_set("text_input", np.array(b"x", dtype=np.object_)), "input 'text_input' has shape []"),
    "prompt not UTF-8": (_set("text_input", _b([b"\xff\xfe"], np.object_)), "input 'text_input' is not valid UTF-8"),
    "prompt as a number": (_set("text_input", _b([3], np.int32)), "input 'text_input' must be a string (BYTES)"),
    "batch of 2": (
        _set("text_input", np.array([[b"a"], [b"b"]], np.object_)),
        "batch of 2 prompts exceeds max_batch_size 1",
    ),
    "max_tokens 0": (_set("max_tokens", _b([0], np.int32)), "input 'max_tokens' must be >= 1, got 0"),
    "max_tokens float": (
        _set("max_tokens", _b([4.0], np.float32)),
        "input 'max_tokens' must be an integer, got float32 4.0",
    ),
    "max_tokens NaN": (_set("max_tokens", _b([np.nan], np.float64)), "input 'max_tokens' must be an integer"),
    "max_tokens bytes": (
        _set("max_tokens", _b([b"4"], np.object_)),
        "input 'max_tokens' must be an integer, got bytes b'4'",
    ),
    "max_tokens None": (
        _set("max_tokens", _b([None], np.object_)),
        "input 'max_tokens' must be an integer, got NoneType None",
    ),
    "max_tokens empty": (_set("max_tokens", np.zeros((1, 0), np.int32)), "input 'max_tokens' is empty"),
    "max_tokens twice": (
        _set("max_tokens", np.array([[4, 8]], np.int32)),
        "input 'max_tokens' has shape [1, 2]; send one value per prompt (shape [1, 1])",
    ),
    "max_tokens other batch": (
        _set("max_tokens", np.array([[1], [2]], np.int32)),
        "input 'max_tokens' has shape [2, 1]; expected its first dimension to be the batch size 1",
    ),
    "temperature -1": (
        _set("temperature", _b([-1.0], np.float32)),
        "input 'temperature' must be a finite number >= 0, got -1.0",
    ),
    "temperature inf": (
        _set("temperature", _b([np.inf], np.float32)),
        "input 'temperature' must be a finite number >= 0, got inf",
    ),
    "temperature string": (_set("temperature", _b([b"0.5"], np.object_)), "input 'temperature' must be a number"),
    "temperature twice": (
        _set("temperature", _b([0.1, 0.2], np.float32)),
        "input 'temperature' must hold one value per request, got 2",
    ),
    "top_k -1": (_set("top_k", _b([-1], np.int32)), "input 'top_k' must be >= 0, got -1"),
    "top_k 2.5": (_set("top_k", _b([2.5], np.float32)), "input 'top_k' must be an integer"),
    "top_p 1.5": (_set("top_p", _b([1.5], np.float32)), "input 'top_p' must be in [0, 1] (0: off), got 1.5"),
    "top_p NaN": (_set("top_p", _b([np.nan], np.float32)), "input 'top_p' must be in [0, 1] (0: off), got nan"),
    "seed -1": (_set("random_seed", _b([-1], np.int64)), "input 'random_seed' must be in 0..2^64-1, got -1"),
    "stream string": (
        _set("stream", _b([b"false"], np.object_)),
        "input 'stream' must be a boolean, got bytes b'false'",
    ),
    "stream 2": (_set("stream", _b([2], np.int32)), "input 'stream' must be a boolean, got int32 2"),
    "stop word not UTF-8": (_set("stop_words", _b([b"\xc3"], np.object_)), "input 'stop_words' is not valid UTF-8"),
    "beam_width 4": (
        _set("beam_width", _b([4], np.int32)),
        "input 'beam_width' must be 1 (the native engine decodes a single beam), got 4",
    ),
    "beam_width float": (_set("beam_width", _b([1.0], np.float32)), "input 'beam_width' must be an integer"),
    "bias words without weights": (
        _set("embedding_bias_words", _b([b"x"], np.object_)),
        "input 'embedding_bias_words' needs 'embedding_bias_weights'",
    ),
    "bias lengths differ": (
        lambda i: {
            **i,
            "embedding_bias_words": _b([b"x", b"y"], np.object_),
            "embedding_bias_weights": _b([1.0], np.float32),
        },
        "inputs 'embedding_bias_words' (2 words) and 'embedding_bias_weights' (1 weights) must have",
    ),
    "repetition_penalty 0": (
        _set("repetition_penalty", _b([0.0], np.float32)),
        "input 'repetition_penalty' must be > 0",
    ),
    "presence_penalty inf": (
        _set("presence_penalty", _b([np.inf], np.float32)),
        "input 'presence_penalty' must be a finite number, got inf",
    ),
    "min_length -1": (_set("min_length", _b([-1], np.int32)), "input 'min_length' must be >= 0, got -1"),
    "return_log_probs 3": (_set("return_log_probs", _b([3], np.int32)), "input 'return_log_probs' must be a boolean"),
    "prompt table": (
        _set("prompt_embedding_table", np.zeros((1, 2, 4), np.float16)),
        "input 'prompt_embedding_table': prompt tuning (prompt_embedding_table / prompt_vocab_size) is not "
        "supported by the native engine",
    ),
    "decoder text": (
        _set("decoder_text_input", _b([b"x"], np.object_)),
        "input 'decoder_text_input' is for encoder-decoder",
    ),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=well_formed())
def test_each_malformed_request_gets_the_forge_error_naming_the_tensor(case, mutation):
    inputs, decoupled, *_ = case
    mutate, message = MUTATIONS[mutation]
    with pytest.raises(ForgeError) as exc:
        _parse(mutate(inputs), True, max_batch_size=1, decoupled=decoupled)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_streaming_on_a_model_that_is_not_decoupled_names_the_fix():
    inputs = {"text_input": _b([b"x"], np.object_), "max_tokens": _b([3], np.int32), "stream": _b([True], bool)}
    with pytest.raises(
        ForgeError,
        match=r"^stream=true needs a decoupled model; regenerate the repository with "
        r"`medusa-forge triton-repo --decoupled`$",
    ):
        _parse(inputs, True, max_batch_size=1, decoupled=False)


NAMES = [t.name for t in INPUTS] + ["beam_widths", ""]
ELEMENTS = st.one_of(
    st.binary(max_size=6),
    st.text(max_size=6),
    st.none(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)
ARRAYS = st.one_of(
    hnp.arrays(
        st.sampled_from([np.int32, np.int64, np.uint64, np.float32, np.float64, np.bool_]),
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3),
    ),
    hnp.arrays(np.object_, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3), elements=ELEMENTS),
    st.sampled_from([None, 3, b"x", [[b"x"]]]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.sampled_from(NAMES), ARRAYS, max_size=6) | well_formed().map(lambda c: c[0]),
    st.dictionaries(st.sampled_from(NAMES), ARRAYS, max_size=3),
    st.integers(0, 4),
    st.booleans(),
)
def test_any_input_either_parses_or_raises_a_one_line_forge_error(inputs, overrides, max_batch, decoupled):
    try:
        rows = _parse({**inputs, **overrides}, True, max_batch_size=max_batch, decoupled=decoupled)
    except ForgeError as e:
        assert str(e) and "\n" not in str(e)
        return
    for r in rows:  # what did parse is usable as is
        assert r.prompt and isinstance(r.prompt, str) and r.gcfg.max_new_tokens >= 1
        assert r.gcfg.temperature >= 0 and 0 < r.gcfg.top_p <= 1 and r.gcfg.top_k >= 0
        assert not r.stream or (decoupled and len(rows) == 1)
