"""Spec for the Medusa step's device ops (medusa_forge.kernels.medusa_step): argmax / top-k, greedy
acceptance + commit, tree inputs, the KV move and the heads' residual blocks, each equal to the
PyTorch ops the CPU path runs.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernels_fixtures import (  # noqa: E402
    DEVICE,
    DTYPES,
    close,
    randn,
    triton_backend,  # noqa: F401 - the autouse fixture: the interpreter off CUDA
)

from medusa_forge import kernels as K  # noqa: E402
from medusa_forge.tree import ChoiceTree, tree_buffers  # noqa: E402


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
        return (
            torch.tensor(37, device=DEVICE),
            torch.zeros(W + 1, dtype=torch.long, device=DEVICE),
            torch.zeros(1, dtype=torch.long, device=DEVICE),
            torch.zeros(1, dtype=torch.long, device=DEVICE),
            torch.zeros(W, dtype=torch.long, device=DEVICE),
            torch.zeros(W, dtype=torch.long, device=DEVICE),
        )

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
    got = K.heads_resblocks_triton(
        hidden, torch.tensor([2], device=DEVICE), heads.res_weight.detach(), heads.res_bias.detach()
    )
    close(got, want, dtype)


def test_plain_commit_sets_root_step_out_and_length_in_one_launch():
    root, cur = torch.zeros(1, dtype=torch.long, device=DEVICE), torch.tensor(41, device=DEVICE)
    step_out = torch.full((7,), -1, dtype=torch.long, device=DEVICE)
    K._kernel("_plain_commit_kernel")[(1,)](torch.tensor([1234], device=DEVICE), root, step_out, cur, num_warps=1)
    assert root.tolist() == [1234] and step_out[:2].tolist() == [1, 1234] and int(cur) == 42
