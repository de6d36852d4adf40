"""`medusa-forge triton-repo` for a TensorRT-LLM 1.2.1 engine (the default profile), and relocatable repositories.

TensorRT-LLM 1.2.1's templates are NVIDIA/TensorRT-LLM ``triton_backend/all_models/inflight_batcher_llm/<model>/
config.pbtxt`` (moved there from tensorrtllm_backend in May 2025, tensorrtllm_backend commit 6a749f5 "Remove
backend files"); medusa_forge/serve/templates/tensorrt_llm_v1.2.1/SOURCE.txt names the stored copy each was read
from and its git blob id, which ``template_text`` checks. The engine is this repository's own pipeline output
(convert at the default profile, `build trtllm` with the stand-in trtllm-build of test_serve_trtllm_repo.py); the
checkout is a stand-in laid out as a TensorRT-LLM checkout (``triton_backend/all_models/...``).
"""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest
from test_serve_trtllm_repo import (
    SMALL,
    STAND_IN,
    csv_str_to_vec_vec_int,
    fill_values,
    params,
    parse,
    run,
    template_parameter_keys,
)

from medusa_forge.cli import main
from medusa_forge.serve.trtllm_repo import MODELS, TEMPLATE_SETS, placeholders, template_text

V12 = TEMPLATE_SETS["1.2"]


@pytest.fixture(scope="module")
def site(model_dir, heads_dir, tmp_path_factory) -> Path:
    """One directory holding the checkpoint, the engine, a TensorRT-LLM checkout and the repository."""
    root = tmp_path_factory.mktemp("site") / "site"
    exe = root / "bin" / "trtllm-build"
    exe.parent.mkdir(parents=True)
    exe.write_text(STAND_IN)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    run(
        [
            "convert",
            "trtllm",
            "--model",
            model_dir,
            "--medusa",
            heads_dir,
            "--out",
            root / "ckpt",
            "--dtype",
            "bfloat16",
            "--medusa-choices",
            "small",
        ]
    )
    run(
        [
            "build",
            "trtllm",
            "--checkpoint-dir",
            root / "ckpt",
            "--out",
            root / "engine",
            "--medusa-choices",
            "small",
            "--max-batch-size",
            "4",
            "--trtllm-build",
            exe,
        ]
    )
    models = root / "TensorRT-LLM" / "triton_backend" / "all_models" / "inflight_batcher_llm"
    for model in MODELS:
        (models / model / "1").mkdir(parents=True)
        shutil.copyfile(V12.directory / model / "config.pbtxt", models / model / "config.pbtxt")
        (models / model / "1" / "model.py").write_text(f"# stand-in for TensorRT-LLM v1.2.1 {model}\n")
    run(
        [
            "triton-repo",
            "--model",
            root / "engine",
            "--out",
            root / "repo",
            "--tensorrtllm-backend",
            root / "TensorRT-LLM",
        ]
    )
    return root


@pytest.mark.parametrize("model", MODELS)
def test_each_1_2_template_is_filled_completely_and_parses_as_a_triton_config(site, model):
    template = template_text(model, "1.2")
    text = (site / "repo" / model / "config.pbtxt").read_text()
    assert "${" not in text
    values = fill_values(template, text)  # byte for byte the template outside its placeholders
    assert set(values) == placeholders(template)
    cfg = parse(text)
    assert set(cfg.parameters) == template_parameter_keys(template)
    assert cfg.max_batch_size == 4
    if model in ("ensemble", "tensorrt_llm", "tensorrt_llm_bls"):
        assert values["logits_datatype"] == "TYPE_FP32"  # the checkpoint's logits_dtype
    p = params(cfg)
    if model == "tensorrt_llm":
        assert cfg.backend == "tensorrtllm" and values["prompt_embedding_table_data_type"] == "TYPE_BF16"
        assert p["decoding_mode"] == "medusa" and csv_str_to_vec_vec_int(p["medusa_choices"]) == SMALL
        assert cfg.dynamic_batching.default_queue_policy.max_queue_size == 0
        assert p["gpt_model_path"] == "../engine" and p["tokenizer_dir"] == "../ckpt"
    if model == "preprocessing":
        assert p["gpt_model_path"] == "../engine" and p["tokenizer_dir"] == "../ckpt"


def test_the_1_2_templates_are_the_pinned_files():
    from medusa_forge.serve.trtllm_repo import git_blob_id

    for model in MODELS:
        data = (V12.directory / model / "config.pbtxt").read_bytes()
        assert git_blob_id(data) == V12.blobs[model]
        assert V12.blobs[model] in (V12.directory / "SOURCE.txt").read_text()


def test_a_repository_moved_with_its_engine_still_finds_engine_and_tokenizer(site, tmp_path):
    moved = tmp_path / "elsewhere" / "mount"
    shutil.copytree(site, moved, symlinks=True)
    for model, key in (
        ("tensorrt_llm", "gpt_model_path"),
        ("preprocessing", "tokenizer_dir"),
        ("postprocessing", "tokenizer_dir"),
    ):
        value = params(parse((moved / "repo" / model / "config.pbtxt").read_text()))[key]
        assert not Path(value).is_absolute()
        target = (moved / "repo" / value).resolve()  # tritonserver resolves it from its cwd: the repository
        assert target.is_relative_to(moved.resolve()) and target.is_dir()
    assert (moved / "repo" / "../engine" / "rank0.engine").is_file()


def test_a_0_11_checkout_is_refused_for_a_1_2_engine(site, tmp_path, capsys):
    old = tmp_path / "tensorrtllm_backend"
    for model in MODELS:
        (old / model / "1").mkdir(parents=True)
        shutil.copyfile(TEMPLATE_SETS["0.11"].directory / model / "config.pbtxt", old / model / "config.pbtxt")
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "triton-repo",
                "--model",
                str(site / "engine"),
                "--out",
                str(tmp_path / "r"),
                "--tensorrtllm-backend",
                str(old),
            ]
        )
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "not TensorRT-LLM v1.2.1's" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_tritonserver_runs_in_the_repository_so_relative_paths_resolve(tmp_path):
    from medusa_forge.serve.tritonserver import ServerConfig, TritonInstall, server_command

    install = TritonInstall(binary=Path("/opt/tritonserver/bin/tritonserver"), backend_dir=None)
    cmd = server_command(install, ServerConfig(repo=Path("rel/repo")))
    assert f"--model-repository={Path('rel/repo').absolute()}" in cmd  # absolute: the server's cwd is the repo


def test_a_1_2_engine_takes_only_inflight_fused_batching(site, tmp_path, capsys):
    """1.x's tensorrtllm backend dropped static batching (gpt_model_type V1, NVIDIA/TensorRT-LLM PR #5562)."""
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "triton-repo",
                "--model",
                str(site / "engine"),
                "--out",
                str(tmp_path / "r"),
                "--tensorrtllm-backend",
                str(site / "TensorRT-LLM"),
                "--batching-strategy",
                "V1",
            ]
        )
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "TensorRT-LLM v1.2.1 takes inflight_fused_batching" in err
