"""`medusa-forge build native`: self-contained engines that load and generate, fp8 numerics, bad input.

Engines are built once per session from the real pycoder-26m checkpoint and the random heads fixture:
an fp32 engine with the searched (`auto`) tree on tiny calibration settings, and an fp8 engine emulated
on CPU. The FP8 agreement figure is the one `build compare-fp8` prints on the H100.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from medusa_forge.build.compare import compare_fp8
from medusa_forge.cli import main
from medusa_forge.engine.generation import GenerationConfig
from medusa_forge.engine.load import load_engine
from medusa_forge.errors import ForgeError
from medusa_forge.manifest import EngineManifest, sha256_file
from medusa_forge.model import fp8_linear as fp8
from medusa_forge.prompts import read_prompts

SMALL = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 0, 0]]


def build(argv: list[str]) -> None:
    main(["build", "native", *argv])


@pytest.fixture(scope="session")
def calib_prompts(tmp_path_factory, held_out_prompts):
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in held_out_prompts[::50][:2]))
    return path


@pytest.fixture(scope="session")
def fp32_engine(model_dir, heads_dir, calib_prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "fp32"
    build(
        [
            "--model",
            str(model_dir),
            "--medusa",
            str(heads_dir),
            "--out",
            str(out),
            "--dtype",
            "fp32",
            "--medusa-choices",
            "auto",
            "--calib-prompts",
            str(calib_prompts),
            "--calib-prompt-tokens",
            "32",
            "--calib-new-tokens",
            "12",
            "--search-sizes",
            "1,3",
            "--max-tree-nodes",
            "4",
            "--timing-prompts",
            "1",
            "--timing-tokens",
            "6",
            "--max-seq-len",
            "320",
            "--verify-tokens",
            "8",
        ]
    )
    return out


@pytest.fixture(scope="session")
def fp8_engine(model_dir, heads_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "fp8"
    build(
        [
            "--model",
            str(model_dir),
            "--medusa",
            str(heads_dir),
            "--out",
            str(out),
            "--dtype",
            "fp8",
            "--fp8-emulate",
            "--medusa-choices",
            "small",
            "--max-seq-len",
            "320",
            "--verify-tokens",
            "8",
        ]
    )
    return out


def test_native_engine_is_self_contained_and_its_manifest_pins_the_inputs(fp32_engine, model_dir, heads_dir):
    m = EngineManifest.load(fp32_engine)
    assert (m.kind, m.dtype, m.num_medusa_heads, m.max_seq_len) == ("native", "float32", 4, 320)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (fp32_engine / "model" / f).is_file()
    assert json.loads((fp32_engine / "model" / "config.json").read_text())["torch_dtype"] == "float32"
    with safe_open(str(fp32_engine / "model" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    assert (fp32_engine / "medusa" / "medusa_lm_head.safetensors").is_file()
    assert m.sha256["model/model.safetensors"] == sha256_file(model_dir / "model.safetensors")
    assert m.sha256["medusa/medusa_lm_head.safetensors"] == sha256_file(heads_dir / "medusa_lm_head.safetensors")
    assert m.sources["model"] == str(model_dir.resolve())
    assert {"torch", "transformers", "safetensors", "medusa_forge"} <= set(m.tool_versions)
    assert m.extra["verify"]["medusa_equals_greedy"] is True


def test_auto_tree_is_written_with_expected_and_measured_acceptance(fp32_engine):
    m = EngineManifest.load(fp32_engine)
    s = m.tree_stats
    assert s["method"] == "auto" and m.extra["tree_name"] == "auto"
    paths = [tuple(p) for p in m.medusa_choices]
    assert 1 <= len(paths) <= 4 and all(len(p) <= 4 for p in paths)
    assert all(p[:-1] in paths for p in paths if len(p) > 1)  # prefix-closed
    assert s["nodes"] == len(paths) and s["calib_prompts"] == 2 and s["calib_positions"] > 0
    assert s["expected_acceptance_length"] >= 1.0 and s["measured_acceptance_length"] >= 1.0
    assert [c["nodes"] for c in s["latency_curve"]] == sorted(c["nodes"] for c in s["latency_curve"])
    assert (
        s["depth_limit"] in (2, 3, 4) and s["depth"] <= s["depth_limit"] and set(s["depth_curves"]) == {"2", "3", "4"}
    )
    assert 1 <= len(s["finalists"]) <= 3 and s["measured_decode_tokens_per_s"] == max(
        f["measured_decode_tokens_per_s"] for f in s["finalists"]
    )
    assert all(c["step_ms"] > 0 for c in s["latency_curve"])


def test_native_engine_generates_and_medusa_output_equals_greedy(fp32_engine):
    engine = load_engine(fp32_engine)
    assert engine.heads is not None and engine.tree.to_list() == EngineManifest.load(fp32_engine).medusa_choices
    prompt = "import os\n\ndef read_config(path):\n"
    base = engine.generate(prompt, GenerationConfig(max_new_tokens=12, use_medusa=False, ignore_eos=True))
    med = engine.generate(prompt, GenerationConfig(max_new_tokens=12, use_medusa=True, ignore_eos=True))
    assert len(base.tokens) == 12 and base.text.strip()
    assert med.tokens == base.tokens


def test_fp8_engine_stores_e4m3_gemms_with_shared_scales_and_keeps_the_rest_bf16(fp8_engine):
    m = EngineManifest.load(fp8_engine)
    assert m.dtype == "fp8" and m.extra["fp8"]["quantized"] == 24 and m.medusa_choices == SMALL
    config = json.loads((fp8_engine / "model" / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "ignored_layers": ["lm_head"],
    }
    with safe_open(str(fp8_engine / "model" / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        p = "model.layers.3."
        for name in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ):
            assert dtypes[p + name + ".weight"] == "F8_E4M3"
        qkv = {f.get_tensor(p + f"self_attn.{x}_proj.weight_scale").item() for x in "qkv"}
        gate_up = {f.get_tensor(p + f"mlp.{x}_proj.weight_scale").item() for x in ("gate", "up")}
        assert len(qkv) == 1 and len(gate_up) == 1  # fused shards share one scale: exact fusion at load
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert dtypes[name] == "BF16"
    with safe_open(str(fp8_engine / "medusa" / "medusa_lm_head.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_fp8_engine_refuses_cpu_unless_emulation_is_asked_for(fp8_engine):
    with pytest.raises(ForgeError, match="fp8 needs a CUDA GPU.*--fp8-emulate"):
        load_engine(fp8_engine)
    engine = load_engine(fp8_engine, fp8_emulate=True)
    linears = [m for m in engine.model.modules() if isinstance(m, fp8.FP8Linear)]
    assert len(linears) == 24 and all(m.backend == "emulate" for m in linears)
    assert type(engine.model.lm_head) is torch.nn.Linear
    prompt = "class Stack:\n    def __init__(self):\n"
    base = engine.generate(prompt, GenerationConfig(max_new_tokens=10, use_medusa=False, ignore_eos=True))
    med = engine.generate(prompt, GenerationConfig(max_new_tokens=10, use_medusa=True, ignore_eos=True))
    assert med.tokens == base.tokens  # per-token activation scales: a token's result ignores its batch


def test_fp8_keeps_98_percent_greedy_agreement_with_fp32(fp32_engine, fp8_engine, prompts_path):
    """Teacher-forced greedy agreement on the first 24 held-out prompts x 64 tokens (1536 positions).

    The same check the lead runs on the H100 against the bf16 engine (`build compare-fp8`).
    """
    prompts = read_prompts(prompts_path, limit=24)
    report = compare_fp8(
        fp32_engine,
        fp8_engine,
        prompts,
        new_tokens=64,
        prompt_tokens=128,
        fp8_emulate=True,
        free_running=False,
        timing=False,
    )
    assert report["positions"] == 24 * 64
    assert report["greedy_agreement"] >= 0.98, report["greedy_agreement"]


def test_engine_timing_reports_plain_and_medusa_step_times(fp32_engine):
    """The timing half of `build compare-fp8` (the agreement test above skips it to stay fast)."""
    from medusa_forge.build.compare import engine_timing
    from medusa_forge.engine.load import load_engine

    engine = load_engine(fp32_engine)
    ids = [engine.tokenizer.encode(t) for t in ("import os\n", "def main():\n    ")]
    report = engine_timing(engine, ids, new_tokens=8)
    assert set(report) == {"greedy", "medusa"}
    assert report["greedy"]["tokens_per_step"] == 1.0
    assert report["medusa"]["tokens_per_step"] >= 1.0
    assert all(r["step_ms"] > 0 and r["decode_tokens_per_s"] > 0 for r in report.values())


def test_fp8_linear_matches_a_dequantized_reference_and_is_batch_independent():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False)
    q = fp8.FP8Linear.from_linear(lin, "emulate")
    assert q.weight.dtype == torch.float8_e4m3fn
    assert q.weight.float().abs().max().item() == fp8.FP8_MAX
    x = torch.randn(5, 64)
    y = q(x)
    rel = (y - lin(x)).norm() / lin(x).norm()
    assert rel < 0.06  # e4m3 keeps 3 mantissa bits: a few percent of error
    # Per-token scales: a row's quantization does not depend on its batch (the CPU GEMM's own
    # blocking may still differ between M=1 and M=5 in the last bits).
    torch.testing.assert_close(q(x[2:3]), y[2:3], rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_fp8_scaled_mm_matches_emulation_on_cuda():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 128, bias=False).cuda().bfloat16()
    fast = fp8.FP8Linear.from_linear(lin, fp8.fp8_backend("cuda", False))
    slow = fp8.FP8Linear(fast.weight, fast.weight_scale, None, torch.bfloat16, "emulate")
    x = torch.randn(7, 256, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(fast(x), slow(x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dtype", "int4"], "unknown dtype 'int4'"),
        (["--dtype", "fp8"], "fp8 needs a CUDA GPU"),
        (["--medusa-choices", "chain-5"], "depth 5 but the model has only 4 Medusa heads"),
        (["--medusa-choices", "auto"], "needs calibration prompts"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(argv, message, model_dir, heads_dir, tmp_path, capsys):
    out = tmp_path / "engine"
    with pytest.raises(SystemExit) as exc:
        build(["--model", str(model_dir), "--medusa", str(heads_dir), "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".engine.tmp-*"))


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "e")])
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_an_engines_tree_keeps_the_name_it_was_built_with():
    """Reports (compare-trees, triton-repo) name the tree an engine runs by its build-time name."""
    from medusa_forge.manifest import EngineManifest

    paths = [[0], [0, 0], [1]]
    auto = EngineManifest("native", "bfloat16", paths, extra={"tree_name": "auto"}).choice_tree()
    assert auto.name == "auto" and sorted(auto.to_list()) == sorted(paths)
    assert EngineManifest("native", "bfloat16", paths).choice_tree().name == "engine"  # older manifests
    assert EngineManifest("native", "bfloat16", None).choice_tree() is None
