"""``medusa-forge build trtllm``: run ``trtllm-build`` on a converted checkpoint, add our manifest.

The command is the one TensorRT-LLM's Medusa example uses, with every size made explicit. Pinned
release: TensorRT-LLM **0.11.0** (commit 05316d3313360012536ace46c781518f5afae75e, the one
``medusa_forge.convert.trtllm_config`` pins), shipped in ``nvcr.io/nvidia/tritonserver:24.07-trtllm-
python-py3`` (the Dockerfile's base) beside tensorrtllm_backend v0.11.0. Sources (NVIDIA/TensorRT-LLM):

- ``examples/medusa/README.md``: ``trtllm-build --checkpoint_dir .. --output_dir .. --gemm_plugin float16
  --speculative_decoding_mode medusa --max_batch_size 4``; for the FP8-base checkpoint of
  ``examples/quantization/quantize.py --qformat fp8 --medusa_model_dir ..`` the same plus
  ``--gpt_attention_plugin float16`` (gemm plugin in the activation dtype, not fp8).
- ``tensorrt_llm/commands/build.py`` (0.11 line): ``--checkpoint_dir --output_dir --workers
  --max_batch_size --max_input_len --max_seq_len --max_num_tokens --max_draft_len
  --speculative_decoding_mode {draft_tokens_external,lookahead_decoding,medusa}`` and the plugin
  flags of ``tensorrt_llm/plugin/plugin.py`` (``--gemm_plugin --gpt_attention_plugin --paged_kv_cache
  --remove_input_padding``: ``enable``/``disable`` or a dtype).
- ``tensorrt_llm/builder.py`` ``build()`` (0.11 line): for a model whose config has ``max_draft_len``
  (``MedusaForCausalLM``) the *checkpoint's* ``max_draft_len`` overwrites the build flag and the mode
  is forced to medusa; ``max_seq_len`` is then grown by ``max_draft_len``, and ``max_num_tokens`` is
  raised to at least ``max_batch_size * (max_draft_len + 1)``.

Hence ``--max_draft_len`` is passed as the checkpoint's value (the flag could not change it), the tree
is checked against it (nodes <= max_draft_len, depth <= heads), and the tree itself — a runtime setting
of the tensorrtllm backend (``medusa_choices``) — is recorded in the manifest for ``triton-repo``.
"""

from __future__ import annotations

import importlib.metadata
import json
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medusa_forge import __version__
from medusa_forge.atomic import atomic_output_dir
from medusa_forge.convert.trtllm_checkpoint import TOKENIZER_FILES
from medusa_forge.convert.trtllm_config import DEFAULT_TREE, CheckpointConfig, read_config
from medusa_forge.errors import ForgeError
from medusa_forge.manifest import MANIFEST_NAME, EngineManifest, read_tree, sha256_file
from medusa_forge.tree.choice_tree import ChoiceTree

GEMM_PLUGIN_CHOICES = ("auto", "float16", "bfloat16", "float32", "fp8", "disable")
DEFAULT_MAX_SEQ_LEN = 2048
DEFAULT_MAX_INPUT_LEN = 1024


@dataclass
class TrtllmBuildConfig:
    checkpoint_dir: Path
    out_dir: Path
    tree: str | None = None  # preset | JSON file (a native engine's medusa_forge.json works) | JSON list
    max_batch_size: int = 8
    max_input_len: int | None = None
    max_seq_len: int | None = None
    max_num_tokens: int | None = None
    gemm_plugin: str | None = None  # default: the checkpoint's activation dtype
    dry_run: bool = False
    overwrite: bool = False
    trtllm_build: str = "trtllm-build"


@dataclass(frozen=True)
class TrtllmPlan:
    """Everything the command and the manifest need, validated before anything runs."""

    checkpoint: CheckpointConfig
    tree: ChoiceTree
    tree_stats: dict
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    gemm_plugin: str

    @property
    def dtype(self) -> str:
        """The checkpoint's activation dtype (float16 | bfloat16); FP8 checkpoints keep one too."""
        return self.checkpoint.spec.dtype

    @property
    def engine_dtype(self) -> str:
        """Our manifest's dtype name: ``fp8`` for an FP8-quantized checkpoint, else the dtype."""
        return "fp8" if self.checkpoint.spec.fp8 else self.dtype

    def command(self, output_dir: str | Path, trtllm_build: str = "trtllm-build") -> list[str]:
        """The checkpoint's release's flags (its profile): 1.2 asks for the paged KV cache with
        ``--kv_cache_type paged`` (``--paged_kv_cache`` is deprecated there), 0.11 with ``--paged_kv_cache``."""
        profile = self.checkpoint.profile
        cmd = [
            trtllm_build,
            "--checkpoint_dir",
            str(self.checkpoint.directory),
            "--output_dir",
            str(output_dir),
            "--speculative_decoding_mode",
            "medusa",
            "--max_draft_len",
            str(self.checkpoint.max_draft_len),
            "--gemm_plugin",
            self.gemm_plugin,
            "--gpt_attention_plugin",
            self.dtype,
            *profile.kv_cache_flag,
            "--remove_input_padding",
            "enable",
            "--max_batch_size",
            str(self.max_batch_size),
            "--max_input_len",
            str(self.max_input_len),
            "--max_seq_len",
            str(self.max_seq_len),
            "--max_num_tokens",
            str(self.max_num_tokens),
            "--workers",
            str(self.checkpoint.spec.tp_size),
        ]
        unknown = [a for a in cmd[1::2] if a not in profile.build_flags]
        if unknown:  # a bug: every flag must be one that release's trtllm-build takes
            raise RuntimeError(f"flags {unknown} are not accepted by trtllm-build {profile.version}")
        return cmd


def plan_build(cfg: TrtllmBuildConfig) -> TrtllmPlan:
    """Validate the checkpoint, the tree and the sizes (one-line ForgeErrors)."""
    ckpt = read_config(cfg.checkpoint_dir)
    missing = [ckpt.rank_file(r).name for r in range(ckpt.spec.tp_size) if not ckpt.rank_file(r).is_file()]
    if missing:
        raise ForgeError(
            f"{ckpt.directory}: {missing[0]} missing (tp_size {ckpt.spec.tp_size}); the checkpoint is incomplete"
        )
    tree, stats = resolve_tree(cfg.tree, ckpt)
    positions = int(ckpt.raw.get("max_position_embeddings") or DEFAULT_MAX_SEQ_LEN)
    max_seq_len = cfg.max_seq_len or min(DEFAULT_MAX_SEQ_LEN, positions)
    if max_seq_len > positions:
        raise ForgeError(f"--max_seq_len {max_seq_len} exceeds the model's max_position_embeddings ({positions})")
    max_input_len = cfg.max_input_len or min(DEFAULT_MAX_INPUT_LEN, max_seq_len - 1)
    if cfg.max_batch_size < 1:
        raise ForgeError(f"--max_batch_size must be >= 1, got {cfg.max_batch_size}")
    if not 1 <= max_input_len < max_seq_len:
        raise ForgeError(f"--max_input_len ({max_input_len}) must be >= 1 and below --max_seq_len ({max_seq_len})")
    # One step may hold a whole context plus one tree (max_draft_len + 1 tokens) per other request.
    max_num_tokens = cfg.max_num_tokens or max_input_len + cfg.max_batch_size * (ckpt.max_draft_len + 1)
    if max_num_tokens < max_input_len:
        raise ForgeError(f"--max_num_tokens ({max_num_tokens}) must be >= --max_input_len ({max_input_len})")
    gemm = cfg.gemm_plugin or ckpt.spec.dtype
    if gemm not in GEMM_PLUGIN_CHOICES:
        raise ForgeError(f"--gemm_plugin {gemm!r}: choose one of {', '.join(GEMM_PLUGIN_CHOICES)}")
    return TrtllmPlan(ckpt, tree, stats, cfg.max_batch_size, max_input_len, max_seq_len, max_num_tokens, gemm)


def resolve_tree(spec: str | None, ckpt: CheckpointConfig) -> tuple[ChoiceTree, dict]:
    """The serving tree: checked against the heads and the engine's max_draft_len.

    A native engine's ``medusa_forge.json`` is accepted as the tree file, which is how an ``auto`` tree
    (searched with the native engine on the target GPU) reaches a TensorRT-LLM engine; its
    ``tree_stats`` are carried over.
    """
    if spec == "auto":
        raise ForgeError(
            "--medusa-choices auto measures acceptance with the native engine: build it with "
            "`medusa-forge build native --medusa-choices auto ...` and pass that engine's medusa_forge.json"
        )
    tree = read_tree(spec or DEFAULT_TREE)
    tree.check_heads(ckpt.spec.num_medusa_heads)
    if len(tree.paths) > ckpt.max_draft_len:
        raise ForgeError(
            f"choice tree {tree.name!r} has {len(tree.paths)} draft nodes but the checkpoint's "
            f"max_draft_len is {ckpt.max_draft_len}; convert with --max-draft-len "
            f"{len(tree.paths)} or use a smaller tree"
        )
    stats: dict = {}
    if spec and Path(spec).is_file() and Path(spec).name == MANIFEST_NAME:
        stats = dict(json.loads(Path(spec).read_text()).get("tree_stats") or {})
        stats["from_engine"] = str(Path(spec).resolve().parent)
    return tree, stats


def build_trtllm(cfg: TrtllmBuildConfig, echo: Callable[[str], None] = print) -> EngineManifest | None:
    """Dry run: print the exact command, write nothing. Otherwise build into a temporary sibling."""
    plan = plan_build(cfg)
    final_cmd = plan.command(Path(cfg.out_dir).absolute(), cfg.trtllm_build)
    if cfg.dry_run:
        echo(shlex.join(final_cmd))
        return None
    exe = shutil.which(cfg.trtllm_build)
    if exe is None:
        raise ForgeError(
            f"{cfg.trtllm_build} not found on PATH: run inside the TensorRT-LLM container "
            "(`make engine`, see Dockerfile) or pass --dry-run to print the command"
        )
    with atomic_output_dir(cfg.out_dir, cfg.overwrite) as tmp:
        proc = subprocess.run(plan.command(tmp, exe), check=False)
        if proc.returncode != 0:
            raise ForgeError(f"trtllm-build failed with exit code {proc.returncode} (its output is above)")
        engines = sorted(tmp.glob("rank*.engine"))
        if not (tmp / "config.json").is_file() or len(engines) != plan.checkpoint.spec.tp_size:
            raise ForgeError(
                f"trtllm-build exited 0 but did not write config.json and "
                f"{plan.checkpoint.spec.tp_size} rank*.engine file(s)"
            )
        for name in TOKENIZER_FILES:  # Triton's pre/post-processing find the tokenizer beside the engine
            if (plan.checkpoint.directory / name).is_file():
                shutil.copyfile(plan.checkpoint.directory / name, tmp / name)
        manifest = _manifest(plan, final_cmd, exe)
        manifest.save(tmp)
    return manifest


def _manifest(plan: TrtllmPlan, cmd: list[str], exe: str) -> EngineManifest:
    ckpt = plan.checkpoint
    digests = {f"checkpoint/{f.name}": sha256_file(f) for f in sorted(ckpt.directory.iterdir()) if f.is_file()}
    return EngineManifest(
        kind="tensorrt_llm",
        dtype=plan.engine_dtype,
        medusa_choices=plan.tree.to_list(),
        max_seq_len=plan.max_seq_len,
        max_batch_size=plan.max_batch_size,
        num_medusa_heads=ckpt.spec.num_medusa_heads,
        sources={"checkpoint": str(ckpt.directory.resolve())},
        sha256=digests,
        tool_versions={
            "medusa_forge": __version__,
            "tensorrt_llm": tensorrt_llm_version(),
            "tensorrt_llm_pinned": f"{ckpt.profile.version} ({ckpt.profile.commit})",
            "trtllm_build": exe,
        },
        tree_stats=plan.tree_stats,
        extra={
            "command": shlex.join(cmd),
            "max_draft_len": ckpt.max_draft_len,
            "max_input_len": plan.max_input_len,
            "max_num_tokens": plan.max_num_tokens,
            "gemm_plugin": plan.gemm_plugin,
            "tp_size": ckpt.spec.tp_size,
            "quant_algo": ckpt.spec.quant_algo,
            "trtllm_profile": ckpt.profile.name,
            "kv_cache_quant_algo": ckpt.spec.kv_cache_quant_algo,
            "tree_name": plan.tree.name,
            "medusa_choices_trtllm": plan.tree.to_trtllm(),
        },
    )


def tensorrt_llm_version() -> str:
    try:
        return importlib.metadata.version("tensorrt_llm")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
