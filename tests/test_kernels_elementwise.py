"""Spec for the row-wise kernels (medusa_forge.kernels.norms, .mlp, .rope) and the dispatch rule.

Each kernel matches its PyTorch reference (the ops the decoder runs on CPU), and is row-wise batch
invariant: a token row's output bits do not depend on how many rows share the launch (T=1 decode,
T=8 / T=64 tree verification, prefill) nor on what the other rows hold. Skipped without triton.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernels_fixtures import (  # noqa: E402
    DEVICE,
    DTYPES,
    KV,
    D,
    H,
    S,
    close,
    randn,
    triton_backend,  # noqa: F401 - the autouse fixture: the interpreter off CUDA
)

from medusa_forge import kernels as K  # noqa: E402


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
        one, one_res = K.add_rms_norm_triton(x[i : i + 1], delta[i : i + 1], w, 1e-5)
        assert torch.equal(one[0], full[i]) and torch.equal(one_res[0], full_res[i])
        assert torch.equal(K.rms_norm_triton(x[i : i + 1], w, 1e-5)[0], plain[i])
        eight = torch.cat([other[:5], x[i : i + 1], other[5:7]])  # row i among 7 unrelated rows
        assert torch.equal(K.rms_norm_triton(eight, w, 1e-5)[5], plain[i])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_reference_and_is_row_invariant(dtype):
    gu = randn(2, 9, 2 * 1100, dtype=dtype, scale=3.0)
    out = K.silu_mul_triton(gu)
    close(out, K.silu_mul_ref(gu), dtype)
    assert out.shape == (2, 9, 1100)
    assert torch.equal(K.silu_mul_triton(gu[1, 4:5])[0], out[1, 4])


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


def test_cpu_tensors_and_autograd_take_the_reference_path():
    x = torch.randn(2, 8)
    assert not K.use_triton(x)
    if torch.cuda.is_available():
        xc = x.cuda()
        assert K.use_triton(xc)
        assert not K.use_triton(xc.requires_grad_())
        with K.reference_kernels():
            assert not K.use_triton(x.cuda())
