"""FP8 on a Qwen2-style model: the q/k/v projections carry biases, which stay in the compute dtype and are added
after the scaled GEMM (TensorRT-LLM's FP8 linear adds its bias to the dequantized output the same way).

The Qwen2 model is made here: transformers' Qwen2ForCausalLM with pycoder-26m's trained weights and random q/k/v
biases (std 0.05), so its next-token distributions are as peaked as a trained model's (a random tiny model's are
nearly flat, and any rounding flips its argmax). It is built as a native fp8 engine (CPU emulation) and converted
to a TensorRT-LLM 1.2 FP8 checkpoint, each judged as the existing FP8 tests judge pycoder-26m: teacher-forced greedy
agreement with the high-precision model (test_build_native: native fp8 vs fp32, 24 prompts x 64 tokens;
test_convert_fp8: static-scale GEMMs, >= 0.95)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_heads

from medusa_forge.build.compare import compare_fp8
from medusa_forge.cli import main
from medusa_forge.convert.trtllm_checkpoint import ConvertOptions, convert_trtllm
from medusa_forge.convert.trtllm_reader import load_trtllm_checkpoint
from medusa_forge.engine.generation import GenerationConfig
from medusa_forge.engine.load import load_engine
from medusa_forge.model.forward import full_pass
from medusa_forge.model.fp8_linear import FP8Linear
from medusa_forge.prompts import read_prompts

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = "[[0], [1], [0, 0], [0, 0, 0]]"


def save_qwen2(model_dir: Path, out: Path, bias_std: float = 0.05) -> Path:
    from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    c = json.loads((model_dir / "config.json").read_text())
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id",
            "tie_word_embeddings")  # fmt: skip
    model = Qwen2ForCausalLM(
        Qwen2Config(**{k: c[k] for k in keys}, rope_parameters=c["rope_parameters"], use_sliding_window=False)
    )
    missing, unexpected = model.load_state_dict(
        LlamaForCausalLM.from_pretrained(model_dir).float().state_dict(), strict=False
    )
    assert not unexpected and all(n.endswith("_proj.bias") for n in missing) and missing
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * bias_std)
    model.eval().save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, out / name)
    return out


@pytest.fixture(scope="module")
def qwen2(model_dir, tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("qwen2_fp8")
    hf = save_qwen2(model_dir, work / "hf")
    return {"work": work, "hf": hf, "heads": make_heads(hf, work / "heads", num_heads=3)}


@pytest.fixture(scope="module")
def native(qwen2) -> dict[str, Path]:
    return {dtype: build_native(qwen2, dtype) for dtype in ("fp32", "fp8")}


def build_native(qwen2: dict[str, Path], dtype: str) -> Path:
    out = qwen2["work"] / dtype
    extra = ["--fp8-emulate"] if dtype == "fp8" else []
    main(["build", "native", "--model", str(qwen2["hf"]), "--medusa", str(qwen2["heads"]), "--out", str(out)]
         + ["--dtype", dtype, "--medusa-choices", SMALL, "--max-seq-len", "256", "--verify-tokens", "4", *extra])  # fmt: skip
    return out


def test_native_fp8_qwen2_engine_keeps_its_qkv_bias_and_97_percent_greedy_agreement_with_fp32(native, prompts_path):
    """test_build_native asks 0.98 of pycoder-26m itself; this model is pycoder perturbed by the biases, and its
    engine stores the unquantized tensors in bf16: measured 0.974 here (0.980 with fp32 storage, against 0.9805
    for the same weights with zero biases), so 0.97."""
    fp32, fp8 = native["fp32"], native["fp8"]
    engine = load_engine(fp8, fp8_emulate=True)
    wqkv = engine.model.layers[0].attn.wqkv
    assert isinstance(wqkv, FP8Linear) and wqkv.bias is not None and wqkv.bias.abs().max() > 0.05
    reference = load_engine(fp32).model.layers[0].attn.wqkv.bias
    # stored in the engine's compute dtype (bf16) beside the e4m3 weights, computed in fp32 on CPU
    assert torch.equal(wqkv.bias, reference.detach().bfloat16().float())
    report = compare_fp8(fp32, fp8, read_prompts(prompts_path, limit=24), new_tokens=64, prompt_tokens=128,
                         fp8_emulate=True, free_running=False, timing=False)  # fmt: skip
    print(f"native fp8 qwen2 greedy agreement {report['greedy_agreement']:.4f}")
    assert report["positions"] == 24 * 64
    assert report["greedy_agreement"] >= 0.97, report["greedy_agreement"]
    prompt = "def add(a, b):\n"
    plain = engine.generate(prompt, GenerationConfig(max_new_tokens=8, use_medusa=False, ignore_eos=True))
    medusa = engine.generate(prompt, GenerationConfig(max_new_tokens=8, use_medusa=True, ignore_eos=True))
    assert medusa.tokens == plain.tokens


def test_a_biased_fp8_gemm_without_its_bias_loses_the_agreement(native, prompts_path):
    """The check above can fail: the same engine with the q/k/v biases dropped from its FP8 GEMMs disagrees."""
    engine = load_engine(native["fp8"], fp8_emulate=True)
    ids = [engine.tokenizer.encode(p.prompt)[-64:] for p in read_prompts(prompts_path, limit=4)]
    with torch.inference_mode():
        kept = [engine.model.logits(full_pass(engine.model, x)).argmax(-1) for x in ids]
        for layer in engine.model.layers:
            layer.attn.wqkv.bias = None
        dropped = [engine.model.logits(full_pass(engine.model, x)).argmax(-1) for x in ids]
    agree = sum(int((a == b).sum()) for a, b in zip(kept, dropped)) / sum(len(a) for a in kept)
    print(f"fp8 qwen2 with vs without its q/k/v biases: {agree:.4f}")
    assert agree < 0.96, agree


def test_trtllm_fp8_qwen2_checkpoint_runs_as_biased_fp8_gemms_with_95_percent_agreement(qwen2, prompts_path):
    out = qwen2["work"] / "trtllm_fp8"
    calib = qwen2["work"] / "calib.jsonl"
    lines = [json.loads(line) for line in prompts_path.read_text().splitlines() if line.strip()]
    calib.write_text("".join(json.dumps(p) + "\n" for p in lines[0:6:2]))
    convert_trtllm(ConvertOptions(qwen2["hf"], qwen2["heads"], out, quantization="fp8", calib_prompts=calib,
                                  calib_size=3, calib_max_seq_len=64, device="cpu", max_draft_len=4))  # fmt: skip
    fp8 = load_trtllm_checkpoint(out, device="cpu", fp8_emulate=True).model
    wqkv = fp8.layers[0].attn.wqkv
    assert isinstance(wqkv, FP8Linear) and wqkv.bias is not None and wqkv.bias.abs().max() > 0.05
    ref = load_engine(qwen2["hf"], device="cpu", dtype="float32")
    agree = total = 0
    with torch.inference_mode():
        for p in read_prompts(prompts_path, limit=7)[1::2]:
            ids = ref.tokenizer.encode(p.prompt)[-64:]
            tokens = ref.generate_ids(ids, GenerationConfig(max_new_tokens=64, use_medusa=False, ignore_eos=True))
            seq = ids + tokens.tokens
            pred = fp8.logits(full_pass(fp8, seq)[len(ids) - 1 : -1]).argmax(-1).tolist()
            agree += sum(a == b for a, b in zip(pred, tokens.tokens))
            total += len(tokens.tokens)
    print(f"trtllm fp8 qwen2 greedy agreement {agree / total:.4f}")
    assert total == 3 * 64 and agree / total >= 0.95, agree / total


def test_fp8_linear_adds_its_bias_in_the_compute_dtype_after_the_scaled_gemm():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=True)
    with torch.no_grad():
        lin.bias.normal_(0, 1)
    q = FP8Linear.from_linear(lin, "emulate")
    x = torch.randn(5, 64)
    no_bias = FP8Linear(q.weight, q.weight_scale, None, torch.float32, "emulate")
    assert q.bias.dtype == torch.float32 and torch.equal(q(x), no_bias(x) + lin.bias)
    with pytest.raises(ValueError, match="bias has shape"):
        FP8Linear(q.weight, q.weight_scale, None, torch.float32, "emulate", torch.zeros(31))
