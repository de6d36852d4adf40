"""Spec for cache attention (medusa_forge.kernels.attention): matches the masked SDPA reference,
rows are batch invariant, and a tree step's rows are bit-identical to sequential decoding.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernels_fixtures import (  # noqa: E402
    DEVICE,
    DTYPES,
    KV,
    ROWS4,
    SMALL,
    D,
    H,
    S,
    close,
    force_triton,
    randn,
    triton_backend,  # noqa: F401 - the autouse fixture: the interpreter off CUDA
)

from medusa_forge import kernels as K  # noqa: E402
from medusa_forge.model.step_meta import StepMeta  # noqa: E402
from medusa_forge.tree import ChoiceTree, tree_buffers  # noqa: E402


def attention_inputs(T: int, dtype, seed: int = 0):
    return (
        randn(T, H, D, dtype=dtype, seed=seed),
        randn(KV, S, D, dtype=dtype, seed=seed + 1),
        randn(KV, S, D, dtype=dtype, seed=seed + 2),
    )


def fp32_reference(q, k, v, prefix_len, tree_mask):
    return K.cache_attention_ref(q.float(), k.float(), v.float(), prefix_len, tree_mask)


def small_tree_mask() -> torch.Tensor:
    return tree_buffers(ChoiceTree.parse("small")).attn_mask.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["decode", "tree", "prefill", "prefill_chunked", "tree_rows4", "prefill_rows4"])
def test_cache_attention_matches_reference(dtype, case):
    prefix, tree_mask, config = 45, None, ROWS4 if case.endswith("rows4") else SMALL
    case = case.removesuffix("_rows4")
    if case == "decode":
        T = 1
    elif case == "tree":
        tree_mask = small_tree_mask()
        T = tree_mask.shape[0]
    else:  # causal prefill from an empty cache, across several KV splits
        prefix, T = 0, 70
        if case == "prefill_chunked":  # scratch for 16 tokens: five launches, same per-row result
            config = K.AttentionConfig(split=32, block_m=16, block_n=16, max_scratch_bytes=KV * 4 * 2 * D * 4 * 16)
    q, k, v = attention_inputs(T, dtype)
    prefix_len = torch.tensor(prefix, device=DEVICE)
    out = K.cache_attention_triton(q, k, v, prefix_len, tree_mask, config)
    assert out.shape == (T, H, D) and out.dtype == dtype
    close(out, fp32_reference(q, k, v, prefix_len, tree_mask), dtype)
    if case == "prefill_chunked":
        assert torch.equal(out, K.cache_attention_triton(q, k, v, prefix_len, None, SMALL))


@pytest.mark.parametrize("config", [SMALL, ROWS4], ids=["combine_rows1", "combine_rows4"])
def test_cache_attention_tree_rows_are_batch_invariant(config):
    """Row i of a T=8 tree step equals row i of the same step cut to its first i+1 nodes, and the
    other rows' queries and the keys/values row i may not see do not change its bits."""
    tree_mask = small_tree_mask()
    T, prefix = tree_mask.shape[0], 60  # the tree straddles a split boundary (slot 64)
    q, k, v = attention_inputs(T, torch.bfloat16)
    prefix_len = torch.tensor(prefix, device=DEVICE)
    full = K.cache_attention_triton(q, k, v, prefix_len, tree_mask, config)
    for i in range(T):
        part = K.cache_attention_triton(q[: i + 1], k, v, prefix_len, tree_mask[: i + 1, : i + 1], config)
        assert torch.equal(part[i], full[i]), f"row {i} differs between T={i + 1} and T={T}"
    # T=1 decode of the root, with the causal (mask-free) kernel variant too.
    assert torch.equal(K.cache_attention_triton(q[:1], k, v, prefix_len, None, config)[0], full[0])
    i = 5
    hidden = ~tree_mask[i]  # new slots row i may not see
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[torch.arange(T, device=DEVICE) != i] = randn(T - 1, H, D, dtype=torch.bfloat16, seed=7)
    for cache in (k2, v2):
        cache[:, prefix : prefix + T][:, hidden] = randn(KV, int(hidden.sum()), D, dtype=torch.bfloat16, seed=8)
        cache[:, prefix + T :] = float("1e4")
    assert torch.equal(K.cache_attention_triton(q2, k2, v2, prefix_len, tree_mask, config)[i], full[i])


def test_cache_attention_rows_of_a_64_node_tree_match_smaller_launches():
    tree_mask = tree_buffers(ChoiceTree.parse("mc_sim_7b_63")).attn_mask.to(DEVICE)
    T = tree_mask.shape[0]
    q, k, v = attention_inputs(T, torch.bfloat16, seed=11)
    prefix_len = torch.tensor(40, device=DEVICE)
    full = K.cache_attention_triton(q, k, v, prefix_len, tree_mask, SMALL)
    close(full, fp32_reference(q, k, v, prefix_len, tree_mask), torch.bfloat16)
    for i in (0, 9, 40):
        part = K.cache_attention_triton(q[: i + 1], k, v, prefix_len, tree_mask[: i + 1, : i + 1], SMALL)
        assert torch.equal(part[i], full[i]), f"row {i} differs between T={i + 1} and T={T}"


def test_cache_attention_reads_prefix_len_from_the_tensor_at_launch():
    """prefix_len is device state (the engine's cur_len): updating it in place moves the window."""
    q, k, v = attention_inputs(1, torch.float32, seed=3)
    prefix_len = torch.tensor(10, device=DEVICE)
    for value in (10, 95, S - 1):  # the last one ends exactly at the cache end
        prefix_len.fill_(value)
        out = K.cache_attention_triton(q, k, v, prefix_len, None, SMALL)
        close(out, fp32_reference(q, k, v, prefix_len, None), torch.float32)


def test_default_attention_config_matches_reference():
    q, k, v = attention_inputs(3, torch.bfloat16, seed=4)
    prefix_len = torch.tensor(100, device=DEVICE)
    out = K.cache_attention_triton(q, k, v, prefix_len, None)
    close(out, fp32_reference(q, k, v, prefix_len, None), torch.bfloat16)


def test_attention_tiles_are_chosen_by_model_shape_only():
    """The Llama-3-8B shape (GQA group 4, head_dim 128) gets its measured tiles, others the defaults;
    T is not an input, so the plain and the tree step of one model launch the same kernels."""
    assert K.attention_config(4, 128).combine_rows == 4
    assert K.attention_config(2, 64) == K.DEFAULT_ATTENTION
    for (group, head_dim), config in K.ATTENTION_BY_SHAPE.items():
        assert config.block_m >= group and config.combine_rows & (config.combine_rows - 1) == 0


@pytest.mark.parametrize(
    "tree,prefix,config",
    [
        ("small", 29, SMALL),  # depth-3 paths cross the split boundary at slot 32
        # shallow nodes' sequences end in block [0, 16) of split 0, but the tail pass bounds its blocks
        # by the longest path (slot 18): they run block [16, 32) fully masked after visible keys, which
        # must leave their partials' bits as they are (alpha selected as 1, p = 0, a zero dot)
        ("small", 15, SMALL),
        # EARLY_V only moves a block's V load: the 7-node tree checks it, the costly 64-node tree runs once
        ("small", 29, K.AttentionConfig(split=32, block_m=16, block_n=16, early_v=True)),
        ("mc_sim_7b_63", 62, K.AttentionConfig(split=64, block_m=16, block_n=16)),
        ("small", 29, ROWS4),
    ],
)
def test_tree_rows_are_bit_identical_to_sequential_decoding(tree, prefix, config):
    """Node i of a tree step (depth d) gives the bits that plain decoding gives for the same token
    one step at a time: its ancestors committed at slots prefix..prefix+d-1, itself at prefix+d,
    a T=1 causal launch at prefix_len = prefix+d. This, with row-invariant GEMMs and norms, is what
    makes greedy Medusa output identical to greedy decoding on the GPU (not just close)."""
    b = tree_buffers(ChoiceTree.parse(tree))
    mask, anc = b.attn_mask.to(DEVICE), b.ancestors.to(DEVICE)
    T = mask.shape[0]
    q, k, v = attention_inputs(T, torch.bfloat16, seed=21)
    full = K.cache_attention_triton(q, k, v, torch.tensor(prefix, device=DEVICE), mask, config, tree_ancestors=anc)
    assert torch.equal(full, K.cache_attention_triton(q, k, v, torch.tensor(prefix, device=DEVICE), mask, config))
    for i in range(T):
        path = [int(a) for a in b.ancestors[i] if a >= 0]  # root .. i
        d = len(path) - 1
        k2, v2 = k.clone(), v.clone()
        for cache, src in ((k2, k), (v2, v)):
            cache[:, prefix : prefix + d + 1] = src[:, [prefix + j for j in path]]
            cache[:, prefix + d + 1 :] = randn(KV, S - prefix - d - 1, D, dtype=torch.bfloat16, seed=30 + i)
        seq = K.cache_attention_triton(q[i : i + 1], k2, v2, torch.tensor(prefix + d, device=DEVICE), None, config)
        assert torch.equal(seq[0], full[i]), f"node {i} (depth {d}) differs from sequential decoding"


def test_ancestor_table_lists_each_nodes_path_in_depth_order():
    b = tree_buffers(ChoiceTree.parse("mc_sim_7b_63"))
    table = K.ancestor_table(b.attn_mask)
    assert torch.equal(table[:, : b.ancestors.shape[1]], b.ancestors)
    assert (table[:, b.ancestors.shape[1] :] == -1).all()


def test_row_padded_wo_takes_the_attention_output_in_its_padded_input(monkeypatch):
    """With ``wo`` row padded (gemm_layout), the attention kernel writes into the first rows of
    wo's [PAD_ROWS, H*D] input (no pad fill and copy launches) and the forward keeps its bits:
    rows of garbage below them cannot reach the rows that are kept."""
    from medusa_forge.model.config import ModelConfig
    from medusa_forge.model.gemm_layout import PAD_ROWS, RowPaddedLinear
    from medusa_forge.model.llama import Transformer

    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )
    torch.manual_seed(0)
    model = Transformer(cfg).to(device=DEVICE, dtype=torch.float32)
    model.requires_grad_(False).setup_caches(1, 32)
    for layer in model.layers:
        layer.attn.wo.__class__ = RowPaddedLinear
    force_triton(monkeypatch)
    tokens = torch.tensor([[3, 17, 40, 9, 22]], device=DEVICE)
    pos = torch.arange(5, device=DEVICE)
    zero = torch.zeros((), dtype=torch.long, device=DEVICE)
    real_buffer, buffers = RowPaddedLinear.input_buffer, []

    def garbage_buffer(self, rows, like):
        buf = real_buffer(self, rows, like)
        buffers.append(buf.fill_(float("nan")))
        return buf

    with torch.no_grad():
        monkeypatch.setattr(RowPaddedLinear, "input_buffer", lambda self, rows, like: None)
        zero_padded = model(tokens, StepMeta(pos, pos, prefix_len=zero))  # F.pad with zeros, then the GEMM
        monkeypatch.setattr(RowPaddedLinear, "input_buffer", garbage_buffer)
        in_place = model(tokens, StepMeta(pos, pos, prefix_len=zero))
    assert len(buffers) == 2 and all(b.shape == (PAD_ROWS, 64) for b in buffers)
    assert torch.isnan(buffers[0][5:]).all()  # nothing wrote (or needed) the pad rows
    assert torch.equal(in_place, zero_padded)
