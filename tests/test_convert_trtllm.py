"""`medusa-forge convert trtllm` / `convert inspect` and the reader, on the real pycoder-26m checkpoint, for the
TensorRT-LLM 0.11 profile (the 1.2 profile and the model families: test_convert_trtllm_families.py).

The schema is pinned to TensorRT-LLM v0.11.0 (commit 05316d3313360012536ace46c781518f5afae75e), written here
from its source rather than from our own tables:
- examples/medusa/convert_checkpoint.py (0.11 line, stored snapshot 063e02f73410f2f9172a581ca5e3f41d0d3dab8e):
  the config.json dict of ``__main__`` and ``convert_hf_llama`` (per-rank cat(q_r, k_r, v_r) for GQA,
  ``mlp.fc`` <- gate_proj and ``mlp.gate`` <- up_proj split on dim 0, ``attention.dense`` <- o_proj and
  ``mlp.proj`` <- down_proj split on dim 1, ``lm_head`` split on dim 0, embedding and norms unsplit);
- tensorrt_llm/models/convert_utils.py ``split`` / ``dup_kv_weight``;
- tensorrt_llm/models/medusa/weight.py ``load_medusa_hf`` (``medusa_heads.{i}.medusa_layers.{j}.linear.weight|bias``
  and ``medusa_heads.{i}.lm_head.weight``, all split on dim 0) and medusa/model.py @05316d33.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from medusa_forge.build.open import open_engine
from medusa_forge.cli import main
from medusa_forge.convert.trtllm_checkpoint import ConvertOptions, convert_trtllm
from medusa_forge.convert.trtllm_config import CheckpointSpec
from medusa_forge.convert.trtllm_names import entries, merge, shard
from medusa_forge.convert.trtllm_reader import load_trtllm_checkpoint
from medusa_forge.engine.generation import GenerationConfig
from medusa_forge.errors import ForgeError
from medusa_forge.heads.checkpoint import save_heads
from medusa_forge.heads.medusa_head import MedusaHeads, MedusaHeadsConfig
from medusa_forge.model.checkpoint import load_hf_model

H, I, V, Q, KV = 512, 1408, 8192, 512, 256  # pycoder-26m: hidden, intermediate, vocab, q rows, k (= v) rows


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny GEMMs run on one thread


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def v2_heads(model_dir, work) -> Path:
    """Random "version 2" heads (no per-head projection: they use the base lm_head); 5, not the default 4."""
    cfg = load_hf_model(model_dir).config
    heads = MedusaHeads(MedusaHeadsConfig(5, 1, cfg.hidden_size, cfg.vocab_size, shared_lm_head=True))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        heads.res_weight.normal_(0, 0.02, generator=g)
        heads.res_bias.normal_(0, 0.02, generator=g)
    (work / "heads_v2").mkdir()
    save_heads(heads, work / "heads_v2")
    return work / "heads_v2"


@pytest.fixture(scope="module")
def ckpt_tp1(model_dir, heads_dir, work) -> Path:
    """float16, tp 1, v1 heads (Python API), TensorRT-LLM 0.11 profile."""
    convert_trtllm(
        ConvertOptions(model_dir, heads_dir, work / "tp1", dtype="float16", tp_size=1, trtllm_version="0.11")
    )
    return work / "tp1"


@pytest.fixture(scope="module")
def ckpt_tp2(model_dir, v2_heads, work) -> Path:
    """bfloat16, tp 2, version-2 heads, through the command line."""
    out = work / "tp2"
    code = None
    try:
        main(
            [
                "convert",
                "trtllm",
                "--model",
                str(model_dir),
                "--medusa",
                str(v2_heads),
                "--out",
                str(out),
                "--dtype",
                "bfloat16",
                "--tp_size",
                "2",
                "--max_medusa_token_len",
                "31",
                "--trtllm-version",
                "0.11",
            ]
        )
    except SystemExit as e:
        code = e.code
    assert code in (None, 0)
    return out


def headers(path: Path) -> dict[str, tuple[list[int], str]]:
    with safe_open(str(path), framework="pt") as f:
        return {n: (list(f.get_slice(n).get_shape()), f.get_slice(n).get_dtype()) for n in f.keys()}


def golden_schema(tp: int, num_heads: int, dtype: str) -> dict[str, tuple[list[int], str]]:
    """Names, per-rank shapes and dtypes TensorRT-LLM 0.11 builds for pycoder-26m (6 layers, GQA 8/4, 1 ResBlock)."""
    s = {"transformer.vocab_embedding.weight": [V, H], "transformer.ln_f.weight": [H], "lm_head.weight": [V // tp, H]}
    for layer in range(6):
        p = f"transformer.layers.{layer}."
        s |= {
            p + "input_layernorm.weight": [H],
            p + "post_layernorm.weight": [H],
            p + "attention.qkv.weight": [(Q + 2 * KV) // tp, H],
            p + "attention.dense.weight": [H, Q // tp],
            p + "mlp.fc.weight": [I // tp, H],
            p + "mlp.gate.weight": [I // tp, H],
            p + "mlp.proj.weight": [H, I // tp],
        }
    for k in range(num_heads):
        p = f"medusa_heads.{k}."
        s |= {
            p + "medusa_layers.0.linear.weight": [H // tp, H],
            p + "medusa_layers.0.linear.bias": [H // tp],
            p + "lm_head.weight": [V // tp, H],
        }
    return {n: (shape, dtype) for n, shape in s.items()}


UPSTREAM_KEYS = [
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
    "share_embedding_table",
    "max_draft_len",
    "num_medusa_heads",
    "num_medusa_layers",
]


# ---------------------------------------------------------------------------------------------- schema
def test_config_json_matches_the_medusa_example_for_tp1(ckpt_tp1):
    config = json.loads((ckpt_tp1 / "config.json").read_text())
    assert list(config) == UPSTREAM_KEYS  # the example's keys, in its order; head_size only when non-default
    assert config == {
        "architecture": "MedusaForCausalLM",
        "dtype": "float16",
        "logits_dtype": "float32",
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_key_value_heads": 4,
        "vocab_size": 8192,
        "position_embedding_type": "rope_gpt_neox",
        "max_position_embeddings": 2048,
        "hidden_act": "silu",
        "rotary_base": 10000.0,
        "rotary_scaling": None,
        "norm_epsilon": 1e-05,
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "share_embedding_table": False,
        "max_draft_len": 63,
        "num_medusa_heads": 4,
        "num_medusa_layers": 1,
    }  # heads' own config (4), not a flag default


def test_config_json_for_tp2_takes_mapping_heads_and_draft_len(ckpt_tp2):
    config = json.loads((ckpt_tp2 / "config.json").read_text())
    assert list(config) == UPSTREAM_KEYS
    assert config["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    assert (config["dtype"], config["max_draft_len"], config["num_medusa_heads"]) == ("bfloat16", 31, 5)


@pytest.mark.parametrize("tp", [1, 2])
def test_rank_files_hold_exactly_the_golden_tensors(tp, ckpt_tp1, ckpt_tp2):
    ckpt, num_heads, dtype = (ckpt_tp1, 4, "F16") if tp == 1 else (ckpt_tp2, 5, "BF16")
    assert sorted(p.name for p in ckpt.glob("rank*.safetensors")) == [f"rank{r}.safetensors" for r in range(tp)]
    for r in range(tp):
        assert headers(ckpt / f"rank{r}.safetensors") == golden_schema(tp, num_heads, dtype)


def test_tp2_splits_are_the_ones_tensorrt_llm_makes(model_dir, ckpt_tp2):
    """Each rank's slices, checked against the HF tensors themselves (GQA: q, k, v split separately)."""
    hf = load_file(str(model_dir / "model.safetensors"))
    ranks = [load_file(str(ckpt_tp2 / f"rank{r}.safetensors")) for r in range(2)]
    for layer in (0, 5):
        p, t = f"model.layers.{layer}.", f"transformer.layers.{layer}."
        for r, w in enumerate(ranks):
            q, k, v = (hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv")
            expect_qkv = torch.cat(
                [
                    q[r * Q // 2 : (r + 1) * Q // 2],
                    k[r * KV // 2 : (r + 1) * KV // 2],
                    v[r * KV // 2 : (r + 1) * KV // 2],
                ]
            )
            assert torch.equal(w[t + "attention.qkv.weight"], expect_qkv)
            assert torch.equal(
                w[t + "attention.dense.weight"], hf[p + "self_attn.o_proj.weight"][:, r * 256 : (r + 1) * 256]
            )
            assert torch.equal(w[t + "mlp.fc.weight"], hf[p + "mlp.gate_proj.weight"][r * 704 : (r + 1) * 704])
            assert torch.equal(w[t + "mlp.gate.weight"], hf[p + "mlp.up_proj.weight"][r * 704 : (r + 1) * 704])
            assert torch.equal(w[t + "mlp.proj.weight"], hf[p + "mlp.down_proj.weight"][:, r * 704 : (r + 1) * 704])
    for r, w in enumerate(ranks):
        assert torch.equal(w["lm_head.weight"], hf["lm_head.weight"][r * 4096 : (r + 1) * 4096])
        assert torch.equal(w["transformer.vocab_embedding.weight"], hf["model.embed_tokens.weight"])
        # version-2 heads: every head gets the base lm_head as its own (TensorRT-LLM's MedusaHead has one)
        assert torch.equal(w["medusa_heads.2.lm_head.weight"], w["lm_head.weight"])


def test_fewer_kv_heads_than_ranks_are_duplicated_like_dup_kv_weight():
    """tp 4 over 2 KV heads: rank r holds KV head r // 2 (convert_utils.dup_kv_weight); merge undoes it."""
    spec = CheckpointSpec(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=8,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=2,
        num_medusa_heads=1,
        num_medusa_layers=1,
        tp_size=4,
    )
    qkv = next(e for e in entries(spec) if e.name.endswith("attention.qkv.weight"))
    w = torch.arange(16 * 8, dtype=torch.float32).reshape(16, 8)  # q: 8 rows (4 heads), k: 4 rows, v: 4 rows
    parts = [shard(qkv, w, spec, r) for r in range(4)]
    for r, part in enumerate(parts):
        kv_head = r // 2
        assert torch.equal(
            part,
            torch.cat(
                [w[2 * r : 2 * r + 2], w[8 + 2 * kv_head : 10 + 2 * kv_head], w[12 + 2 * kv_head : 14 + 2 * kv_head]]
            ),
        )
    assert torch.equal(merge(qkv, parts, spec), w)


# ---------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("tp", [1, 2])
def test_reader_merges_ranks_back_into_the_exact_weights(tp, model_dir, heads_dir, v2_heads, ckpt_tp1, ckpt_tp2):
    from medusa_forge.heads.checkpoint import load_heads

    ckpt, heads_src, dtype = (ckpt_tp1, heads_dir, torch.float16) if tp == 1 else (ckpt_tp2, v2_heads, torch.bfloat16)
    loaded = load_trtllm_checkpoint(ckpt, device="cpu")
    original = load_hf_model(model_dir)
    got = loaded.model.state_dict()
    for name, t in original.state_dict().items():
        if name in got and t.is_floating_point():
            assert torch.equal(got[name], t.to(dtype).float()), name
    heads = load_heads(heads_src, H, V)
    assert torch.equal(loaded.heads.res_weight, heads.res_weight.to(dtype).float())
    assert torch.equal(loaded.heads.res_bias, heads.res_bias.to(dtype).float())
    if heads.proj_weight is None or torch.equal(
        heads.proj_weight.to(dtype), original.lm_head.weight.to(dtype)[None].expand_as(heads.proj_weight)
    ):
        assert loaded.heads.proj_weight is None  # per-head copies of the base lm_head read back as shared
    else:
        assert torch.equal(loaded.heads.proj_weight, heads.proj_weight.to(dtype).float())


@pytest.fixture(scope="module")
def reference_tokens(model_dir, held_out_prompts):
    """Plain greedy continuations of 3 held-out prompts by the original HF checkpoint (fp32 on CPU)."""
    engine = open_engine(model_dir, tree="small", device="cpu", max_seq_len=96)
    ids = [engine.tokenizer.encode(p["prompt"])[-48:] for p in held_out_prompts[:3]]
    gcfg = GenerationConfig(max_new_tokens=12, use_medusa=False, ignore_eos=True)
    return [(i, engine.generate_ids(i, gcfg).tokens) for i in ids]


@pytest.mark.parametrize("tp", [1, 2])
def test_converted_checkpoint_runs_in_the_native_engine_with_the_original_greedy_output(
    tp, ckpt_tp1, ckpt_tp2, reference_tokens
):
    engine = open_engine(ckpt_tp1 if tp == 1 else ckpt_tp2, tree="small", device="cpu", max_seq_len=96)
    assert engine.heads is not None and engine.heads.config.num_heads == (4 if tp == 1 else 5)
    gcfg = GenerationConfig(max_new_tokens=12, use_medusa=True, ignore_eos=True)
    for ids, expected in reference_tokens:
        assert engine.generate_ids(ids, gcfg).tokens == expected


def test_generate_cli_runs_a_converted_checkpoint(ckpt_tp1, capsys):
    code, out, _ = run_cli(
        ["generate", "--model", str(ckpt_tp1), "--prompt", "def main(", "--max-new-tokens", "6", "--json"], capsys
    )
    assert code == 0 and len(json.loads(out.strip().splitlines()[-1])["tokens"]) == 6


# ---------------------------------------------------------------------------------------------- inspect
def test_inspect_summarises_a_valid_checkpoint(ckpt_tp2, capsys):
    code, out, _ = run_cli(["convert", "inspect", str(ckpt_tp2)], capsys)
    assert code == 0
    assert "MedusaForCausalLM" in out and "tp 2" in out and "5 heads x 1 layer" in out and "valid:" in out


def test_inspect_lists_missing_extra_and_misshaped_tensors_and_exits_1(ckpt_tp2, work, capsys):
    bad = work / "tp2_bad"
    bad.mkdir()
    shutil.copy(ckpt_tp2 / "config.json", bad / "config.json")
    os.symlink(ckpt_tp2 / "rank0.safetensors", bad / "rank0.safetensors")
    tensors = load_file(str(ckpt_tp2 / "rank1.safetensors"))
    del tensors["transformer.layers.3.mlp.gate.weight"]
    tensors["medusa_heads.9.lm_head.weight"] = torch.zeros(4, 4)
    tensors["transformer.layers.0.attention.dense.weight"] = tensors["transformer.layers.0.attention.dense.weight"][
        :, :128
    ].contiguous()
    save_file(tensors, str(bad / "rank1.safetensors"))
    code, out, _ = run_cli(["convert", "inspect", str(bad)], capsys)
    assert code == 1 and "INVALID: 3 problem(s)" in out
    assert "rank1.safetensors: missing tensor transformer.layers.3.mlp.gate.weight" in out
    assert "rank1.safetensors: unexpected tensor medusa_heads.9.lm_head.weight" in out
    assert (
        "rank1.safetensors: transformer.layers.0.attention.dense.weight has shape [512, 128], expected [512, 256]"
        in out
    )
    with pytest.raises(ForgeError, match="not a valid TensorRT-LLM checkpoint: rank1.safetensors: missing tensor"):
        load_trtllm_checkpoint(bad, device="cpu")


def test_inspect_flags_a_missing_rank_file_and_disagreeing_replicas(ckpt_tp2, work, capsys):
    bad = work / "tp2_replica"
    bad.mkdir()
    shutil.copy(ckpt_tp2 / "config.json", bad / "config.json")
    tensors = load_file(str(ckpt_tp2 / "rank0.safetensors"))
    tensors["transformer.ln_f.weight"] = tensors["transformer.ln_f.weight"] + 1
    save_file(tensors, str(bad / "rank0.safetensors"))
    assert run_cli(["convert", "inspect", str(bad)], capsys)[1].count("missing file rank1.safetensors") == 1
    os.symlink(ckpt_tp2 / "rank1.safetensors", bad / "rank1.safetensors")
    code, out, _ = run_cli(["convert", "inspect", str(bad)], capsys)
    assert code == 1 and "transformer.ln_f.weight: copies on ranks [0, 1] differ" in out


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_fail_with_one_line(model_dir, heads_dir, work):
    def convert(**kw):
        opts = dict(model_dir=model_dir, medusa_dir=heads_dir, out_dir=work / "never")
        with pytest.raises(ForgeError) as exc:
            convert_trtllm(ConvertOptions(**(opts | kw)))
        assert "\n" not in str(exc.value)
        return str(exc.value)

    assert "tp_size 3 does not divide num_attention_heads 8" in convert(tp_size=3)
    assert "set CALIB=FILE" in convert(quantization="fp8", calib_prompts=work / "no-such.jsonl")
    assert "--dtype 'float32'" in convert(dtype="float32")
    small = CheckpointSpec(
        vocab_size=8,
        hidden_size=9,
        intermediate_size=8,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        head_dim=4,
        num_medusa_heads=1,
        num_medusa_layers=1,
        tp_size=2,
    )
    with pytest.raises(ForgeError, match="tp_size 2 does not divide hidden_size"):
        small.check("model")
    gpt2 = work / "gpt2"
    gpt2.mkdir()
    cfg = json.loads((model_dir / "config.json").read_text()) | {"architectures": ["GPT2LMHeadModel"]}
    (gpt2 / "config.json").write_text(json.dumps(cfg))
    assert "unsupported architecture 'GPT2LMHeadModel'" in convert(model_dir=gpt2)
    assert not (work / "never").exists()


@pytest.mark.parametrize("hidden, vocab, what", [(256, V, "hidden"), (H, 4096, "vocab")])
def test_heads_that_do_not_fit_the_model_are_refused(hidden, vocab, what, model_dir, work):
    heads = MedusaHeads(MedusaHeadsConfig(2, 1, hidden, vocab))
    d = work / f"heads_{what}"
    d.mkdir()
    save_heads(heads, d)
    with pytest.raises(ForgeError) as exc:
        convert_trtllm(ConvertOptions(model_dir, d, work / "never_heads"))
    assert what in str(exc.value).lower() and "\n" not in str(exc.value)


def test_existing_output_needs_overwrite_and_a_failed_write_leaves_nothing(
    model_dir, heads_dir, ckpt_tp1, work, monkeypatch, capsys
):
    code, _, err = run_cli(
        ["convert", "trtllm", "--model", str(model_dir), "--medusa", str(heads_dir), "--out", str(ckpt_tp1)], capsys
    )
    assert code == 2 and "is not empty; pass --overwrite" in err and err.count("\n") == 1
    import medusa_forge.convert.trtllm_checkpoint as writer

    calls = []

    def failing_save(tensors, path, metadata=None):  # the disk fills up while rank 1 is written
        calls.append(path)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(writer, "save_file", failing_save)
    with pytest.raises(OSError):
        convert_trtllm(ConvertOptions(model_dir, heads_dir, work / "partial", tp_size=2))
    assert not (work / "partial").exists() and not list(work.glob(".partial.tmp-*"))
