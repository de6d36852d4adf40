"""tensorrtllm_backend's ``inflight_batcher_llm`` repository for a TensorRT-LLM Medusa engine.

Two template sets, one per target release (``convert.trtllm_profiles``), picked by the engine's manifest:
**1.2** — TensorRT-LLM 1.2.1, whose templates live in the TensorRT-LLM repository under
``triton_backend/all_models/inflight_batcher_llm/`` (tensorrtllm_backend became a submodule wrapper in
May 2025); they ship in ``templates/tensorrt_llm_v1.2.1/`` (SOURCE.txt: where each was read) and add
placeholders 0.11 did not have (``logits_datatype``, ``max_queue_size``, ``engine_dir`` in preprocessing,
``tokenizer_dir`` in tensorrt_llm, ...), every one filled. **0.11** — as below.

Paths are written relative to the repository (``repo_dir``), so a repository moved with its engine, or
mounted elsewhere, still loads: tritonserver resolves them against its working directory, and
``serve.tritonserver`` starts it in the repository (by hand: ``cd REPO && tritonserver --model-repository .``).

Pinned release (0.11 profile): tensorrtllm_backend **v0.11.0** (commit 6791733e64fe7edd9eda7e0d804d0d04d30fb057), the
one matching TensorRT-LLM 0.11.0 in ``nvcr.io/nvidia/tritonserver:24.07-trtllm-python-py3``; later
TensorRT-LLM releases serve Medusa through other flows. Its five ``config.pbtxt`` templates ship
verbatim in ``templates/tensorrtllm_backend_v0.11.0/`` and are checked by git blob id.

What "generated" means here is exactly the upstream recipe (README "Prepare the model repository",
docs/llama.md): ``cp -r all_models/inflight_batcher_llm/* repo/`` and ``tools/fill_template.py -i``
on each config, whose whole logic is ``string.Template(text).safe_substitute(values)``. We apply that
substitution with a value for *every* placeholder (so no ``${`` survives and nothing is left to the
backend's "invalid parameter, using default" fallback), and take the Python models' ``1/``
directories from a tensorrtllm_backend checkout of the same release.

Values we choose, with the reason (parameter table: v0.11.0 README.md):
- ``decoding_mode: medusa`` and ``medusa_choices`` in the curly form ``{0}, {0, 0}, ...`` listing every
  node (parsed by ``utils::csvStrToVecVecInt`` in inflight_batcher_llm/src/utils.cc). Note v0.11.0's
  fill_template.py splits its argument on every ``,`` and ``:``, so this value cannot be passed
  through that script at all (escaping ``\\,`` arrived in later releases); we substitute directly.
- ``exclude_input_in_output: True`` so ``text_output`` is the completion only, as from the native model.
- ``batching_strategy: inflight_fused_batching``, ``batch_scheduler_policy: guaranteed_no_evict``,
  ``max_beam_width: 1`` (Medusa decodes greedily per request), ``kv_cache_free_gpu_mem_fraction: 0.9``
  (the backend's default; the examples use 0.5 to leave room for a second process).
- Optional knobs without a value (``max_tokens_in_paged_kv_cache``, ``gpu_device_ids``, LoRA cache sizes,
  ...) are filled with ``""``: the C++ backend parses them exactly as it parses an unfilled
  ``${...}`` — the conversion fails and it keeps its default — but the file no longer carries a
  placeholder that looks like a forgotten setting.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from string import Template

from medusa_forge.errors import ForgeError
from medusa_forge.serve.native_repo import check_model_name, pbtxt_string

BACKEND_VERSION = "v0.11.0"
BACKEND_COMMIT = "6791733e64fe7edd9eda7e0d804d0d04d30fb057"
TEMPLATES = Path(__file__).parent / "templates"
TEMPLATE_DIR = TEMPLATES / f"tensorrtllm_backend_{BACKEND_VERSION}"
MODELS = ("ensemble", "preprocessing", "tensorrt_llm", "postprocessing", "tensorrt_llm_bls")
# git blob ids of all_models/inflight_batcher_llm/<model>/config.pbtxt at v0.11.0
TEMPLATE_BLOBS = {
    "ensemble": "eca2586353b777a914b24b3f11362db68cf19fa8",
    "preprocessing": "165134c471d9f2626a42506bd2628b9aab915d15",
    "postprocessing": "aaecb1340203fa263ad3803ddbb792a8605f52f0",
    "tensorrt_llm": "fd6c6d0163dd18ce58b56eff54690ac5fa8b6efa",
    "tensorrt_llm_bls": "ba0fa585ebfffb82d90ed7b845e0bf74210aaad7",
}


@dataclass(frozen=True)
class TemplateSet:
    profile: str
    version: str  # the release the templates belong to
    source: str  # where upstream keeps them, and how to get them
    directory: Path
    blobs: dict[str, str]


TEMPLATE_SETS = {
    "0.11": TemplateSet(
        "0.11",
        BACKEND_VERSION,
        "git clone -b v0.11.0 https://github.com/triton-inference-server/tensorrtllm_backend",
        TEMPLATE_DIR,
        TEMPLATE_BLOBS,
    ),
    "1.2": TemplateSet(
        "1.2",
        "v1.2.1",
        "TensorRT-LLM v1.2.1 triton_backend/all_models/inflight_batcher_llm (in the "
        "26.07 image: /app/all_models/inflight_batcher_llm)",
        TEMPLATES / "tensorrt_llm_v1.2.1",
        {
            "ensemble": "c07a5ab6de444e3ded5d02d81d03eba00443f123",
            "preprocessing": "0b3f054cea0f4526e0e42bd9b297d6d8a1903819",
            "postprocessing": "9f3655ef4d78fc0631db9899c03041300f86b00f",
            "tensorrt_llm": "f5f6cb41a4b8c5644a663abcbebfb6a4d4f3e2f7",
            "tensorrt_llm_bls": "7f38bf903a6a301fc415a172c5972ffc6c04e20e",
        },
    ),
}
BACKEND_DIR_CANDIDATES = ("/opt/tensorrtllm_backend", "/tensorrtllm_backend", "/app")
PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


def git_blob_id(data: bytes) -> str:
    """The id git gives a file's content (``git hash-object``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def template_text(model: str, profile: str = "0.11") -> str:
    tset = TEMPLATE_SETS[profile]
    path = tset.directory / model / "config.pbtxt"
    data = path.read_bytes()
    if git_blob_id(data) != tset.blobs[model]:
        raise ForgeError(f"{path} is not TensorRT-LLM {tset.version}'s template (modified install?)")
    return data.decode()


def engine_profile(engine_dir: Path) -> str:
    """The target release an engine was built for (its manifest; engines from before profiles are 0.11)."""
    from medusa_forge.manifest import MANIFEST_NAME, EngineManifest

    if not (Path(engine_dir) / MANIFEST_NAME).is_file():
        return "1.2"
    return str((EngineManifest.load(engine_dir).extra or {}).get("trtllm_profile", "0.11"))


def placeholders(text: str) -> set[str]:
    return set(PLACEHOLDER.findall(text))


def _bool(value: bool) -> str:
    return "True" if value else "False"


@dataclass
class TrtllmRepoParams:
    """Everything the five templates ask for; ``substitutions()`` turns it into fill_template values."""

    engine_dir: Path
    tokenizer_dir: Path
    triton_max_batch_size: int
    decoupled: bool = False
    medusa_choices: str | None = None  # curly form; None: a base (non-Medusa) engine
    instances: int = 1  # preprocessing / postprocessing / BLS instance count
    batching_strategy: str = "inflight_fused_batching"
    batch_scheduler_policy: str = "guaranteed_no_evict"
    kv_cache_free_gpu_mem_fraction: float = 0.9
    max_queue_delay_microseconds: int = 0
    max_tokens_in_paged_kv_cache: int | None = None
    max_attention_window_size: int | None = None
    enable_kv_cache_reuse: bool = False
    exclude_input_in_output: bool = True
    repo_dir: Path | None = None  # paths are written relative to it (a relocatable repository)
    profile: str | None = None  # template set; None: the engine's
    dtype: str = "float16"  # the engine's activation dtype (1.2: prompt_embedding_table_data_type)

    @property
    def templates(self) -> str:
        return self.profile or engine_profile(self.engine_dir)

    def path(self, p: Path) -> str:
        return os.path.relpath(Path(p).absolute(), self.repo_dir) if self.repo_dir else str(p)

    def check(self) -> None:
        if self.triton_max_batch_size < 1:
            raise ForgeError(f"--max-batch-size must be >= 1, got {self.triton_max_batch_size}")
        if self.instances < 1:
            raise ForgeError(f"--instances must be >= 1, got {self.instances}")
        if not 0.0 < self.kv_cache_free_gpu_mem_fraction <= 1.0:
            raise ForgeError(
                f"--kv-cache-free-gpu-mem-fraction must be in (0, 1], got {self.kv_cache_free_gpu_mem_fraction}"
            )
        strategies = (
            ("inflight_fused_batching",)
            if self.templates == "1.2"
            else ("inflight_fused_batching", "inflight_batching", "V1")
        )  # 1.x's backend runs only the fused one
        if self.batching_strategy not in strategies:
            raise ForgeError(
                f"--batching-strategy {self.batching_strategy!r}: TensorRT-LLM "
                f"{TEMPLATE_SETS[self.templates].version} takes {' or '.join(strategies)}"
            )
        if self.batch_scheduler_policy not in ("guaranteed_no_evict", "max_utilization"):
            raise ForgeError(
                f"--batch-scheduler-policy {self.batch_scheduler_policy!r}: choose guaranteed_no_evict "
                "or max_utilization"
            )
        for what, path in (("engine dir", self.engine_dir), ("tokenizer dir", self.tokenizer_dir)):
            pbtxt_string(str(path), what)

    def substitutions(self) -> dict[str, dict[str, str]]:
        """Per model, the ``key: value`` pairs one would pass to fill_template.py."""

        def opt(v) -> str:
            return "" if v is None else str(v)

        batch = str(self.triton_max_batch_size)
        count = str(self.instances)
        tokenizer, engine = self.path(self.tokenizer_dir), self.path(self.engine_dir)
        out = {
            "ensemble": {"triton_max_batch_size": batch},
            "preprocessing": {
                "tokenizer_dir": tokenizer,
                "triton_max_batch_size": batch,
                "preprocessing_instance_count": count,
                "add_special_tokens": "True",
            },
            "postprocessing": {
                "tokenizer_dir": tokenizer,
                "triton_max_batch_size": batch,
                "postprocessing_instance_count": count,
                "skip_special_tokens": "True",
            },
            "tensorrt_llm_bls": {
                "triton_max_batch_size": batch,
                "decoupled_mode": _bool(self.decoupled),
                "bls_instance_count": count,
                "accumulate_tokens": "False",
                "tensorrt_llm_model_name": "tensorrt_llm",
                "tensorrt_llm_draft_model_name": "",
            },
            "tensorrt_llm": {
                "triton_backend": "tensorrtllm",
                "triton_max_batch_size": batch,
                "decoupled_mode": _bool(self.decoupled),
                "max_queue_delay_microseconds": str(self.max_queue_delay_microseconds),
                "max_beam_width": "1",
                "batching_strategy": self.batching_strategy,
                "engine_dir": engine,
                "encoder_engine_dir": "",
                "max_tokens_in_paged_kv_cache": opt(self.max_tokens_in_paged_kv_cache),
                "max_attention_window_size": opt(self.max_attention_window_size),
                "sink_token_length": "",
                "batch_scheduler_policy": self.batch_scheduler_policy,
                "kv_cache_free_gpu_mem_fraction": str(self.kv_cache_free_gpu_mem_fraction),
                "kv_cache_host_memory_bytes": "",
                "kv_cache_onboard_blocks": "",
                "enable_trt_overlap": "False",  # deprecated; only inside a comment of the template
                "exclude_input_in_output": _bool(self.exclude_input_in_output),
                "cancellation_check_period_ms": "100",
                "stats_check_period_ms": "100",
                "iter_stats_max_iterations": "",
                "request_stats_max_iterations": "",
                "enable_kv_cache_reuse": _bool(self.enable_kv_cache_reuse),
                "normalize_log_probs": "True",
                "enable_chunked_context": "False",
                "gpu_device_ids": "",
                "lora_cache_optimal_adapter_size": "",
                "lora_cache_max_adapter_size": "",
                "lora_cache_gpu_memory_fraction": "",
                "lora_cache_host_memory_bytes": "",
                "decoding_mode": "medusa" if self.medusa_choices else "top_k_top_p",
                "medusa_choices": self.medusa_choices or "",
                "gpu_weights_percent": "1.0",
            },
        }
        if self.templates == "1.2":
            self._add_1_2(out, tokenizer, engine)
        return out

    def _add_1_2(self, out: dict[str, dict[str, str]], tokenizer: str, engine: str) -> None:
        """The placeholders 1.2.1's templates added: types where Triton needs a type, the queue bound where it
        needs an integer (0: unbounded), "" (the backend's default) for features a Medusa engine does not use."""
        logits, delay = "TYPE_FP32", str(self.max_queue_delay_microseconds)  # our checkpoints' logits_dtype
        table = "TYPE_BF16" if self.dtype in ("bfloat16", "bf16") else "TYPE_FP16"
        out["ensemble"]["logits_datatype"] = logits
        out["tensorrt_llm_bls"].update(logits_datatype=logits, multimodal_encoders_name="")
        out["preprocessing"].update(
            engine_dir=engine,
            hf_model_path="",
            max_num_images="",
            multimodal_model_path="",
            max_queue_delay_microseconds=delay,
            max_queue_size="0",
        )
        out["tensorrt_llm"].update(
            logits_datatype=logits,
            encoder_input_features_data_type="TYPE_FP16",
            prompt_embedding_table_data_type=table,
            max_queue_size="0",
            tokenizer_dir=tokenizer,
            **dict.fromkeys(
                (
                    "cross_kv_cache_fraction",
                    "participant_ids",
                    "num_nodes",
                    "lora_prefetch_dir",
                    "lookahead_window_size",
                    "lookahead_ngram_size",
                    "lookahead_verification_set_size",
                    "eagle_choices",
                    "enable_context_fmha_fp32_acc",
                    "multi_block_mode",
                    "cuda_graph_mode",
                    "cuda_graph_cache_size",
                    "speculative_decoding_fast_logits",
                    "guided_decoding_backend",
                    "xgrammar_tokenizer_info_path",
                ),
                "",
            ),
        )


def fill(template: str, values: dict[str, str], model: str) -> str:
    """fill_template.py's substitution, plus the checks it lacks: every placeholder gets a value."""
    missing = placeholders(template) - set(values)
    extra = set(values) - placeholders(template)
    if missing or extra:
        raise ForgeError(
            f"{model}/config.pbtxt: placeholders {sorted(missing)} have no value and values "
            f"{sorted(extra)} have no placeholder (template of another release?)"
        )
    text = Template(template).safe_substitute(values)
    if "${" in text:
        raise ForgeError(f"{model}/config.pbtxt: a ${{...}} placeholder survived filling")
    return text


@dataclass(frozen=True)
class TrtllmNames:
    """Model names of one TensorRT-LLM engine in a repository.

    The first engine of a repository gets upstream's layout unchanged (only the ensemble takes
    ``--name``). A second engine added with ``triton-repo --add`` (e.g. the base engine beside the
    Medusa one, so one server hosts both) shares ``preprocessing`` and ``postprocessing`` (same
    tokenizer; v0.11.0's BLS model hard-codes those two names) and gets its own
    ``<name>_tensorrt_llm`` and ``<name>_tensorrt_llm_bls``.
    """

    ensemble: str
    tensorrt_llm: str = "tensorrt_llm"
    bls: str = "tensorrt_llm_bls"
    shared: bool = False  # True: preprocessing/postprocessing already in the repository

    @classmethod
    def for_model(cls, name: str, first: bool) -> TrtllmNames:
        check_model_name(name)
        if first:
            return cls(name)
        return cls(name, f"{name}_tensorrt_llm", f"{name}_tensorrt_llm_bls", shared=True)

    def directories(self) -> dict[str, str]:
        """template model -> directory written for it."""
        out = {"ensemble": self.ensemble, "tensorrt_llm": self.tensorrt_llm, "tensorrt_llm_bls": self.bls}
        if not self.shared:
            out.update({"preprocessing": "preprocessing", "postprocessing": "postprocessing"})
        return out


def _rename(text: str, pattern: str, replacement: str, model: str) -> str:
    new, count = re.subn(pattern, replacement, text, count=1, flags=re.M)
    if count != 1:
        raise ForgeError(f"{model}/config.pbtxt: {pattern!r} not found (template of another release?)")
    return new


def render_configs(params: TrtllmRepoParams, names: TrtllmNames | None = None) -> dict[str, str]:
    """directory -> filled config.pbtxt text. Renaming only touches ``name:`` lines and the
    ensemble's reference to its LLM model; everything else is the filled template."""
    names = names or TrtllmNames("ensemble")
    params.check()
    subs = params.substitutions()
    subs["tensorrt_llm_bls"]["tensorrt_llm_model_name"] = names.tensorrt_llm
    out = {}
    for model, directory in names.directories().items():
        text = fill(template_text(model, params.templates), subs[model], model)
        if directory != model:
            text = _rename(text, rf'^name: "{model}"$', f"name: {pbtxt_string(directory, '--name')}", model)
        if model == "ensemble" and names.tensorrt_llm != "tensorrt_llm":
            text = _rename(text, r'^(\s*)model_name: "tensorrt_llm"$', rf'\1model_name: "{names.tensorrt_llm}"', model)
        out[directory] = text
    return out


def find_backend_checkout(explicit: str | Path | None) -> Path:
    """``all_models/inflight_batcher_llm`` of a tensorrtllm_backend (0.11) or TensorRT-LLM (1.2,
    ``triton_backend/``) checkout (--tensorrtllm-backend, $TENSORRTLLM_BACKEND_DIR, /opt/tensorrtllm_backend,
    /tensorrtllm_backend, /app)."""
    candidates = [explicit] if explicit else [os.environ.get("TENSORRTLLM_BACKEND_DIR"), *BACKEND_DIR_CANDIDATES]
    for c in filter(None, candidates):
        for root in (
            Path(c),
            Path(c) / "all_models" / "inflight_batcher_llm",
            Path(c) / "triton_backend" / "all_models" / "inflight_batcher_llm",
        ):
            if (root / "tensorrt_llm" / "config.pbtxt").is_file() and (root / "preprocessing").is_dir():
                return root
        if explicit:
            raise ForgeError(
                f"--tensorrtllm-backend {explicit}: no all_models/inflight_batcher_llm/ with the five "
                "models found there"
            )
    raise ForgeError(
        "a TensorRT-LLM repository needs the backend's Python models: for a 1.2 engine "
        f"{TEMPLATE_SETS['1.2'].source}; for 0.11 {TEMPLATE_SETS['0.11'].source}; pass "
        "--tensorrtllm-backend DIR"
    )


def write_trtllm_models(params: TrtllmRepoParams, repo: Path, checkout: Path, names: TrtllmNames | None = None) -> None:
    """Write the filled configs into ``repo`` with each model's ``1/`` directory from ``checkout``
    (the Python models of preprocessing, postprocessing and the BLS; tensorrt_llm's is unused with
    ``backend: "tensorrtllm"`` but copied, as upstream's recipe does)."""
    names = names or TrtllmNames("ensemble")
    configs = render_configs(params, names)
    tset = TEMPLATE_SETS[params.templates]
    for model, directory in names.directories().items():
        src = checkout / model
        blob = git_blob_id((src / "config.pbtxt").read_bytes()) if (src / "config.pbtxt").is_file() else None
        if blob != tset.blobs[model]:
            raise ForgeError(
                f"{src}/config.pbtxt is not TensorRT-LLM {tset.version}'s (the engine's release); use "
                f"{tset.source} (its Python models must match the configs we fill)"
            )
        dst = repo / directory
        dst.mkdir(parents=True)
        if (src / "1").is_dir():
            shutil.copytree(src / "1", dst / "1", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (dst / "1").mkdir()
        (dst / "config.pbtxt").write_text(configs[directory])
