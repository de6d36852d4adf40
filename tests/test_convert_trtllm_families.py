"""The TensorRT-LLM 1.2 profile (the default) on the model families its Medusa converter takes: a Llama-3.1-style
model (llama3 RoPE scaling), a Mistral model and a Qwen2 model (q/k/v biases), tiny random checkpoints saved with
transformers' own classes, with an odd vocabulary so tensor parallelism pads it.

Checked against TensorRT-LLM 1.2.x source (NVIDIA/TensorRT-LLM, stored copies cited by commit):
- examples/medusa/convert_checkpoint.py @b93e14ca093e446615f3009cae6ca5a33c4f2f56: the config dict's keys and
  order (0.11's without share_embedding_table, plus model_type, plus qwen_type for qwen2);
- tensorrt_llm/models/medusa/config.py @084a8843ce92c0d349a90e0d4f8ed1232fe8ddbb: MedusaConfig wraps QWenConfig
  when 'qwen' is in model_type (attn_bias: attention.qkv.bias), LLaMAConfig otherwise;
- tensorrt_llm/_utils.py pad_vocab_size / llama convert_hf_llama: lm_head rows zero-padded to a multiple of tp
  when tp does not divide the vocabulary, split on dim 0 like every lm_head.
Greedy identity: the converted checkpoint, read back into the native engine at tp 1 and 2 with its Medusa heads,
continues prompts exactly as transformers' own greedy generate does on the original checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_heads, run_cli
from safetensors import safe_open

from medusa_forge.build.open import open_engine
from medusa_forge.convert.trtllm_checkpoint import ConvertOptions, convert_trtllm
from medusa_forge.engine.generation import GenerationConfig
from medusa_forge.errors import ForgeError
from medusa_forge.model.fp8_linear import FP8Linear

pytestmark = pytest.mark.usefixtures("one_thread")

V, H, I, HEADS, KV, D = 8193, 64, 128, 4, 2, 16  # odd vocab (>= the tokenizer's 8192): tp 2 pads it to 8194
LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
KEYS_1_2 = [
    "architecture",
    "dtype",
    "logits_dtype",
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_size",
    "intermediate_size",
    "num_key_value_heads",
    "vocab_size",
    "position_embedding_type",
    "max_position_embeddings",
    "hidden_act",
    "rotary_base",
    "rotary_scaling",
    "norm_epsilon",
    "quantization",
    "mapping",
    "use_parallel_embedding",
    "embedding_sharding_dim",
    "max_draft_len",
    "num_medusa_heads",
    "num_medusa_layers",
    "model_type",
]


def knows_llama3_rope() -> bool:
    """transformers < 4.43 (the 24.07 image's 4.42; its TensorRT-LLM 0.11 refuses llama3 RoPE too) lacks it."""
    try:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    except ImportError:
        return False
    return "llama3" in ROPE_INIT_FUNCTIONS


def save_tiny(family: str, out: Path, tokenizer_from: Path) -> Path:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    sizes = dict(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=I,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    if family == "llama31":  # rope_theta 1e4 (not 5e5): positions this short must feel the llama3 scaling
        model = LlamaForCausalLM(LlamaConfig(**sizes, rope_theta=10000.0, rope_scaling=LLAMA31_ROPE))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**sizes, rope_theta=1000000.0, sliding_window=None))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**sizes, rope_theta=1000000.0))
    with torch.no_grad():  # sharp attention, so RoPE and the biases decide tokens; random init leaves biases at 0
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(25)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
        for p in model.parameters():  # float16-exact, so the float16 checkpoint holds exactly these weights
            p.copy_(p.half().float())
    model.eval().save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, out / name)
    return out


@pytest.fixture(scope="module", params=["llama31", "mistral", "qwen2"])
def family(request, model_dir, tmp_path_factory) -> dict:
    if request.param == "llama31" and not knows_llama3_rope():
        pytest.skip("this transformers has no llama3 RoPE (4.43+) to build the reference model with")
    work = tmp_path_factory.mktemp(request.param)
    hf = save_tiny(request.param, work / "hf", model_dir)
    heads = make_heads(hf, work / "heads", num_heads=3)
    out = {"name": request.param, "hf": hf, "heads": heads}
    for tp in (1, 2):
        out[tp] = work / f"tp{tp}"
        convert_trtllm(
            ConvertOptions(
                hf, heads, out[tp], dtype="float16", tp_size=tp, medusa_choices="[[0], [1], [0, 0], [0, 0, 0]]"
            )
        )
    return out


def headers(path: Path) -> dict[str, list[int]]:
    with safe_open(str(path), framework="pt") as f:
        return {n: list(f.get_slice(n).get_shape()) for n in f.keys()}


def test_config_json_has_the_1_2_converter_keys_and_the_family_fields(family):
    config = json.loads((family[2] / "config.json").read_text())
    qwen = family["name"] == "qwen2"
    assert list(config) == KEYS_1_2 + (["qwen_type"] if qwen else [])
    assert config["model_type"] == {"llama31": "llama", "mistral": "mistral", "qwen2": "qwen2"}[family["name"]]
    assert config["max_draft_len"] == 4  # the tree's node count, not a flag
    assert config["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    assert config["vocab_size"] == V  # the real vocabulary: padding lives in the weights only
    if family["name"] != "llama31":
        assert config["rotary_base"] == 1e6 and config["rotary_scaling"] is None
        assert config.get("qwen_type") == ("qwen2" if qwen else None)
    else:  # every llama3 field, not just the type upstream's converter keeps
        assert config["rotary_scaling"] == {
            "type": "llama3",
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }


@pytest.mark.parametrize("tp", [1, 2])
def test_rank_files_hold_the_family_tensors_with_the_vocab_padded_for_tp(family, tp):
    qwen = family["name"] == "qwen2"
    qkv_rows = (HEADS // tp + 2 * KV // tp) * D
    vp = -(-V // tp) * tp // tp  # lm_head rows per rank
    expected = {"transformer.vocab_embedding.weight": [V, H], "transformer.ln_f.weight": [H], "lm_head.weight": [vp, H]}
    for i in range(2):
        p = f"transformer.layers.{i}."
        expected |= {
            p + "input_layernorm.weight": [H],
            p + "post_layernorm.weight": [H],
            p + "attention.qkv.weight": [qkv_rows, H],
            p + "attention.dense.weight": [H, HEADS * D // tp],
            p + "mlp.fc.weight": [I // tp, H],
            p + "mlp.gate.weight": [I // tp, H],
            p + "mlp.proj.weight": [H, I // tp],
        }
        if qwen:
            expected[p + "attention.qkv.bias"] = [qkv_rows]
    for k in range(3):
        p = f"medusa_heads.{k}."
        expected |= {
            p + "medusa_layers.0.linear.weight": [H // tp, H],
            p + "medusa_layers.0.linear.bias": [H // tp],
            p + "lm_head.weight": [vp, H],
        }
    for r in range(tp):
        assert headers(family[tp] / f"rank{r}.safetensors") == expected


def test_padded_lm_head_rows_are_zero_and_only_on_the_last_rank(family):
    with safe_open(str(family[2] / "rank1.safetensors"), framework="pt") as f:
        last = f.get_tensor("lm_head.weight")
        head = f.get_tensor("medusa_heads.0.lm_head.weight")
    assert torch.count_nonzero(last[-1]) == 0 and torch.count_nonzero(head[-1]) == 0
    assert torch.count_nonzero(last[-2]) > 0


@pytest.fixture(scope="module")
def reference(family) -> list[tuple[list[int], list[int]]]:
    """transformers' greedy continuation of three prompts (token ids) on the original checkpoint."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(family["hf"]).float().eval()
    out = []
    for seed in range(3):
        ids = torch.randint(0, 8192, (12,), generator=torch.Generator().manual_seed(seed)).tolist()
        gen = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)
        out.append((ids, gen[0, len(ids) :].tolist()))
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_converted_checkpoint_decodes_with_medusa_to_the_transformers_greedy_output(family, reference, tp):
    engine = open_engine(family[tp], tree="[[0], [1], [0, 0], [0, 0, 0]]", device="cpu", max_seq_len=128)
    assert engine.heads is not None and engine.heads.config.num_heads == 3
    gcfg = GenerationConfig(max_new_tokens=16, use_medusa=True, ignore_eos=True)
    for ids, expected in reference:
        assert engine.generate_ids(ids, gcfg).tokens == expected


def test_the_0_11_profile_takes_mistral_and_refuses_what_its_converter_cannot(family, tmp_path):
    opts = ConvertOptions(family["hf"], family["heads"], tmp_path / "out", trtllm_version="0.11", max_draft_len=4)
    if family["name"] == "mistral":  # 0.11's Medusa converter takes Llama and Mistral (no RoPE scaling)
        config = convert_trtllm(opts).config
        assert "model_type" not in config and config["share_embedding_table"] is False
        return
    with pytest.raises(ForgeError) as exc:
        convert_trtllm(opts)
    msg = str(exc.value)
    assert "\n" not in msg and "TensorRT-LLM 0.11.0" in msg and "--trtllm-version 1.2" in msg
    assert ("Qwen2ForCausalLM" if family["name"] == "qwen2" else "'llama3'") in msg
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def undercounted_heads(family, tmp_path_factory) -> Path:
    """Heads whose config.json says 1 head while the file holds 3 (like FasterDecoding/medusa-vicuna-7b-v1.3)."""
    d = tmp_path_factory.mktemp("undercount") / "heads"
    shutil.copytree(family["heads"], d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"medusa_num_heads": 1}))
    return d


def test_heads_that_config_under_counts_need_num_heads_and_then_convert(family, undercounted_heads, tmp_path, capsys):
    args = ["convert", "trtllm", "--model", family["hf"], "--medusa", undercounted_heads, "--max-draft-len", "3"]
    code, _, err = run_cli(args + ["--out", tmp_path / "refused"], capsys)
    assert code != 0 and "holds 3 Medusa heads" in err and not (tmp_path / "refused").exists()
    code, out, err = run_cli(args + ["--out", tmp_path / "two", "--fixed_num_medusa_heads", "2"], capsys)
    assert code == 0, err
    assert "TensorRT-LLM 1.2.1 float16 checkpoint" in out and "valid against the TensorRT-LLM 1.2.1 schema" in out
    assert json.loads((tmp_path / "two" / "config.json").read_text())["num_medusa_heads"] == 2
    with (
        safe_open(str(tmp_path / "two" / "rank0.safetensors"), framework="pt") as a,
        safe_open(str(family[1] / "rank0.safetensors"), framework="pt") as b,
    ):
        names = [n for n in b.keys() if not n.startswith("medusa_heads.2.")]
        assert sorted(a.keys()) == sorted(names)
        assert all(torch.equal(a.get_tensor(n), b.get_tensor(n)) for n in names if n.startswith("medusa_heads."))
    code, _, err = run_cli(args + ["--out", tmp_path / "four", "--num-heads", "4"], capsys)
    assert code != 0 and "--num-heads 4" in err and "holds 3" in err


@pytest.mark.parametrize("family", ["qwen2"], indirect=True)  # q/k/v biases are Qwen2's
def test_fp8_qwen2_converts_and_reads_back_dequantized_and_as_biased_fp8_gemms(family, tmp_path):
    from medusa_forge.convert.trtllm_reader import load_trtllm_checkpoint

    out = tmp_path / "fp8"
    convert_trtllm(
        ConvertOptions(
            family["hf"],
            family["heads"],
            out,
            quantization="fp8",
            calib_size=4,
            calib_max_seq_len=16,
            device="cpu",
            max_draft_len=4,
        )
    )
    with safe_open(str(out / "rank0.safetensors"), framework="pt") as f:
        assert f.get_tensor("transformer.layers.0.attention.qkv.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("transformer.layers.0.attention.qkv.bias").dtype == torch.float16
    loaded = load_trtllm_checkpoint(out, device="cpu", dequantize=True)
    assert loaded.model.layers[0].attn.wqkv.bias is not None
    fp8 = load_trtllm_checkpoint(out, device="cpu", fp8_emulate=True).model.layers[0].attn.wqkv
    assert isinstance(fp8, FP8Linear) and torch.equal(fp8.bias, loaded.model.layers[0].attn.wqkv.bias)


def test_convert_reads_the_model_config_json_once(family, tmp_path):
    """Issue 19: the convert path used to read it three times (ModelConfig, hidden_act, load_hf_model)."""
    import sys

    watched = str(family["hf"] / "config.json")
    opened: list[str] = []
    active = [True]

    def hook(event, args):  # an audit hook sees every open(), whoever calls it
        if active[0] and event == "open" and str(args[0]) == watched:
            opened.append(event)

    sys.addaudithook(hook)
    try:
        convert_trtllm(ConvertOptions(family["hf"], family["heads"], tmp_path / "once", max_draft_len=4))
    finally:
        active[0] = False  # audit hooks cannot be removed: make it inert
    assert len(opened) == 1
