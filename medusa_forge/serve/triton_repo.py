"""``triton-repo``: an engine directory -> a model in a Triton model repository, whichever kind the engine is.

The engine manifest (medusa_forge.json) says the kind: ``native`` gets the Python-backend model of
native_repo.py, ``tensorrt_llm`` the tensorrtllm_backend layout of trtllm_repo.py. A HF model
directory (plus ``--medusa`` heads) is served natively, as ``generate`` would open it.

One repository can host several models, so that one server serves a Medusa engine and its base
side by side (what ``eval`` compares): the first ``triton-repo`` call creates the repository,
later calls with ``--add`` add a model to it (``--no-medusa`` serves plain decoding of the same
native engine). Every call rewrites the whole repository through a temporary sibling, so a
server never sees it half-written.

Beside the models the repository root holds ``medusa_forge_repo.json`` (tritonserver only looks at
sub-directories): per model the kind, the engine, whether it decodes with Medusa, the world size
``serve`` must launch, and the exact parameters / fill_template values used, for audit.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medusa_forge.atomic import atomic_output_dir
from medusa_forge.errors import ForgeError
from medusa_forge.manifest import EngineManifest, is_engine_dir, read_tree
from medusa_forge.serve.native_repo import NativeRepoConfig, check_model_name, write_native_model
from medusa_forge.serve.native_service import NativeModelSettings
from medusa_forge.tree.choice_tree import ChoiceTree

REPO_INFO = "medusa_forge_repo.json"


@dataclass
class ServedModel:
    name: str  # the model clients call
    kind: str  # native | tensorrt_llm
    engine_dir: str
    use_medusa: bool
    decoupled: bool
    max_batch_size: int
    world_size: int = 1
    directories: list[str] = field(default_factory=list)  # model directories it owns in the repository
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class RepoInfo:
    models: list[ServedModel] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return max((m.world_size for m in self.models), default=1)

    def model(self, name: str) -> ServedModel | None:
        return next((m for m in self.models if m.name == name), None)

    def trtllm_llm_models(self) -> list[str]:
        """The tensorrt_llm-backend models (what ranks > 0 load under mpirun)."""
        return [m.details["composing"]["tensorrt_llm"] for m in self.models if m.kind == "tensorrt_llm"]

    def save(self, repo: Path) -> None:
        (repo / REPO_INFO).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, repo: str | Path) -> RepoInfo | None:
        path = Path(repo) / REPO_INFO
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            return cls([ServedModel(**m) for m in data["models"]])
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise ForgeError(f"{path}: malformed ({e}); regenerate the repository") from None


@dataclass
class RepoRequest:
    """What `triton-repo` was asked for (CLI flags, engine_options included)."""

    engine: Path
    out: Path
    name: str = "ensemble"
    max_batch_size: int | None = None  # None: the engine's
    decoupled: bool = False
    instances: int = 1
    overwrite: bool = False
    add: bool = False  # add the model to an existing repository instead of creating one
    use_medusa: bool = True
    # native only
    medusa: Path | None = None
    tree: str | None = None
    device: str | None = None
    dtype: str | None = None
    max_seq_len: int | None = None
    torch_threads: int | None = None
    compile: bool = False
    request_timeout_s: float = 600.0
    max_queue: int = 0  # requests that may wait beyond the running batch (0 = unbounded)
    speculation: str = "auto"  # the in-flight batcher's tree policy: auto | fixed | off-above:N
    # tensorrt_llm only
    tokenizer_dir: Path | None = None
    tensorrtllm_backend: Path | None = None
    trtllm: dict[str, Any] = field(default_factory=dict)  # extra TrtllmRepoParams fields


def engine_kind(engine: Path) -> tuple[str, EngineManifest | None]:
    if is_engine_dir(engine):
        manifest = EngineManifest.load(engine)
        return manifest.kind, manifest
    if (engine / "config.json").is_file():
        return "native", None  # a HF model directory, opened by load_engine like `generate` does
    raise ForgeError(
        f"--engine {engine}: neither an engine directory (medusa_forge.json) nor a HF model directory (config.json)"
    )


def write_triton_repo(req: RepoRequest) -> ServedModel:
    """Create the repository with this one model, or (``req.add``) add it to the existing one."""
    engine = Path(req.engine).absolute()
    if not engine.is_dir():
        raise ForgeError(f"--engine {req.engine}: no such directory")
    check_model_name(req.name)
    kind, manifest = engine_kind(engine)
    existing = _existing(req)
    if kind == "native":
        cfg, model = _native_plan(req, engine, manifest)
        writer = lambda tmp: write_native_model(cfg, tmp)  # noqa: E731
    else:
        writer, model = _trtllm_plan(req, engine, manifest, existing)
    clash = _clashes(existing, model, req.overwrite)
    if any("preprocessing" in m.directories for m in clash) and len(existing.trtllm_llm_models()) > 1:
        raise ForgeError(
            f"model {req.name!r} owns the preprocessing/postprocessing that other TensorRT-LLM models "
            "of the repository share; write a new repository instead of replacing it"
        )
    with atomic_output_dir(req.out, overwrite=req.overwrite or req.add) as tmp:
        if req.add:
            _copy_models(Path(req.out), tmp, existing, replaced=clash)
        writer(tmp)
        RepoInfo([m for m in existing.models if m not in clash] + [model]).save(tmp)
    return model


def _existing(req: RepoRequest) -> RepoInfo:
    out = Path(req.out)
    if not req.add or not out.is_dir() or not any(out.iterdir()):
        return RepoInfo()
    info = RepoInfo.load(out)
    if info is None:
        raise ForgeError(f"--add: {out} is not a repository written by `medusa-forge triton-repo` (no {REPO_INFO})")
    return info


def _clashes(existing: RepoInfo, model: ServedModel, overwrite: bool) -> list[ServedModel]:
    """Models of ``existing`` that the new one replaces (same name or a directory it writes)."""
    clash = [m for m in existing.models if m.name == model.name or set(m.directories) & set(model.directories)]
    if clash and not overwrite:
        raise ForgeError(
            f"the repository already has model {clash[0].name!r}; pick another --name or pass --overwrite to replace it"
        )
    return clash


def _copy_models(src: Path, dst: Path, existing: RepoInfo, replaced: list[ServedModel]) -> None:
    drop = {d for m in replaced for d in m.directories}
    for m in existing.models:
        for d in m.directories:
            if d not in drop and not (dst / d).exists():
                shutil.copytree(src / d, dst / d, symlinks=True)


def _native_plan(
    req: RepoRequest, engine: Path, manifest: EngineManifest | None
) -> tuple[NativeRepoConfig, ServedModel]:
    if req.tokenizer_dir or req.tensorrtllm_backend:
        raise ForgeError("--tokenizer-dir / --tensorrtllm-backend apply to TensorRT-LLM engines only")
    if manifest is None and req.tree and not req.medusa:
        raise ForgeError("--medusa-choices needs Medusa heads (--medusa DIR) for a HF model directory")
    if req.medusa and not Path(req.medusa).is_dir():
        raise ForgeError(f"--medusa {req.medusa}: no such directory")
    has_heads = bool(req.medusa) if manifest is None else bool(manifest.num_medusa_heads or req.medusa)
    if req.use_medusa and not has_heads:
        raise ForgeError(
            f"--engine {engine} has no Medusa heads: pass --medusa DIR, or --no-medusa to serve plain decoding"
        )
    if req.request_timeout_s <= 0:
        raise ForgeError(f"--request-timeout must be > 0, got {req.request_timeout_s:g}")
    tree = read_tree(req.tree) if req.tree and req.use_medusa else None  # fail now, not at server start
    if req.use_medusa:
        _check_heads_fit(engine, manifest, Path(req.medusa) if req.medusa else None, tree)
    settings = NativeModelSettings(
        engine_dir=str(engine),
        medusa_dir=str(Path(req.medusa).absolute()) if req.medusa and req.use_medusa else "",
        medusa_choices=json.dumps(tree.to_list()) if tree else "",
        device=req.device or "",
        dtype=req.dtype or "",
        max_seq_len=str(req.max_seq_len or ""),
        use_medusa="true" if req.use_medusa else "false",
        torch_threads=str(req.torch_threads or ""),
        compile="true" if req.compile else "false",
        request_timeout_s=f"{req.request_timeout_s:g}",
        max_queue=str(req.max_queue),
        speculation=req.speculation,
    )
    batch = req.max_batch_size or (manifest.max_batch_size if manifest else 1)
    _check_batching(batch, req.max_queue, req.speculation)
    cfg = NativeRepoConfig(settings, req.name, batch, req.decoupled, req.instances)
    model = ServedModel(
        req.name,
        "native",
        str(engine),
        req.use_medusa,
        req.decoupled,
        batch,
        directories=[req.name],
        details={
            "instances": req.instances,
            "max_queue": req.max_queue,
            "parameters": settings.to_parameters() | {"max_batch_size": str(batch)},
        },
    )
    return cfg, model


def _check_batching(batch: int, max_queue: int, speculation: str) -> None:
    """Bounds and policy of the instance's scheduler, refused here rather than when the server loads it."""
    if max_queue < 0:
        raise ForgeError(f"--max-queue must be >= 0 (0 = unbounded), got {max_queue}")
    if batch == 1:
        if speculation != "auto":
            raise ForgeError(f"--speculation {speculation} steers the in-flight batcher; it needs --max-batch-size > 1")
        return
    if importlib.util.find_spec("medusa_forge.engine.batcher") is None:
        raise ForgeError(
            f"--max-batch-size {batch} needs the in-flight batcher (medusa_forge/engine/batcher.py), "
            "which this install lacks; use --max-batch-size 1"
        )
    from medusa_forge.engine.speculation import parse_speculation

    parse_speculation(speculation)


def _check_heads_fit(
    engine: Path, manifest: EngineManifest | None, medusa: Path | None, tree: ChoiceTree | None
) -> None:
    """Heads of another model, or a tree deeper than the heads, fail here rather than when the
    server loads the model (where they would show only in tritonserver's log)."""
    from medusa_forge.heads.layouts import collect, detect
    from medusa_forge.model.config import ModelConfig

    model_dir = engine / "model" if manifest is not None and (engine / "model").is_dir() else engine
    heads_dir = medusa or engine / "medusa"
    if not heads_dir.is_dir():
        return  # a converted TensorRT-LLM checkpoint holds its heads in its rank files (load_engine reads them)
    cfg = ModelConfig.from_dir(model_dir)
    src = detect(heads_dir)
    collect(src, cfg.hidden_size, cfg.vocab_size)  # shapes against the base: one ForgeError naming the tensor
    if tree is not None:
        tree.check_heads(src.num_heads)


def _trtllm_plan(req: RepoRequest, engine: Path, manifest: EngineManifest, existing: RepoInfo):
    from medusa_forge.serve.trtllm_repo import (
        BACKEND_COMMIT,
        BACKEND_VERSION,
        TrtllmNames,
        find_backend_checkout,
        write_trtllm_models,
    )

    if req.medusa or req.device or req.dtype or req.max_seq_len or req.torch_threads or req.compile:
        raise ForgeError(
            "--medusa/--device/--dtype/--max-seq-len/--torch-threads/--compile apply to native engines; a "
            "TensorRT-LLM engine fixed them at build time"
        )
    if req.max_queue or req.speculation != "auto":
        raise ForgeError(
            "--max-queue/--speculation apply to native engines; TensorRT-LLM's batch manager queues and "
            "schedules its own requests"
        )
    if not req.use_medusa and manifest.num_medusa_heads:
        raise ForgeError(
            "--no-medusa: a TensorRT-LLM Medusa engine always decodes with its heads; build a base "
            "engine (`medusa-forge build` without --medusa) and --add that one"
        )
    params = trtllm_params(req, engine, manifest)
    extra = manifest.extra or {}
    world = int(extra.get("tp_size", 1)) * int(extra.get("pp_size", 1))
    first = [m for m in existing.models if m.kind == "tensorrt_llm" and m.name != req.name]
    if first:
        _check_shareable(first[0], params, world)
    names = TrtllmNames.for_model(req.name, first=not first)
    checkout = find_backend_checkout(req.tensorrtllm_backend)
    model = ServedModel(
        req.name,
        "tensorrt_llm",
        str(engine),
        bool(manifest.num_medusa_heads),
        req.decoupled,
        params.triton_max_batch_size,
        world_size=world,
        directories=list(names.directories().values()),
        details={
            "tensorrtllm_backend": {
                "version": BACKEND_VERSION,
                "commit": BACKEND_COMMIT,
                "python_models_from": str(checkout),
            },
            "composing": {"tensorrt_llm": names.tensorrt_llm, "bls": names.bls},
            "tokenizer_dir": str(params.tokenizer_dir),
            "fill_template": params.substitutions(),
        },
    )
    if first:  # preprocessing / postprocessing belong to the first engine's entry
        model.directories = [d for d in model.directories if d not in ("preprocessing", "postprocessing")]
    return (lambda tmp: write_trtllm_models(params, tmp, checkout, names)), model


def _check_shareable(first, params, world: int) -> None:
    """A second TensorRT-LLM engine reuses the first one's preprocessing/postprocessing."""
    if world > 1 or first.world_size > 1:
        raise ForgeError(
            "only tensor-parallel size 1 engines can share a repository (tensorrtllm_backend's "
            "multi-model mode); serve the other engine from its own repository"
        )
    if first.details.get("tokenizer_dir") != str(params.tokenizer_dir):
        raise ForgeError(
            f"--add: the repository's preprocessing uses tokenizer {first.details.get('tokenizer_dir')}, "
            f"this engine {params.tokenizer_dir}; engines sharing a repository need the same tokenizer"
        )
    if first.max_batch_size != params.triton_max_batch_size:
        raise ForgeError(
            f"--add: the repository's models take max_batch_size {first.max_batch_size}; pass "
            f"--max-batch-size {first.max_batch_size}"
        )


def trtllm_params(req: RepoRequest, engine: Path, manifest: EngineManifest) -> TrtllmRepoParams:  # noqa: F821
    """The fill values for a TensorRT-LLM engine, from its manifest and the flags."""
    from medusa_forge.serve.trtllm_repo import TrtllmRepoParams

    extra = manifest.extra or {}
    if req.tree:
        if not manifest.num_medusa_heads:
            raise ForgeError(f"--medusa-choices given but {engine} is not a Medusa engine")
        tree = read_tree(req.tree)
    else:
        tree = manifest.choice_tree()
    if tree is not None:
        tree.check_heads(manifest.num_medusa_heads)
        draft = int(extra.get("max_draft_len", len(tree.paths)))
        if len(tree.paths) > draft:
            raise ForgeError(
                f"choice tree has {len(tree.paths)} nodes but the engine was built with "
                f"max_draft_len {draft}; use a tree of <= {draft} nodes"
            )
    batch = req.max_batch_size or manifest.max_batch_size
    if batch > manifest.max_batch_size:
        raise ForgeError(f"--max-batch-size {batch} exceeds the engine's max_batch_size {manifest.max_batch_size}")
    return TrtllmRepoParams(
        engine_dir=engine,
        tokenizer_dir=_tokenizer_dir(req, engine, manifest),
        triton_max_batch_size=batch,
        decoupled=req.decoupled,
        medusa_choices=tree.to_trtllm() if tree else None,
        instances=req.instances,
        repo_dir=Path(req.out).absolute(),
        dtype=manifest.dtype,
        **req.trtllm,
    )


def _tokenizer_dir(req: RepoRequest, engine: Path, manifest: EngineManifest) -> Path:
    candidates = (
        [req.tokenizer_dir]
        if req.tokenizer_dir
        else [
            manifest.sources.get("tokenizer"),
            manifest.sources.get("model"),
            manifest.sources.get("checkpoint"),
            engine,
        ]
    )
    for c in filter(None, candidates):
        path = Path(c).absolute()
        if (
            (path / "tokenizer.json").is_file()
            or (path / "tokenizer.model").is_file()
            or (path / "tokenizer_config.json").is_file()
        ):
            return path
        if req.tokenizer_dir:
            raise ForgeError(f"--tokenizer-dir {c}: no tokenizer.json / tokenizer.model / tokenizer_config.json there")
    raise ForgeError(f"{engine}: the manifest names no tokenizer; pass --tokenizer-dir (the HF model directory)")
