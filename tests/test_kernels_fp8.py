"""Spec for the FP8 activation quantization (medusa_forge.kernels.fp8) and the norms' and SiLU*mul's
fused FP8 outputs: the same bytes and scales as the unfused ops, down to a whole fp8 forward.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernels_fixtures import (  # noqa: E402
    DEVICE,
    force_triton,
    randn,
    triton_backend,  # noqa: F401 - the autouse fixture: the interpreter off CUDA
)

from medusa_forge import kernels as K  # noqa: E402
from medusa_forge.model.step_meta import StepMeta  # noqa: E402


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
    model = Transformer(cfg).to(device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.requires_grad_(False).setup_caches(1, 32)
    scales = {name: 0.02 for name in fp8.linear_names(model)} if static else None
    assert fp8.swap_linears(model, "scaled_mm", scales)
    force_triton(monkeypatch)
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
