"""``medusa-forge build trtllm``: run ``trtllm-build`` on a converted checkpoint, add our manifest.

The command is the one TensorRT-LLM's Medusa example uses (examples/medusa/README.md) with every
size made explicit. Flags are those of ``trtllm-build`` in TensorRT-LLM 0.11.0 — the release in
``nvcr.io/nvidia/tritonserver:24.07-trtllm-python-py3`` (tensorrtllm_backend v0.11.0 pins
TensorRT-LLM commit 05316d3313360012536ace46c781518f5afae75e): ``tensorrt_llm/commands/build.py``
(``--checkpoint_dir --output_dir --max_batch_size --max_input_len --max_seq_len --max_num_tokens
--speculative_decoding_mode {draft_tokens_external,lookahead_decoding,medusa} --workers``) and the
plugin flags of ``tensorrt_llm/plugin/plugin.py`` (``--gemm_plugin --gpt_attention_plugin
--paged_kv_cache --remove_input_padding``, values ``enable``/``disable`` or a dtype).

Facts taken from that release rather than guessed:
- the checkpoint's ``max_draft_len`` wins: ``tensorrt_llm/builder.py`` overwrites the build config's
  with the model config's for Medusa models, so we pass none and check the tree against it;
- ``max_seq_len`` is then grown by ``max_draft_len`` inside the builder;
- the choice tree is a runtime setting (Triton's ``medusa_choices``), so it is validated here
  (depth <= heads, nodes <= max_draft_len) and recorded in the manifest for ``triton-repo``.
"""

from __future__ import annotations

import importlib.metadata
import json
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from medusa_forge import __version__
from medusa_forge.atomic import atomic_output_dir
from medusa_forge.errors import ForgeError
from medusa_forge.manifest import MANIFEST_NAME, EngineManifest, sha256_file
from medusa_forge.tree.choice_tree import ChoiceTree

GEMM_PLUGIN_CHOICES = ("auto", "float16", "bfloat16", "float32", "fp8", "disable")
DEFAULT_MAX_SEQ_LEN = 2048
DEFAULT_MAX_INPUT_LEN = 1024


@dataclass(frozen=True)
class TrtllmCheckpoint:
    """What ``build`` needs from a TensorRT-LLM checkpoint's config.json."""

    path: Path
    architecture: str
    dtype: str  # activation dtype: float16 | bfloat16 | float32
    quant_algo: str | None  # "FP8" for an FP8 checkpoint
    num_medusa_heads: int
    max_draft_len: int
    tp_size: int
    pp_size: int
    max_position_embeddings: int | None
    files: tuple[Path, ...] = field(default=())

    @property
    def is_medusa(self) -> bool:
        return self.architecture == "MedusaForCausalLM"

    @property
    def engine_dtype(self) -> str:
        """Our manifest's dtype name: ``fp8`` for an FP8-quantized checkpoint, else the dtype."""
        return "fp8" if (self.quant_algo or "").upper() == "FP8" else self.dtype


def read_checkpoint(path: str | Path) -> TrtllmCheckpoint:
    path = Path(path)
    cfg_path = path / "config.json"
    if not path.is_dir():
        raise ForgeError(f"{path}: TensorRT-LLM checkpoint directory not found (run `medusa-forge convert` first)")
    if not cfg_path.is_file():
        raise ForgeError(f"{cfg_path}: not found; expected a TensorRT-LLM checkpoint (`medusa-forge convert` output)")
    try:
        c = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ForgeError(f"{cfg_path}: not valid JSON ({e})") from None
    for key in ("architecture", "dtype"):
        if not isinstance(c.get(key), str):
            raise ForgeError(f"{cfg_path}: field {key!r} missing; not a TensorRT-LLM checkpoint config")
    mapping = c.get("mapping") or {}
    tp, pp = int(mapping.get("tp_size", 1)), int(mapping.get("pp_size", 1))
    world = int(mapping.get("world_size", tp * pp))
    files = tuple(path / f"rank{r}.safetensors" for r in range(world))
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ForgeError(f"{path}: {missing[0]} missing (mapping.world_size = {world}); the checkpoint is incomplete")
    medusa = c["architecture"] == "MedusaForCausalLM"
    heads = int(c.get("num_medusa_heads", 0)) if medusa else 0
    if medusa and heads < 1:
        raise ForgeError(f"{cfg_path}: MedusaForCausalLM without num_medusa_heads")
    quant = c.get("quantization") or {}
    return TrtllmCheckpoint(path=path, architecture=c["architecture"], dtype=c["dtype"],
                            quant_algo=quant.get("quant_algo"), num_medusa_heads=heads,
                            max_draft_len=int(c.get("max_draft_len", 63)) if medusa else 0,
                            tp_size=tp, pp_size=pp, max_position_embeddings=c.get("max_position_embeddings"),
                            files=files)


@dataclass
class TrtllmBuildConfig:
    checkpoint_dir: Path
    out_dir: Path
    tree: str | None = None  # preset | JSON file (a native engine's medusa_forge.json works) | JSON list
    max_batch_size: int = 8
    max_input_len: int | None = None
    max_seq_len: int | None = None
    max_num_tokens: int | None = None
    gemm_plugin: str | None = None  # default: the checkpoint's dtype
    dry_run: bool = False
    overwrite: bool = False
    trtllm_build: str = "trtllm-build"


@dataclass(frozen=True)
class TrtllmPlan:
    checkpoint: TrtllmCheckpoint
    tree: ChoiceTree | None
    tree_stats: dict
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    gemm_plugin: str

    def command(self, output_dir: str | Path, trtllm_build: str = "trtllm-build") -> list[str]:
        cmd = [trtllm_build,
               "--checkpoint_dir", str(self.checkpoint.path),
               "--output_dir", str(output_dir),
               "--gemm_plugin", self.gemm_plugin,
               "--gpt_attention_plugin", self.checkpoint.dtype]
        if self.checkpoint.is_medusa:
            cmd += ["--speculative_decoding_mode", "medusa"]
        cmd += ["--max_batch_size", str(self.max_batch_size),
                "--max_input_len", str(self.max_input_len),
                "--max_seq_len", str(self.max_seq_len),
                "--max_num_tokens", str(self.max_num_tokens),
                "--paged_kv_cache", "enable",
                "--remove_input_padding", "enable",
                "--workers", str(self.checkpoint.tp_size * self.checkpoint.pp_size)]
        return cmd


def plan_build(cfg: TrtllmBuildConfig) -> TrtllmPlan:
    """Validate the checkpoint, tree and sizes; everything the command and manifest need."""
    ckpt = read_checkpoint(cfg.checkpoint_dir)
    tree, stats = _resolve_tree(cfg.tree, ckpt)
    max_seq_len = cfg.max_seq_len or min(DEFAULT_MAX_SEQ_LEN, ckpt.max_position_embeddings or DEFAULT_MAX_SEQ_LEN)
    max_input_len = cfg.max_input_len or min(DEFAULT_MAX_INPUT_LEN, max_seq_len - 1)
    if cfg.max_batch_size < 1:
        raise ForgeError(f"--max_batch_size must be >= 1, got {cfg.max_batch_size}")
    if not 1 <= max_input_len < max_seq_len:
        raise ForgeError(f"--max_input_len ({max_input_len}) must be >= 1 and below --max_seq_len ({max_seq_len})")
    # One step may hold a whole context plus one tree (max_draft_len + 1 tokens) per other request.
    max_num_tokens = cfg.max_num_tokens or max_input_len + cfg.max_batch_size * (ckpt.max_draft_len + 1)
    if max_num_tokens < max_input_len:
        raise ForgeError(f"--max_num_tokens ({max_num_tokens}) must be >= --max_input_len ({max_input_len})")
    gemm = cfg.gemm_plugin or ckpt.dtype
    if gemm not in GEMM_PLUGIN_CHOICES:
        raise ForgeError(f"--gemm_plugin {gemm!r}: choose one of {', '.join(GEMM_PLUGIN_CHOICES)}")
    return TrtllmPlan(ckpt, tree, stats, cfg.max_batch_size, max_input_len, max_seq_len, max_num_tokens, gemm)


def _resolve_tree(spec: str | None, ckpt: TrtllmCheckpoint) -> tuple[ChoiceTree | None, dict]:
    if not ckpt.is_medusa:
        if spec is not None:
            raise ForgeError(f"{ckpt.path}: a {ckpt.architecture} checkpoint has no Medusa heads; drop --medusa-choices")
        return None, {}
    if spec == "auto":
        raise ForgeError("--medusa-choices auto measures acceptance with the native engine: build it with "
                         "`medusa-forge build native --medusa-choices auto ...` and pass that engine's medusa_forge.json")
    tree = ChoiceTree.parse(spec or "mc_sim_7b_63")
    tree.check_heads(ckpt.num_medusa_heads)
    if len(tree.paths) > ckpt.max_draft_len:
        raise ForgeError(f"choice tree {tree.name!r} has {len(tree.paths)} draft nodes but the checkpoint's "
                         f"max_draft_len is {ckpt.max_draft_len}; convert with a larger max_draft_len or use a smaller tree")
    stats = {}
    if spec and Path(spec).is_file() and Path(spec).name == MANIFEST_NAME:
        stats = dict(json.loads(Path(spec).read_text()).get("tree_stats") or {})
        stats["from_engine"] = str(Path(spec).resolve().parent)
    return tree, stats


def build_trtllm(cfg: TrtllmBuildConfig, echo=print) -> EngineManifest | None:
    """Dry run: print the exact command, write nothing. Otherwise build into a temporary sibling."""
    plan = plan_build(cfg)
    final_cmd = plan.command(Path(cfg.out_dir).absolute(), cfg.trtllm_build)
    if cfg.dry_run:
        echo(shlex.join(final_cmd))
        return None
    exe = shutil.which(cfg.trtllm_build)
    if exe is None:
        raise ForgeError(f"{cfg.trtllm_build} not found on PATH: run inside the TensorRT-LLM container "
                         "(`make engine`, see Dockerfile) or pass --dry-run to print the command")
    with atomic_output_dir(cfg.out_dir, cfg.overwrite) as tmp:
        proc = subprocess.run(plan.command(tmp, exe), check=False)
        if proc.returncode != 0:
            raise ForgeError(f"trtllm-build failed with exit code {proc.returncode} (its output is above)")
        engines = sorted(tmp.glob("rank*.engine"))
        if not (tmp / "config.json").is_file() or not engines:
            raise ForgeError(f"trtllm-build exited 0 but wrote no config.json / rank*.engine into {tmp}")
        manifest = _manifest(plan, cfg, final_cmd, exe)
        manifest.save(tmp)
    return manifest


def _manifest(plan: TrtllmPlan, cfg: TrtllmBuildConfig, cmd: list[str], exe: str) -> EngineManifest:
    ckpt = plan.checkpoint
    digests = {f"checkpoint/{f.name}": sha256_file(f) for f in sorted(ckpt.path.iterdir()) if f.is_file()}
    return EngineManifest(
        kind="tensorrt_llm", dtype=ckpt.engine_dtype,
        medusa_choices=plan.tree.to_list() if plan.tree else None,
        max_seq_len=plan.max_seq_len, max_batch_size=plan.max_batch_size,
        num_medusa_heads=ckpt.num_medusa_heads,
        sources={"checkpoint": str(ckpt.path.resolve())}, sha256=digests,
        tool_versions={"medusa_forge": __version__, "tensorrt_llm": tensorrt_llm_version(), "trtllm_build": exe},
        tree_stats=plan.tree_stats,
        extra={"command": shlex.join(cmd), "max_draft_len": ckpt.max_draft_len, "max_input_len": plan.max_input_len,
               "max_num_tokens": plan.max_num_tokens, "gemm_plugin": plan.gemm_plugin, "tp_size": ckpt.tp_size,
               "pp_size": ckpt.pp_size, "quant_algo": ckpt.quant_algo,
               "tree_name": plan.tree.name if plan.tree else None,
               "medusa_choices_trtllm": plan.tree.to_trtllm() if plan.tree else None})


def tensorrt_llm_version() -> str:
    try:
        return importlib.metadata.version("tensorrt_llm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
