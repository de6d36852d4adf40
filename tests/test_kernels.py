"""Spec for the decoder's Triton kernels (medusa_forge.engine.kernels).

Each kernel matches its PyTorch reference (the ops the decoder runs on CPU), and is row-wise batch
invariant: a token row's output bits do not depend on how many rows share the launch (T=1 decode,
T=8 / T=64 tree verification, prefill) nor on what the other rows hold. Without CUDA the kernels
run in Triton's CPU interpreter (TRITON_INTERPRET=1, jitted afresh for this module); on a GPU
machine the same tests run the compiled kernels. Skipped when triton is not installed.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from medusa_forge.engine import kernels as K  # noqa: E402
from medusa_forge.tree import ChoiceTree, tree_buffers  # noqa: E402
from medusa_forge.model.step_meta import StepMeta  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
# Small attention tiles so a 128-slot cache spans several splits and blocks (fixed for every T).
SMALL = K.AttentionConfig(split=32, block_m=16, block_n=16)
ROWS4 = K.AttentionConfig(split=32, block_m=16, block_n=16, combine_rows=4)  # combine tiles span 2 tokens here
H, KV, D, S = 4, 2, 32, 128  # 2 query heads per KV head (GQA)


@pytest.fixture(scope="module", autouse=True)
def triton_backend():
    """Compiled kernels on CUDA; otherwise Triton's interpreter, chosen when the kernels are jitted."""
    if DEVICE == "cuda":
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        mp.setattr(K, "_jitted", False)
        yield
    K._jitted = False  # whoever launches next re-jits in the mode then active


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(actual.float(), expected.float(), **tol)


# ---------------------------------------------------------------------------------- norms
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_reference(dtype):
    x, w = randn(6, 200, dtype=dtype), randn(200, dtype=dtype, seed=1, scale=0.2) + 1
    close(K.rms_norm_triton(x, w, 1e-5), K.rms_norm_ref(x, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_returns_exact_residual_and_reference_norm(dtype):
    x, delta = randn(2, 3, 200, dtype=dtype), randn(2, 3, 200, dtype=dtype, seed=2)
    w = randn(200, dtype=dtype, seed=1, scale=0.2) + 1
    normed, residual = K.add_rms_norm_triton(x, delta, w, 1e-6)
    ref_normed, ref_residual = K.add_rms_norm_ref(x, delta, w, 1e-6)
    assert residual.dtype == dtype and torch.equal(residual, ref_residual)
    close(normed, ref_normed, dtype)


def test_norm_rows_are_batch_invariant():
    x, delta = randn(64, 256, dtype=torch.bfloat16), randn(64, 256, dtype=torch.bfloat16, seed=3)
    w = randn(256, dtype=torch.bfloat16, seed=1)
    full, full_res = K.add_rms_norm_triton(x, delta, w, 1e-5)
    plain = K.rms_norm_triton(x, w, 1e-5)
    other = randn(8, 256, dtype=torch.bfloat16, seed=9)
    for i in (0, 17, 63):
        one, one_res = K.add_rms_norm_triton(x[i:i + 1], delta[i:i + 1], w, 1e-5)
        assert torch.equal(one[0], full[i]) and torch.equal(one_res[0], full_res[i])
        assert torch.equal(K.rms_norm_triton(x[i:i + 1], w, 1e-5)[0], plain[i])
        eight = torch.cat([other[:5], x[i:i + 1], other[5:7]])  # row i among 7 unrelated rows
        assert torch.equal(K.rms_norm_triton(eight, w, 1e-5)[5], plain[i])


# ---------------------------------------------------------------------------------- silu * up
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_reference_and_is_row_invariant(dtype):
    gu = randn(2, 9, 2 * 1100, dtype=dtype, scale=3.0)
    out = K.silu_mul_triton(gu)
    close(out, K.silu_mul_ref(gu), dtype)
    assert out.shape == (2, 9, 1100)
    assert torch.equal(K.silu_mul_triton(gu[1, 4:5])[0], out[1, 4])


# ---------------------------------------------------------------------------------- rope + cache
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_qkv_to_cache_matches_the_reference_bit_for_bit(dtype):
    B, T = 2, 5
    qkv = randn(B, T, (H + 2 * KV) * D, dtype=dtype)
    angles = randn(T, D // 2, seed=1, scale=3.0).float()
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    slots = torch.tensor([3, 9, 4, 10, 20], device=DEVICE)
    caches = [randn(B, KV, S, D, dtype=dtype, seed=s) for s in (5, 6)]
    ref_caches = [c.clone() for c in caches]
    q = K.rope_qkv_to_cache_triton(qkv, cos, sin, *caches, slots, H, KV, D)
    q_ref = K.rope_qkv_to_cache_ref(qkv, cos, sin, *ref_caches, slots, H, KV, D)
    assert q.shape == (B, T, H, D)
    if dtype == torch.float32 and DEVICE == "cuda":
        # The GPU compiler fuses fp32 x*cos + rot*sin into one FMA (no rounding point between the
        # product and the add), so fp32 is within an ulp of torch there; bf16 rounds explicitly.
        # Batch invariance, what exactness needs, is tested separately.
        for got, want in ((q, q_ref), (caches[0], ref_caches[0]), (caches[1], ref_caches[1])):
            torch.testing.assert_close(got, want, rtol=2e-7, atol=1e-6)
        return
    assert torch.equal(q, q_ref)
    assert torch.equal(caches[0], ref_caches[0]) and torch.equal(caches[1], ref_caches[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_reads_whole_tables_at_the_tokens_positions(dtype):
    """What the decoder passes: the [S, D] cos/sin tables and each token's position (the gather
    happens inside the launch) give the bits of per-token cos/sin rows."""
    B, T = 1, 4
    qkv = randn(B, T, (H + 2 * KV) * D, dtype=dtype, seed=2)
    angles = randn(S, D // 2, seed=3, scale=3.0).float()
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    positions = torch.tensor([40, 7, 41, 41], device=DEVICE)
    slots = torch.tensor([3, 9, 4, 10], device=DEVICE)
    caches = [randn(B, KV, S, D, dtype=dtype, seed=s) for s in (5, 6)]
    ref_caches = [c.clone() for c in caches]
    q = K.rope_qkv_to_cache_triton(qkv, cos, sin, *caches, slots, H, KV, D, positions)
    q_rows = K.rope_qkv_to_cache_triton(qkv, cos[positions], sin[positions], *ref_caches, slots, H, KV, D)
    assert torch.equal(q, q_rows) and torch.equal(caches[0], ref_caches[0])
    q_ref = K.rope_qkv_to_cache_ref(qkv, cos, sin, *[c.clone() for c in caches], slots, H, KV, D, positions)
    close(q, q_ref, dtype)


# ---------------------------------------------------------------------------------- cache attention
def attention_inputs(T: int, dtype, seed: int = 0):
    return (randn(T, H, D, dtype=dtype, seed=seed), randn(KV, S, D, dtype=dtype, seed=seed + 1),
            randn(KV, S, D, dtype=dtype, seed=seed + 2))


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
        cache[:, prefix:prefix + T][:, hidden] = randn(KV, int(hidden.sum()), D, dtype=torch.bfloat16, seed=8)
        cache[:, prefix + T:] = float("1e4")
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


# ---------------------------------------------------------------------------------- dispatch
def test_cpu_tensors_and_autograd_take_the_reference_path():
    x = torch.randn(2, 8)
    assert not K.use_triton(x)
    if torch.cuda.is_available():
        xc = x.cuda()
        assert K.use_triton(xc)
        assert not K.use_triton(xc.requires_grad_())
        with K.reference_kernels():
            assert not K.use_triton(x.cuda())


# ---------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("tree,prefix,config", [
    ("small", 29, SMALL),  # depth-3 paths cross the split boundary at slot 32
    # shallow nodes' sequences end in block [0, 16) of split 0, but the tail pass bounds its blocks
    # by the longest path (slot 18): they run block [16, 32) fully masked after visible keys, which
    # must leave their partials' bits as they are (alpha selected as 1, p = 0, a zero dot)
    ("small", 15, SMALL),
    ("mc_sim_7b_63", 62, K.AttentionConfig(split=64, block_m=16, block_n=16, early_v=True)),
    ("mc_sim_7b_63", 62, K.AttentionConfig(split=64, block_m=16, block_n=16)),
    ("small", 29, ROWS4),
])
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
            cache[:, prefix:prefix + d + 1] = src[:, [prefix + j for j in path]]
            cache[:, prefix + d + 1:] = randn(KV, S - prefix - d - 1, D, dtype=torch.bfloat16, seed=30 + i)
        seq = K.cache_attention_triton(q[i:i + 1], k2, v2, torch.tensor(prefix + d, device=DEVICE), None, config)
        assert torch.equal(seq[0], full[i]), f"node {i} (depth {d}) differs from sequential decoding"


def test_ancestor_table_lists_each_nodes_path_in_depth_order():
    b = tree_buffers(ChoiceTree.parse("mc_sim_7b_63"))
    table = K.ancestor_table(b.attn_mask)
    assert torch.equal(table[:, : b.ancestors.shape[1]], b.ancestors)
    assert (table[:, b.ancestors.shape[1]:] == -1).all()


# ---------------------------------------------------------------------------------- greedy acceptance
def test_row_argmax_takes_the_first_index_on_ties_like_torch():
    x = randn(5, 3000, seed=40)
    x[1, 7] = x[1, 2900] = 50.0  # a tie across blocks: the first wins
    x[2, 100] = x[2, 101] = 60.0  # a tie inside a block
    x[3] = 0.0
    assert torch.equal(K.row_argmax_triton(x), x.argmax(-1))


@pytest.mark.parametrize("tree", ["small", "mc_sim_7b_63"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fused_greedy_commit_equals_accept_then_commit(tree, seed):
    """The two-launch CUDA path writes exactly what greedy_accept + commit_path write."""
    from medusa_forge.engine.acceptance import commit_path, greedy_accept

    b = tree_buffers(ChoiceTree.parse(tree), device=DEVICE)
    N, V = b.attn_mask.shape[0], 64
    g = torch.Generator().manual_seed(seed)
    tree_tokens = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    logits = torch.randn(N, V, generator=g).to(DEVICE)
    # Make the base agree with some drafts: each node's argmax is, half the time, its first child's token.
    for i in range(N):
        kids = (b.parents == i).nonzero().flatten()
        kids = kids[kids != 0]
        if len(kids) and torch.rand(1, generator=g).item() < 0.7:
            logits[i, tree_tokens[kids[0]]] = 10.0
    W = b.retrieve_indices.shape[1]

    def state():
        return (torch.tensor(37, device=DEVICE), torch.zeros(W + 1, dtype=torch.long, device=DEVICE),
                torch.zeros(1, dtype=torch.long, device=DEVICE), torch.zeros(1, dtype=torch.long, device=DEVICE),
                torch.zeros(W, dtype=torch.long, device=DEVICE), torch.zeros(W, dtype=torch.long, device=DEVICE))

    want, got = state(), state()
    best, accepted = greedy_accept(logits, tree_tokens[b.retrieve_indices], b.retrieve_indices, b.retrieve_valid)
    commit_path(logits, tree_tokens, b.retrieve_indices, best, accepted, *want)
    K.greedy_commit_triton(logits, tree_tokens, b.retrieve_indices, b.retrieve_valid, *got)
    for name, w, o in zip(("cur_len", "step_out", "root", "last", "src", "dst"), want, got):
        assert torch.equal(w.reshape(-1), o.reshape(-1)), f"{name}: {o.tolist()} != {w.tolist()}"
    assert int(want[1][0]) - 1 == int(accepted)


@pytest.mark.parametrize("vocab", [100, 9000])
def test_topk_indices_match_torch_topk_and_argmax_handles_long_rows(vocab):
    """The heads' top-k (chunk top-k + merge) gives torch.topk's indices in its order; rows longer
    than two chunks (9000 > 2 x 4096) take the same two launches for the argmax."""
    x = randn(2, vocab, seed=41)
    assert torch.equal(K.topk_indices_triton(x, 10), torch.topk(x, 10).indices)
    assert torch.equal(K.row_argmax_triton(x), x.argmax(-1))
    xb = x.to(torch.bfloat16)  # bf16 logits straight from lm_head: the same argmax as their fp32 copy
    assert torch.equal(K.row_argmax_triton(xb), xb.float().argmax(-1))


def test_topk_and_long_row_argmax_take_the_lower_index_on_ties():
    x = torch.zeros(2, 9000, device=DEVICE)
    x[0, 5] = x[0, 7000] = 1.0  # equal maxima in different chunks
    assert K.topk_indices_triton(x, 3).tolist() == [[5, 7000, 0], [0, 1, 2]]
    assert K.row_argmax_triton(x).tolist() == [5, 0]


@pytest.mark.parametrize("tree", ["small", "mc_sim_7b_63"])
def test_tree_inputs_kernel_gathers_tokens_positions_and_slots(tree):
    b = tree_buffers(ChoiceTree.parse(tree), device=DEVICE)
    n = b.tree_indices.shape[0]
    root = torch.tensor([7], device=DEVICE)
    head_topk = torch.arange(5 * 10, device=DEVICE).view(5, 10)[: int(b.positions.max())] + 100
    cur = torch.tensor(33, device=DEVICE)
    tokens, positions, slots = K.tree_inputs_triton(root, head_topk, b.tree_indices, b.positions, cur)
    assert torch.equal(tokens, torch.cat([root, head_topk.flatten()])[b.tree_indices])
    assert torch.equal(positions, cur + b.positions)
    assert torch.equal(slots, cur + torch.arange(n, device=DEVICE))


@pytest.mark.parametrize("dynamic", [False, True])
def test_fp8_activation_quantization_is_bit_equal_to_the_torch_ops(dynamic):
    """FP8Linear's fused quantize launch gives the bytes of clamp(x / s, +-448).to(e4m3), s static or
    amax(|x|) * (1 / 448) per row, including signed zeros, subnormals and rounding up to a new exponent."""
    x = torch.cat([randn(3, 700, seed=50, scale=300.0), randn(3, 700, seed=51, scale=0.01)]).to(torch.bfloat16)
    x[0, :4] = torch.tensor([0.0, -0.0, 1e4, -1e4])
    scale = None if dynamic else torch.tensor(0.7, device=DEVICE)
    q, s = K.quantize_fp8_triton(x, scale)
    x32 = x.float()
    want_s = (x32.abs().amax(dim=-1, keepdim=True) * (1.0 / 448.0)).clamp_min(1e-12) if dynamic else scale
    want = (x32 / want_s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    assert torch.equal(s, want_s)
    assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))


def test_move_kv_is_a_gather_first_move_like_index_select_then_index_copy():
    """Accepted path entries move src -> dst in every cache row; a later source slot may be an
    earlier destination (node 3 lands at slot 1 while node 1's source is read) and padding entries
    (node 0) land past the committed length, exactly as the two PyTorch ops leave them."""
    kv = randn(2, 2, 1, 3, 12, 16, seed=60)
    cur = 4
    nodes = torch.tensor([0, 3, 5, 0, 0], device=DEVICE)  # root, depth-1 node 3, depth-2 node 5, padding
    src, dst = cur + nodes, cur + torch.arange(5, device=DEVICE)
    want = kv.clone()
    want.index_copy_(4, dst, want.index_select(4, src))
    K.move_kv_triton(kv, src, dst)
    assert torch.equal(kv, want)


def test_topk_writes_into_a_given_buffer():
    x = randn(3, 500, seed=61)
    out = torch.full((3, 10), -1, dtype=torch.long, device=DEVICE)
    assert K.topk_indices_triton(x, 10, out=out) is out
    assert torch.equal(out, torch.topk(x, 10).indices)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_medusa_residual_blocks_give_the_heads_features(dtype):
    """The engine's fused residual blocks (gather of one row by a device index, the last accepted
    node; GEMV, bias, SiLU, residual) give MedusaHeads' features: 3 heads x 2 layers."""
    from medusa_forge.heads.medusa_head import MedusaHeads, MedusaHeadsConfig

    heads = MedusaHeads(MedusaHeadsConfig(num_heads=3, num_layers=2, hidden_size=48, vocab_size=150))
    with torch.no_grad():
        heads.res_weight.copy_(randn(*heads.res_weight.shape, seed=70, scale=0.2))
        heads.res_bias.copy_(randn(*heads.res_bias.shape, seed=71, scale=0.2))
    heads = heads.to(device=DEVICE, dtype=dtype)
    hidden = randn(4, 48, dtype=dtype, seed=73)
    with torch.no_grad():
        want = heads.hidden(hidden[2:3])[:, 0]
    got = K.heads_resblocks_triton(hidden, torch.tensor([2], device=DEVICE), heads.res_weight.detach(),
                                   heads.res_bias.detach())
    close(got, want, dtype)


def test_plain_commit_sets_root_step_out_and_length_in_one_launch():
    root, cur = torch.zeros(1, dtype=torch.long, device=DEVICE), torch.tensor(41, device=DEVICE)
    step_out = torch.full((7,), -1, dtype=torch.long, device=DEVICE)
    K._kernel("_plain_commit_kernel")[(1,)](torch.tensor([1234], device=DEVICE), root, step_out, cur, num_warps=1)
    assert root.tolist() == [1234] and step_out[:2].tolist() == [1, 1234] and int(cur) == 42


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("with_delta", [False, True])
def test_norm_fused_fp8_quantization_is_the_unfused_norm_then_quantize(dynamic, with_delta):
    """The fp8 engine's norms write the next GEMM's e4m3 input directly: the same bytes, scales and
    residual as (add +) RMSNorm then FP8Linear's quantize launch."""
    x = randn(3, 700, dtype=torch.bfloat16, seed=80, scale=4.0)
    delta = randn(3, 700, dtype=torch.bfloat16, seed=81) if with_delta else None
    w = (1 + randn(700, seed=82, scale=0.3)).to(torch.bfloat16)
    scale = None if dynamic else torch.tensor(0.01, device=DEVICE)
    q, s, res = K.rms_norm_fp8_triton(x, w, 1e-5, scale, delta)
    if with_delta:
        h, want_res = K.add_rms_norm_triton(x, delta, w, 1e-5)
        assert torch.equal(res, want_res)
    else:
        h = K.rms_norm_triton(x, w, 1e-5)
        assert res is None
    want_q, want_s = K.quantize_fp8_triton(h, scale)
    assert torch.equal(s, want_s)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))


@pytest.mark.parametrize("static", [False, True])
def test_fp8_model_forward_with_norm_fused_quantization_keeps_its_bits(monkeypatch, static):
    """A whole fp8 forward (2 layers, every kernel on its Triton path) gives the same hidden states
    whether the norms and SiLU*mul hand their GEMMs e4m3 rows (FP8Linear.normed_input /
    activated_input) or bf16 rows that FP8Linear quantizes itself."""
    from medusa_forge.model import fp8_linear as fp8
    from medusa_forge.model.config import ModelConfig
    from medusa_forge.model.llama import Transformer

    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.requires_grad_(False).setup_caches(1, 32)
    scales = {name: 0.02 for name in fp8.linear_names(model)} if static else None
    assert fp8.swap_linears(model, "scaled_mm", scales)
    monkeypatch.setattr(K, "use_triton", lambda t: True)
    calls, fused_norm = [], K.rms_norm_fp8_triton
    monkeypatch.setattr(K, "rms_norm_fp8_triton", lambda *a, **kw: calls.append(1) or fused_norm(*a, **kw))
    silu_calls, fused_silu = [], K.silu_mul_fp8_triton
    monkeypatch.setattr(K, "silu_mul_fp8_triton", lambda *a, **kw: silu_calls.append(1) or fused_silu(*a, **kw))
    tokens = torch.tensor([[3, 17, 40, 9, 22]], device=DEVICE)
    pos = torch.arange(5, device=DEVICE)
    zero = torch.zeros((), dtype=torch.long, device=DEVICE)
    with torch.no_grad():
        fused = model(tokens, StepMeta(pos, pos, prefix_len=zero))
        monkeypatch.setattr(fp8.FP8Linear, "normed_input", lambda self, norm, x, delta: None)
        monkeypatch.setattr(fp8.FP8Linear, "activated_input", lambda self, gate_up: None)
        unfused = model(tokens, StepMeta(pos, pos, prefix_len=zero))
    assert len(calls) == 4  # both norms of both layers took the fused path in the first forward
    assert len(silu_calls) == 2  # and both layers' down projections
    assert torch.equal(fused, unfused)


@pytest.mark.parametrize("dynamic", [False, True])
def test_silu_mul_fused_fp8_quantization_is_silu_mul_then_quantize(dynamic):
    gate_up = randn(3, 2 * 1500, dtype=torch.bfloat16, seed=90, scale=3.0)  # 2 blocks when static
    scale = None if dynamic else torch.tensor(0.02, device=DEVICE)
    q, s = K.silu_mul_fp8_triton(gate_up, scale)
    want_q, want_s = K.quantize_fp8_triton(K.silu_mul_triton(gate_up), scale)
    assert torch.equal(s, want_s)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))


def test_row_padded_wo_takes_the_attention_output_in_its_padded_input(monkeypatch):
    """With ``wo`` row padded (gemm_layout), the attention kernel writes into the first rows of
    wo's [PAD_ROWS, H*D] input (no pad fill and copy launches) and the forward keeps its bits:
    rows of garbage below them cannot reach the rows that are kept."""
    from medusa_forge.model.config import ModelConfig
    from medusa_forge.model.gemm_layout import PAD_ROWS, RowPaddedLinear
    from medusa_forge.model.llama import Transformer

    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device=DEVICE, dtype=torch.float32)
    model.requires_grad_(False).setup_caches(1, 32)
    for layer in model.layers:
        layer.attn.wo.__class__ = RowPaddedLinear
    monkeypatch.setattr(K, "use_triton", lambda t: True)
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
