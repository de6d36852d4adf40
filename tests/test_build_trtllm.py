"""`medusa-forge build trtllm`: the exact trtllm-build command of the checkpoint's release (1.2.1 or 0.11.0).

The checkpoints are real: `medusa-forge convert trtllm` writes them from pycoder-26m and the random
heads fixture (fp16, and fp8 calibrated on two prompts). trtllm-build itself cannot run here (it needs
TensorRT and a GPU), so the command is pinned through --dry-run, and the build path (manifest,
atomic output) runs against a stand-in executable that writes what trtllm-build writes.

The pinned flags are those of TensorRT-LLM 0.11.0 (NVIDIA/TensorRT-LLM, commit 05316d33, the release in
nvcr.io/nvidia/tritonserver:24.07-trtllm-python-py3 that the Dockerfile uses with TRTLLM=0.11):
- examples/medusa/README.md: `trtllm-build --checkpoint_dir .. --output_dir .. --gemm_plugin float16
  --speculative_decoding_mode medusa --max_batch_size 4`, and for the FP8 base checkpoint of
  `quantize.py --qformat fp8 --medusa_model_dir ..` the same plus `--gpt_attention_plugin float16`;
- tensorrt_llm/commands/build.py: --max_input_len --max_seq_len --max_num_tokens --max_draft_len --workers
  and `--speculative_decoding_mode` choices {draft_tokens_external, lookahead_decoding, medusa};
- tensorrt_llm/plugin/plugin.py: --paged_kv_cache / --remove_input_padding take enable|disable.

For TensorRT-LLM 1.2.1 (nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3), tensorrt_llm/commands/build.py
(stored copy @008b2b8d23af95e4e19fa6f354f9c5f6349b2bfc): ``--kv_cache_type {continuous,paged,disabled}`` with
``--paged_kv_cache`` marked "Deprecated", the same sizes, ``--workers``, ``--max_draft_len`` and
``--speculative_decoding_mode`` choices {draft_tokens_external, lookahead_decoding, medusa, explicit_draft_tokens,
eagle}; the plugin flags come from ``add_plugin_argument`` as before.
"""

from __future__ import annotations

import json
import os
import stat

import pytest

from medusa_forge.cli import main
from medusa_forge.manifest import EngineManifest, sha256_file

# Every flag trtllm-build 0.11.0 accepts that we emit (tensorrt_llm/commands/build.py, plugin/plugin.py).
TRTLLM_011_FLAGS = {
    "--checkpoint_dir",
    "--output_dir",
    "--speculative_decoding_mode",
    "--max_draft_len",
    "--gemm_plugin",
    "--gpt_attention_plugin",
    "--paged_kv_cache",
    "--remove_input_padding",
    "--max_batch_size",
    "--max_input_len",
    "--max_seq_len",
    "--max_num_tokens",
    "--workers",
}


# Every flag trtllm-build 1.2.1 accepts that we emit: no deprecated --paged_kv_cache.
TRTLLM_12_FLAGS = TRTLLM_011_FLAGS - {"--paged_kv_cache"} | {"--kv_cache_type"}


def convert(argv: list[str]) -> None:
    main(["convert", "trtllm", *argv])


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory, held_out_prompts):
    path = tmp_path_factory.mktemp("trt-calib") / "calib.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in held_out_prompts[:2]))
    return path


@pytest.fixture(scope="session")
def fp16_ckpt(model_dir, heads_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "ckpt-fp16"
    convert(
        [
            "--model",
            str(model_dir),
            "--medusa",
            str(heads_dir),
            "--out",
            str(out),
            "--dtype",
            "float16",
            "--max-draft-len",
            "7",
            "--trtllm-version",
            "0.11",
        ]
    )
    return out


@pytest.fixture(scope="session")
def fp16_ckpt_12(model_dir, heads_dir, tmp_path_factory):
    """The default profile (TensorRT-LLM 1.2.1), max_draft_len from the `small` tree."""
    out = tmp_path_factory.mktemp("trt") / "ckpt-fp16-1.2"
    convert(["--model", str(model_dir), "--medusa", str(heads_dir), "--out", str(out), "--medusa-choices", "small"])
    return out


@pytest.fixture(scope="session")
def fp8_ckpt(model_dir, heads_dir, calib_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "ckpt-fp8"
    convert(
        [
            "--model",
            str(model_dir),
            "--medusa",
            str(heads_dir),
            "--out",
            str(out),
            "--dtype",
            "float16",
            "--quantization",
            "fp8",
            "--calib-prompts",
            str(calib_file),
            "--calib-size",
            "2",
            "--calib-max-seq-len",
            "32",
            "--device",
            "cpu",
            "--trtllm-version",
            "0.11",
        ]
    )
    return out


def dry_run(ckpt, out, *extra, capsys) -> list[str]:
    main(["build", "trtllm", "--checkpoint-dir", str(ckpt), "--out", str(out), "--dry-run", *extra])
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    return line.split(" ")


def test_fp16_dry_run_is_the_medusa_example_command_with_every_size_explicit(fp16_ckpt, tmp_path, capsys):
    out = tmp_path / "engine"
    cmd = dry_run(fp16_ckpt, out, "--medusa-choices", "small", capsys=capsys)
    assert cmd == [
        "trtllm-build",
        "--checkpoint_dir",
        str(fp16_ckpt),
        "--output_dir",
        str(out),
        "--speculative_decoding_mode",
        "medusa",
        "--max_draft_len",
        "7",
        "--gemm_plugin",
        "float16",
        "--gpt_attention_plugin",
        "float16",
        "--paged_kv_cache",
        "enable",
        "--remove_input_padding",
        "enable",
        "--max_batch_size",
        "8",
        "--max_input_len",
        "1024",
        "--max_seq_len",
        "2048",
        "--max_num_tokens",
        str(1024 + 8 * (7 + 1)),
        "--workers",
        "1",
    ]
    assert {a for a in cmd if a.startswith("--")} <= TRTLLM_011_FLAGS
    assert not out.exists()  # a dry run writes nothing


def test_a_1_2_checkpoint_gets_the_1_2_flags(fp16_ckpt_12, tmp_path, capsys):
    out = tmp_path / "engine"
    cmd = dry_run(fp16_ckpt_12, out, "--medusa-choices", "small", capsys=capsys)
    assert cmd == [
        "trtllm-build",
        "--checkpoint_dir",
        str(fp16_ckpt_12),
        "--output_dir",
        str(out),
        "--speculative_decoding_mode",
        "medusa",
        "--max_draft_len",
        "7",
        "--gemm_plugin",
        "float16",
        "--gpt_attention_plugin",
        "float16",
        "--kv_cache_type",
        "paged",
        "--remove_input_padding",
        "enable",
        "--max_batch_size",
        "8",
        "--max_input_len",
        "1024",
        "--max_seq_len",
        "2048",
        "--max_num_tokens",
        str(1024 + 8 * (7 + 1)),
        "--workers",
        "1",
    ]
    assert {a for a in cmd if a.startswith("--")} <= TRTLLM_12_FLAGS


def test_fp8_dry_run_keeps_the_gemm_plugin_in_the_activation_dtype(fp8_ckpt, tmp_path, capsys):
    out = tmp_path / "engine"
    cmd = dry_run(
        fp8_ckpt, out, "--max-batch-size", "4", "--max-seq-len", "1024", "--max-input-len", "512", capsys=capsys
    )
    assert cmd == [
        "trtllm-build",
        "--checkpoint_dir",
        str(fp8_ckpt),
        "--output_dir",
        str(out),
        "--speculative_decoding_mode",
        "medusa",
        "--max_draft_len",
        "63",
        "--gemm_plugin",
        "float16",
        "--gpt_attention_plugin",
        "float16",
        "--paged_kv_cache",
        "enable",
        "--remove_input_padding",
        "enable",
        "--max_batch_size",
        "4",
        "--max_input_len",
        "512",
        "--max_seq_len",
        "1024",
        "--max_num_tokens",
        str(512 + 4 * 64),
        "--workers",
        "1",
    ]


def test_without_trtllm_build_the_build_fails_clearly_and_writes_nothing(fp16_ckpt, tmp_path, capsys):
    out = tmp_path / "engine"
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "build",
                "trtllm",
                "--checkpoint-dir",
                str(fp16_ckpt),
                "--out",
                str(out),
                "--medusa-choices",
                "small",
                "--trtllm-build",
                "trtllm-build-not-installed",
            ]
        )
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert "trtllm-build-not-installed not found on PATH" in err and "--dry-run" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--medusa-choices", "mc_sim_7b_63"], "has 63 draft nodes but the checkpoint's max_draft_len is 7"),
        (["--medusa-choices", "chain-5"], "depth 5 but the model has only 4 Medusa heads"),
        (["--medusa-choices", "auto"], "build it with `medusa-forge build native --medusa-choices auto"),
        (["--medusa-choices", "small", "--max-seq-len", "9000"], "exceeds the model's max_position_embeddings"),
        (["--medusa-choices", "small", "--max-input-len", "4096"], "must be >= 1 and below --max_seq_len"),
    ],
)
def test_trees_and_sizes_that_the_engine_cannot_serve_are_refused(fp16_ckpt, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["build", "trtllm", "--checkpoint-dir", str(fp16_ckpt), "--out", str(tmp_path / "e"), "--dry-run", *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and err.count("\n") == 1


def test_not_a_checkpoint_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["build", "trtllm", "--checkpoint-dir", str(tmp_path), "--out", str(tmp_path / "e"), "--dry-run"])
    assert "config.json: not found" in capsys.readouterr().err


STAND_IN = """#!/usr/bin/env python3
# Stand-in for trtllm-build (TensorRT cannot run on this machine): records its argv and writes the two
# kinds of file trtllm-build writes into --output_dir, or fails when asked to.
import json, os, sys
args = sys.argv[1:]
out = args[args.index("--output_dir") + 1]
with open(os.environ["STAND_IN_LOG"], "w") as f:
    json.dump(args, f)
if os.environ.get("STAND_IN_FAIL"):
    sys.exit(3)
with open(os.path.join(out, "config.json"), "w") as f:
    json.dump({"version": "0.11.0"}, f)
open(os.path.join(out, "rank0.engine"), "wb").write(b"engine")
"""


@pytest.fixture()
def stand_in(tmp_path, monkeypatch):
    exe = tmp_path / "bin" / "trtllm-build"
    exe.parent.mkdir()
    exe.write_text(STAND_IN)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("STAND_IN_LOG", str(tmp_path / "argv.json"))
    return exe


def test_a_build_writes_the_engine_with_our_manifest_beside_it(fp16_ckpt, stand_in, tmp_path, capsys):
    out = tmp_path / "engine"
    main(
        [
            "build",
            "trtllm",
            "--checkpoint-dir",
            str(fp16_ckpt),
            "--out",
            str(out),
            "--medusa-choices",
            "small",
            "--trtllm-build",
            str(stand_in),
        ]
    )
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[argv.index("--checkpoint_dir") + 1] == str(fp16_ckpt)
    assert argv[argv.index("--output_dir") + 1] != str(out.absolute())  # built in a temporary sibling
    m = EngineManifest.load(out)
    assert (m.kind, m.dtype, m.num_medusa_heads, m.max_batch_size, m.max_seq_len) == (
        "tensorrt_llm",
        "float16",
        4,
        8,
        2048,
    )
    assert m.medusa_choices == [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 0, 0]]
    assert m.extra["medusa_choices_trtllm"].startswith("{0}, {1}, {0, 0}")
    assert m.extra["command"].split(" ")[4] == str(out.absolute())  # the command as if run in place
    assert m.sha256["checkpoint/rank0.safetensors"] == sha256_file(fp16_ckpt / "rank0.safetensors")
    assert m.tool_versions["tensorrt_llm_pinned"].startswith("0.11.0")
    assert (out / "rank0.engine").is_file() and (out / "tokenizer.json").is_file()
    assert "tensorrt_llm engine:" in capsys.readouterr().out


def test_a_failed_build_leaves_nothing_behind(fp16_ckpt, stand_in, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STAND_IN_FAIL", "1")
    out = tmp_path / "engine"
    with pytest.raises(SystemExit):
        main(
            [
                "build",
                "trtllm",
                "--checkpoint-dir",
                str(fp16_ckpt),
                "--out",
                str(out),
                "--medusa-choices",
                "small",
                "--trtllm-build",
                str(stand_in),
            ]
        )
    assert "trtllm-build failed with exit code 3" in capsys.readouterr().err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".engine")] == []


def test_a_native_engine_manifest_carries_its_searched_tree_and_stats(fp16_ckpt, tmp_path, stand_in):
    native = tmp_path / "native"
    native.mkdir()
    stats = {"method": "auto", "expected_acceptance_length": 1.9, "measured_acceptance_length": 1.8}
    EngineManifest(kind="native", dtype="bfloat16", medusa_choices=[[0], [0, 0], [1]], tree_stats=stats).save(native)
    out = tmp_path / "engine"
    main(
        [
            "build",
            "trtllm",
            "--checkpoint-dir",
            str(fp16_ckpt),
            "--out",
            str(out),
            "--medusa-choices",
            str(native / "medusa_forge.json"),
            "--trtllm-build",
            str(stand_in),
        ]
    )
    m = EngineManifest.load(out)
    assert m.medusa_choices == [[0], [1], [0, 0]]
    assert m.tree_stats["expected_acceptance_length"] == 1.9 and m.tree_stats["from_engine"] == str(native.resolve())
    assert os.path.samefile(m.sources["checkpoint"], fp16_ckpt)


def test_fp8_without_calib_prompts_calibrates_on_the_set_shipped_in_the_package(model_dir, heads_dir, tmp_path):
    """Inside the image there is no ../shared: `make engine DTYPE=fp8` leaves CALIB unset and must still work."""
    from medusa_forge.convert.trtllm_checkpoint import CALIB_PROMPTS, ConvertOptions, convert_trtllm
    from medusa_forge.prompts import read_prompts

    assert CALIB_PROMPTS.is_file() and len(read_prompts(CALIB_PROMPTS)) >= 16
    pyproject = CALIB_PROMPTS.parents[3] / "pyproject.toml"
    if pyproject.is_file():  # a checkout: declared as package data (installed, as by tools/image_deps.sh, it is there)
        assert '"**/*.jsonl"' in pyproject.read_text()
    result = convert_trtllm(
        ConvertOptions(
            model_dir, heads_dir, tmp_path / "fp8", quantization="fp8", calib_size=2, calib_max_seq_len=16, device="cpu"
        )
    )
    assert result.calibration["sequences"] == 2 and result.config["quantization"]["quant_algo"] == "FP8"
