"""`medusa-forge triton-repo` for a TensorRT-LLM engine: tensorrtllm_backend's five models, schema-checked.

Upstream pinned: triton-inference-server/tensorrtllm_backend, tag v0.11.0 (commit
6791733e64fe7edd9eda7e0d804d0d04d30fb057, the release of nvcr.io/nvidia/tritonserver:24.07-trtllm-python-py3),
``all_models/inflight_batcher_llm/{ensemble,preprocessing,tensorrt_llm,postprocessing,tensorrt_llm_bls}/config.pbtxt``;
medusa_forge/serve/templates/tensorrtllm_backend_v0.11.0/SOURCE.txt lists their git blob ids (checked
against that tag's tree when this test was written: identical). Parameter names the backend reads come
from the same tag: ``GetParameter<...>("...")`` in inflight_batcher_llm/src/model_instance_state.cc,
``model_config['parameters']`` in the three Python models' ``1/model.py``; the curly ``medusa_choices``
format from ``csvStrToVecVecInt`` in inflight_batcher_llm/src/utils.cc, ported below.

The Medusa engine is a real output of this repository's own pipeline: `convert trtllm` on pycoder-26m
with the random heads fixture, then `build trtllm` with a stand-in for trtllm-build (TensorRT cannot
run here; see tests/test_build_trtllm.py), which writes the manifest a real build writes. The base
engine added beside it is a directory with a hand-made manifest (`convert trtllm` only writes Medusa
checkpoints; a base engine comes from TensorRT-LLM's own examples). The tensorrtllm_backend checkout that `triton-repo` copies the
Python models' ``1/`` directories from is a stand-in too: the pinned templates plus placeholder
``model.py`` files (tritonserver with the TensorRT-LLM backend is not installable here).

Checks, per generated config.pbtxt: it parses with protobuf's text_format into tritonclient's
``ModelConfig`` (Triton's own schema; unknown fields are errors); no ``${...}`` is left; the file is
the upstream template byte for byte except at its placeholders (aligned with a regex built from
the template, which also yields the value filled into each placeholder); every parameter key of the
template is present; and the filled values are the ones asked for on the command line or read from
the engine's manifest.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from medusa_forge.cli import main
from medusa_forge.manifest import EngineManifest
from medusa_forge.serve.trtllm_repo import MODELS, TEMPLATE_DIR
from medusa_forge.tree.choice_tree import ChoiceTree

# Every parameter the v0.11.0 C++ backend reads (GetParameter<..>("..") in inflight_batcher_llm/src/
# model_instance_state.cc and model_state.cc, plus the LoRA cache keys and gpu_device_ids read there by
# name), except enable_trt_overlap (deprecated; commented out in the template) and worker_path (the
# deprecated spelling of executor_worker_path).
TRTLLM_BACKEND_READS = {
    "max_beam_width",
    "gpt_model_type",
    "gpt_model_path",
    "encoder_model_path",
    "max_tokens_in_paged_kv_cache",
    "max_attention_window_size",
    "sink_token_length",
    "batch_scheduler_policy",
    "kv_cache_free_gpu_mem_fraction",
    "kv_cache_host_memory_bytes",
    "kv_cache_onboard_blocks",
    "exclude_input_in_output",
    "cancellation_check_period_ms",
    "stats_check_period_ms",
    "iter_stats_max_iterations",
    "request_stats_max_iterations",
    "enable_kv_cache_reuse",
    "normalize_log_probs",
    "enable_chunked_context",
    "gpu_device_ids",
    "lora_cache_optimal_adapter_size",
    "lora_cache_max_adapter_size",
    "lora_cache_gpu_memory_fraction",
    "lora_cache_host_memory_bytes",
    "decoding_mode",
    "executor_worker_path",
    "medusa_choices",
    "gpu_weights_percent",
}
# What the Python models read from model_config['parameters'] (their 1/model.py at v0.11.0).
PYTHON_MODEL_READS = {
    "preprocessing": {"tokenizer_dir", "add_special_tokens"},
    "postprocessing": {"tokenizer_dir", "skip_special_tokens"},
    "tensorrt_llm_bls": {"accumulate_tokens", "tensorrt_llm_model_name", "tensorrt_llm_draft_model_name"},
}
SMALL = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 0, 0]]  # the `small` tree, as the manifest stores it

STAND_IN = """#!/usr/bin/env python3
# Stand-in for trtllm-build: writes the two kinds of file trtllm-build writes into --output_dir.
import json, os, sys
args = sys.argv[1:]
out = args[args.index("--output_dir") + 1]
with open(os.path.join(out, "config.json"), "w") as f:
    json.dump({"version": "0.11.0", "argv": args}, f)
open(os.path.join(out, "rank0.engine"), "wb").write(b"engine")
"""


def run(argv: list) -> None:
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        assert not e.code, f"{' '.join(map(str, argv))} exited {e.code}"


@pytest.fixture(scope="module")
def engines(model_dir, heads_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trtllm_repo")
    exe = root / "bin" / "trtllm-build"
    exe.parent.mkdir()
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
            root / "ckpt-medusa",
            "--dtype",
            "float16",
            "--max-draft-len",
            "7",
            "--trtllm-version",
            "0.11",
        ]
    )
    run(
        [
            "build",
            "trtllm",
            "--checkpoint-dir",
            root / "ckpt-medusa",
            "--out",
            root / "engine-medusa",
            "--medusa-choices",
            "small",
            "--max-batch-size",
            "8",
            "--trtllm-build",
            exe,
        ]
    )
    # A base engine (TensorRT-LLM's own examples/llama convert + trtllm-build; `convert trtllm` only
    # writes Medusa checkpoints): what that build leaves, with the manifest naming its tokenizer.
    base = root / "engine-base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"version": "0.11.0"}))
    (base / "rank0.engine").write_bytes(b"engine")
    EngineManifest(
        kind="tensorrt_llm",
        dtype="float16",
        medusa_choices=None,
        max_batch_size=8,
        sources={"tokenizer": str(model_dir)},
    ).save(base)
    return {"medusa": root / "engine-medusa", "base": root / "engine-base", "root": root}


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A tensorrtllm_backend v0.11.0 checkout as triton-repo needs it: the five configs (the pinned
    upstream files) and each model's ``1/`` directory (stand-in Python files)."""
    root = tmp_path_factory.mktemp("tensorrtllm_backend") / "tensorrtllm_backend"
    models = root / "all_models" / "inflight_batcher_llm"
    for model in MODELS:
        (models / model / "1").mkdir(parents=True)
        shutil.copyfile(TEMPLATE_DIR / model / "config.pbtxt", models / model / "config.pbtxt")
        if model in ("preprocessing", "postprocessing", "tensorrt_llm_bls"):
            (models / model / "1" / "model.py").write_text(f"# stand-in for tensorrtllm_backend v0.11.0 {model}\n")
    (models / "tensorrt_llm_bls" / "1" / "lib").mkdir()
    (models / "tensorrt_llm_bls" / "1" / "lib" / "decode.py").write_text("# stand-in\n")
    return root


FLAGS = {
    "--max-batch-size": "4",
    "--instances": "2",
    "--kv-cache-free-gpu-mem-fraction": "0.5",
    "--batching-strategy": "inflight_fused_batching",
    "--batch-scheduler-policy": "max_utilization",
    "--max-queue-delay-microseconds": "100",
}


@pytest.fixture(scope="module")
def repo(engines, checkout, model_dir) -> Path:
    """The Medusa engine as `ensemble` (decoupled) plus the base engine added as `base`."""
    out = engines["root"] / "repo"
    flags = [x for kv in FLAGS.items() for x in kv]
    run(
        [
            "triton-repo",
            "--model",
            engines["medusa"],
            "--out",
            out,
            "--tensorrtllm-backend",
            checkout,
            "--tokenizer-dir",
            model_dir,
            "--decoupled",
            *flags,
        ]
    )
    run(
        [
            "triton-repo",
            "--model",
            engines["base"],
            "--out",
            out,
            "--name",
            "base",
            "--tensorrtllm-backend",
            checkout,
            "--tokenizer-dir",
            model_dir,
            "--decoupled",
            "--add",
            *flags,
        ]
    )
    return out


# ---------------------------------------------------------------- helpers
def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def template(model: str) -> str:
    return (TEMPLATE_DIR / model / "config.pbtxt").read_text()


QUOTED_VALUE = r'[^"\n]*'  # inside a string literal
BARE_VALUE = r"[^\s\]]+"  # a number or bool (possibly inside [ ... ])


def fill_values(template_text: str, output: str) -> dict[str, str]:
    """Align ``output`` with ``template_text``: everything outside ``${name}`` must be identical;
    returns name -> the value filled in (a placeholder used twice must get the same value)."""
    pattern, seen = [], set()
    pos = 0
    for m in re.finditer(r"\$\{(\w+)\}", template_text):
        pattern.append(re.escape(template_text[pos : m.start()]))
        name = m.group(1)
        quoted = template_text[m.start() - 1] == '"'
        value = QUOTED_VALUE if quoted else BARE_VALUE
        pattern.append(f"(?P={name})" if name in seen else f"(?P<{name}>{value})")
        seen.add(name)
        pos = m.end()
    pattern.append(re.escape(template_text[pos:]))
    match = re.fullmatch("".join(pattern), output)
    assert match is not None, "the output differs from the template outside its placeholders"
    return match.groupdict()


def template_parameter_keys(template_text: str) -> set[str]:
    live = "\n".join(ln for ln in template_text.splitlines() if not ln.lstrip().startswith("#"))
    keys = set(re.findall(r'^parameters\s*:?\s*\{\s*key\s*:\s*"([^"]+)"', live, flags=re.M))
    assert len(keys) == len(re.findall(r"^parameters\b", live, flags=re.M)), "a parameters block was not read"
    return keys


def params(cfg: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {k: v.string_value for k, v in cfg.parameters.items()}


def csv_str_to_vec_vec_int(s: str) -> list[list[int]]:
    """tensorrtllm_backend v0.11.0 inflight_batcher_llm/src/utils.cc ``csvStrToVecVecInt`` (and
    ``csvStrToVecInt``), line by line: how the backend reads ``medusa_choices``."""
    assert s, "Cannot convert empty string to vector of vector of ints"
    out, pos = [], 0
    while True:
        end = s.find("}", pos)  # getline(ss, substr, '}')
        if end == -1:  # no delimiter: getline hits EOF
            break
        sub, pos = s[pos:end], end + 1
        if not sub:
            break
        if sub[0] == "{":
            sub = sub[1:]
        row = []
        for cell in sub.split(","):  # csvStrToVecInt: ws, getline(ss, substr, ','), stoi
            cell = cell.lstrip()
            if not cell:
                break
            row.append(int(cell))
        assert row, "Empty vector"
        out.append(row)
        while pos < len(s) and s[pos].isspace():  # ss >> std::ws; ignore(.., ','); ss >> std::ws
            pos += 1
        comma = s.find(",", pos)
        pos = len(s) if comma == -1 else comma + 1
        while pos < len(s) and s[pos].isspace():
            pos += 1
    assert out, "Empty vector of vector"
    return out


# ---------------------------------------------------------------- tests
EXPECTED_DIRS = {
    "ensemble": "ensemble",
    "preprocessing": "preprocessing",
    "postprocessing": "postprocessing",
    "tensorrt_llm": "tensorrt_llm",
    "tensorrt_llm_bls": "tensorrt_llm_bls",
}
BASE_DIRS = {"ensemble": "base", "tensorrt_llm": "base_tensorrt_llm", "tensorrt_llm_bls": "base_tensorrt_llm_bls"}


def test_every_config_parses_as_a_triton_model_config_with_no_placeholder_left(repo):
    dirs = sorted(p.name for p in repo.iterdir() if p.is_dir())
    assert dirs == sorted(set(EXPECTED_DIRS.values()) | set(BASE_DIRS.values()))
    for d in dirs:
        text = (repo / d / "config.pbtxt").read_text()
        assert "${" not in text, d
        cfg = parse(text)  # raises on any field ModelConfig does not have
        assert cfg.name == d
        assert cfg.max_batch_size == 4, d


@pytest.mark.parametrize("model", MODELS)
def test_first_engine_configs_are_the_upstream_templates_filled(repo, engines, model_dir, model):
    text = (repo / EXPECTED_DIRS[model] / "config.pbtxt").read_text()
    values = fill_values(template(model), text)
    cfg = parse(text)
    keys = template_parameter_keys(template(model))
    assert keys <= set(cfg.parameters), f"template parameters missing: {sorted(keys - set(cfg.parameters))}"
    assert set(cfg.parameters) == keys  # and nothing of our own added
    assert (TRTLLM_BACKEND_READS if model == "tensorrt_llm" else PYTHON_MODEL_READS.get(model, set())) <= keys
    assert values["triton_max_batch_size"] == "4"
    p = params(cfg)
    if model == "tensorrt_llm":
        assert cfg.backend == "tensorrtllm"
        assert cfg.model_transaction_policy.decoupled is True
        assert list(cfg.dynamic_batching.preferred_batch_size) == [4]
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 100
        assert p["gpt_model_path"] == "../engine-medusa"  # relative to the repository: relocatable
        assert p["gpt_model_type"] == "inflight_fused_batching"
        assert p["batch_scheduler_policy"] == "max_utilization"
        assert float(p["kv_cache_free_gpu_mem_fraction"]) == 0.5
        assert p["max_beam_width"] == "1"
        assert p["decoding_mode"] == "medusa"
        assert csv_str_to_vec_vec_int(p["medusa_choices"]) == SMALL  # what the C++ backend will read
        assert p["medusa_choices"] == EngineManifest.load(engines["medusa"]).extra["medusa_choices_trtllm"]
        assert p["exclude_input_in_output"] == "True"  # text_output is the completion only, as natively
        assert p["encoder_model_path"] == ""  # decoder-only: explicitly empty, not a placeholder
        assert p["FORCE_CPU_ONLY_INPUT_TENSORS"] == "no"  # literal upstream values untouched
        assert p["executor_worker_path"] == "/opt/tritonserver/backends/tensorrtllm/trtllmExecutorWorker"
    elif model in ("preprocessing", "postprocessing"):
        assert (repo / p["tokenizer_dir"]).resolve() == model_dir.resolve()  # --tokenizer-dir, relative
        assert not Path(p["tokenizer_dir"]).is_absolute()
        assert (model_dir / "tokenizer.json").is_file()
        assert [g.count for g in cfg.instance_group] == [2]
        assert p.get("add_special_tokens", p.get("skip_special_tokens")) == "True"
    elif model == "tensorrt_llm_bls":
        assert cfg.model_transaction_policy.decoupled is True
        assert [g.count for g in cfg.instance_group] == [2]
        assert p["tensorrt_llm_model_name"] == "tensorrt_llm" and p["tensorrt_llm_draft_model_name"] == ""
        assert p["accumulate_tokens"] == "False"
    else:  # ensemble: the contract clients call
        steps = [s.model_name for s in cfg.ensemble_scheduling.step]
        assert steps == ["preprocessing", "tensorrt_llm", "postprocessing"]
        assert {i.name for i in cfg.input} >= {"text_input", "max_tokens", "stream", "end_id", "temperature"}
        assert {o.name for o in cfg.output} >= {"text_output"}


def test_an_added_base_engine_gets_its_own_llm_and_bls_models_and_shares_the_tokenizer_models(repo, engines):
    ens = parse((repo / "base" / "config.pbtxt").read_text())
    assert [s.model_name for s in ens.ensemble_scheduling.step] == [
        "preprocessing",
        "base_tensorrt_llm",
        "postprocessing",
    ]
    llm = params(parse((repo / "base_tensorrt_llm" / "config.pbtxt").read_text()))
    assert llm["gpt_model_path"] == "../engine-base"
    assert llm["decoding_mode"] == "top_k_top_p" and llm["medusa_choices"] == ""  # a base engine: no tree
    bls = params(parse((repo / "base_tensorrt_llm_bls" / "config.pbtxt").read_text()))
    assert bls["tensorrt_llm_model_name"] == "base_tensorrt_llm"
    # Renaming touched only the name lines and the ensemble's LLM step; the rest is the template.
    for model, directory in BASE_DIRS.items():
        text = (repo / directory / "config.pbtxt").read_text()
        text = text.replace(f'name: "{directory}"', f'name: "{model}"', 1)
        if model == "ensemble":
            text = text.replace('model_name: "base_tensorrt_llm"', 'model_name: "tensorrt_llm"')
        fill_values(template(model), text)


def test_the_python_models_come_from_the_checkout(repo, checkout):
    for model in ("preprocessing", "postprocessing", "tensorrt_llm_bls", "base_tensorrt_llm_bls"):
        upstream = model.removeprefix("base_")
        src = checkout / "all_models" / "inflight_batcher_llm" / upstream / "1" / "model.py"
        assert (repo / model / "1" / "model.py").read_text() == src.read_text()
    assert (repo / "tensorrt_llm_bls" / "1" / "lib" / "decode.py").is_file()
    assert (repo / "ensemble" / "1").is_dir() and (repo / "tensorrt_llm" / "1").is_dir()


def test_the_repository_record_is_what_the_files_say(repo, engines):
    info = json.loads((repo / "medusa_forge_repo.json").read_text())
    by_name = {m["name"]: m for m in info["models"]}
    assert set(by_name) == {"ensemble", "base"}
    med = by_name["ensemble"]
    assert (med["kind"], med["use_medusa"], med["decoupled"], med["max_batch_size"]) == ("tensorrt_llm", True, True, 4)
    assert med["details"]["tensorrtllm_backend"]["version"] == "v0.11.0"
    assert med["details"]["tensorrtllm_backend"]["commit"] == "6791733e64fe7edd9eda7e0d804d0d04d30fb057"
    for model, values in med["details"]["fill_template"].items():
        filled = fill_values(template(model), (repo / EXPECTED_DIRS[model] / "config.pbtxt").read_text())
        assert {k: values[k] for k in filled} == filled, model  # the audit record matches the files
    assert ChoiceTree.from_paths(SMALL).to_trtllm() == med["details"]["fill_template"]["tensorrt_llm"]["medusa_choices"]


def test_a_batch_size_above_the_engines_is_refused(engines, checkout, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "triton-repo",
                "--model",
                str(engines["medusa"]),
                "--out",
                str(tmp_path / "r"),
                "--tensorrtllm-backend",
                str(checkout),
                "--max-batch-size",
                "16",
            ]
        )
    assert exc.value.code == 2
    assert "--max-batch-size 16 exceeds the engine's max_batch_size 8" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_without_tokenizer_dir_the_manifests_sources_name_it(engines, checkout, tmp_path):
    out = tmp_path / "repo"
    run(["triton-repo", "--model", engines["medusa"], "--out", out, "--tensorrtllm-backend", checkout])
    sources = EngineManifest.load(engines["medusa"]).sources
    for model in ("preprocessing", "postprocessing"):
        cfg = parse((out / model / "config.pbtxt").read_text())
        assert (out / params(cfg)["tokenizer_dir"]).resolve() == Path(sources["checkpoint"]).resolve()
        assert cfg.max_batch_size == 8  # the engine's, when --max-batch-size is not given
    assert (Path(sources["checkpoint"]) / "tokenizer.json").is_file()
    llm = parse((out / "tensorrt_llm" / "config.pbtxt").read_text())
    assert llm.model_transaction_policy.decoupled is False  # not --decoupled
    assert params(llm)["kv_cache_free_gpu_mem_fraction"] == "0.9"  # the backend's default
