"""Target profiles: the TensorRT-LLM releases whose Medusa formats we write (``--trtllm-version``).

A profile fixes everything that differs between releases: the checkpoint ``config.json`` fields, the
``trtllm-build`` flags, the Triton backend templates, the NGC container, and which model families its
Medusa converter takes. Two are kept:

- **0.11** — TensorRT-LLM 0.11.0 (commit 05316d3313360012536ace46c781518f5afae75e) in
  ``nvcr.io/nvidia/tritonserver:24.07-trtllm-python-py3`` with tensorrtllm_backend v0.11.0. Llama/Mistral
  with no or linear RoPE scaling (its Llama refuses llama3 scaling).
- **1.2** (default) — TensorRT-LLM 1.2.1, the last release that builds Medusa engines with the TensorRT
  backend *and* ships in an NGC Triton container: the Triton compatibility matrix
  (triton-inference-server/server ``docs/introduction/compatibility.md``, "Container Name:
  trtllm-python-py3") lists TensorRT-LLM 1.2.1 for 26.04 through 26.07 and no trtllm container after 26.07;
  tensorrtllm_backend PR #853 ("upgrade TensorRT-LLM to v1.2.1", Dockerfile ``TENSORRTLLM_REPO_TAG=
  release/1.2.1``) builds it. TensorRT-LLM then removed the TensorRT engine flow (NVIDIA/TensorRT-LLM
  PR #11723 deprecation warnings on trtllm-build/convert_checkpoint; PR #15907 removes the
  inflight_batcher_llm C++ backend; docs "Migration Guide: TensorRT Backend Removed"), and 1.3 has no
  Triton trtllm container. Sources read (NVIDIA/TensorRT-LLM, stored copies of the release/1.x line; the
  repository snapshot is too large to fetch whole here, so each is cited by the commit it was read at):
  ``examples/medusa/convert_checkpoint.py`` @b93e14ca093e446615f3009cae6ca5a33c4f2f56 (config keys:
  ``model_type`` from the HF config, ``qwen_type`` for qwen2, no ``share_embedding_table``; ``--model_type
  {llama,mixtral,qwen2}``), ``tensorrt_llm/models/medusa/config.py`` @084a8843ce92c0d349a90e0d4f8ed1232fe8ddbb
  (``MedusaConfig`` wraps ``QWenConfig`` when ``'qwen' in model_type`` else ``LLaMAConfig``),
  ``tensorrt_llm/commands/build.py`` @008b2b8d23af95e4e19fa6f354f9c5f6349b2bfc (``--kv_cache_type
  {continuous,paged,disabled}``; ``--paged_kv_cache`` "Deprecated"; ``--speculative_decoding_mode
  {draft_tokens_external,lookahead_decoding,medusa,explicit_draft_tokens,eagle}``; ``--max_draft_len``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from medusa_forge.errors import ForgeError


@dataclass(frozen=True)
class TrtllmProfile:
    name: str  # what --trtllm-version takes
    version: str  # tensorrt_llm release
    commit: str  # the source commit the formats are checked against (see module docstring)
    triton_tag: str  # nvcr.io/nvidia/tritonserver:<tag>-trtllm-python-py3
    image_python: str
    image_torch: str
    tritonclient: str  # the image's Triton release's client, pinned in the Dockerfile
    templates: str  # folder under serve/templates/
    architectures: tuple[str, ...]  # HF architectures its Medusa converter takes
    rope_types: tuple[str, ...]  # HF rope_scaling types its Llama/Qwen configs take
    kv_cache_flag: tuple[str, ...]  # how the paged KV cache is asked for
    build_flags: frozenset[str]  # every trtllm-build flag we pass, all accepted by that release
    model_type_field: bool  # config.json carries model_type (and qwen_type for qwen2)
    share_embedding_table_field: bool

    @property
    def image(self) -> str:
        return f"nvcr.io/nvidia/tritonserver:{self.triton_tag}-trtllm-python-py3"

    def check_model(self, architecture: str, rope_type: str | None, source: str) -> None:
        if architecture not in self.architectures:
            raise ForgeError(
                f"{source}: architecture {architecture!r} has no Medusa converter in TensorRT-LLM "
                f"{self.version} (takes {', '.join(self.architectures)}); try --trtllm-version "
                f"{'1.2' if self.name == '0.11' else '0.11'} or the native engine"
            )
        if rope_type and rope_type not in self.rope_types:
            raise ForgeError(
                f"{source}: rope scaling {rope_type!r} is not supported by TensorRT-LLM {self.version}'s "
                f"Medusa model (takes {', '.join(self.rope_types)}); "
                + ("use --trtllm-version 1.2" if self.name == "0.11" else "use the native engine")
            )


_COMMON_FLAGS = (
    "--checkpoint_dir",
    "--output_dir",
    "--speculative_decoding_mode",
    "--max_draft_len",
    "--gemm_plugin",
    "--gpt_attention_plugin",
    "--remove_input_padding",
    "--max_batch_size",
    "--max_input_len",
    "--max_seq_len",
    "--max_num_tokens",
    "--workers",
)

PROFILES = {
    "0.11": TrtllmProfile(
        name="0.11",
        version="0.11.0",
        commit="05316d3313360012536ace46c781518f5afae75e",
        triton_tag="24.07",
        image_python="3.10.12",
        image_torch="2.4.0a0+07cecf4168.nv24.5",
        tritonclient="2.48.0",
        templates="tensorrtllm_backend_v0.11.0",
        architectures=("LlamaForCausalLM", "MistralForCausalLM"),
        rope_types=("linear",),
        kv_cache_flag=("--paged_kv_cache", "enable"),
        build_flags=frozenset(_COMMON_FLAGS + ("--paged_kv_cache",)),
        model_type_field=False,
        share_embedding_table_field=True,
    ),
    "1.2": TrtllmProfile(
        name="1.2",
        version="1.2.1",
        commit="b93e14ca093e446615f3009cae6ca5a33c4f2f56",
        triton_tag="26.07",
        image_python="3.12.3",
        image_torch="2.10.0a0+b4e4ee81d3.nv25.12",
        tritonclient="2.72.0",
        templates="tensorrt_llm_v1.2.1",
        architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
        rope_types=("linear", "llama3"),
        kv_cache_flag=("--kv_cache_type", "paged"),
        build_flags=frozenset(_COMMON_FLAGS + ("--kv_cache_type",)),
        model_type_field=True,
        share_embedding_table_field=False,
    ),
}
DEFAULT_PROFILE = "1.2"


def get_profile(name: str | None) -> TrtllmProfile:
    """``name``, else $MEDUSA_FORGE_TRTLLM (the Dockerfile sets its image's release), else the default."""
    name = (os.environ.get("MEDUSA_FORGE_TRTLLM") or DEFAULT_PROFILE) if name is None else str(name)
    for key, profile in PROFILES.items():
        if name in (key, profile.version, f"v{profile.version}"):
            return profile
    raise ForgeError(
        f"--trtllm-version {name!r}: choose {' or '.join(PROFILES)} (the releases whose Medusa formats are pinned)"
    )


def profile_of_config(d: dict) -> TrtllmProfile:
    """The profile a checkpoint config.json was written for: 1.x configs carry ``model_type``."""
    return PROFILES["1.2"] if "model_type" in d else PROFILES["0.11"]
