"""Assemble an engine from a native engine directory or a HF model directory and optional Medusa heads.

Other artifacts (a TensorRT-LLM Medusa checkpoint) are opened by ``medusa_forge.build.open``, which
reads them into a model and heads and hands them to ``start_engine``.
"""

from __future__ import annotations

from pathlib import Path

from medusa_forge.engine.medusa_engine import MedusaEngine
from medusa_forge.errors import ForgeError
from medusa_forge.heads.checkpoint import load_heads
from medusa_forge.heads.medusa_head import MedusaHeads
from medusa_forge.manifest import EngineManifest, is_engine_dir, read_tree
from medusa_forge.model.checkpoint import load_hf_model
from medusa_forge.model.dtypes import resolve_device_dtype
from medusa_forge.model.fp8_linear import open_fp8_model
from medusa_forge.model.llama import Transformer
from medusa_forge.model.tokenizer import Tokenizer
from medusa_forge.tree.choice_tree import ChoiceTree

DEFAULT_TREE = "mc_sim_7b_63"
DEFAULT_MAX_SEQ_LEN = 2048


def load_engine(
    model_dir: str | Path,
    medusa_dir: str | Path | None = None,
    tree: str | ChoiceTree | None = None,
    device: str | None = None,
    dtype: str | None = None,
    max_seq_len: int | None = None,
    cuda_graphs: bool | None = None,
    compile: bool = False,
    fp8_emulate: bool | None = None,
    with_heads: bool = True,
) -> MedusaEngine:
    """Open a native engine directory (``medusa-forge build`` output; its heads unless ``medusa_dir``
    is given) or a HF model dir plus heads.

    Explicit arguments override what an engine directory's manifest says. An fp8 engine runs FP8
    GEMMs on CUDA (H100); elsewhere it loads only with ``fp8_emulate`` (or MEDUSA_FORGE_FP8_EMULATE=1).
    ``with_heads=False`` opens only the base model of an engine that has heads (a plain-decoding
    server of the same weights, without the heads' memory or their GEMM-layout constraints).
    """
    model_dir = Path(model_dir)
    model = None
    if is_engine_dir(model_dir):
        manifest = EngineManifest.load(model_dir)
        if manifest.kind != "native":
            raise ForgeError(
                f"{model_dir}: a {manifest.kind} engine runs in tritonserver's tensorrtllm backend, "
                "not in the native engine"
            )
        if medusa_dir is None and with_heads and (model_dir / "medusa").is_dir():
            medusa_dir = model_dir / "medusa"
        tree = tree or (manifest.choice_tree() if with_heads else None)
        dtype = dtype or manifest.dtype
        max_seq_len = max_seq_len or manifest.max_seq_len
        model_dir = model_dir / "model"
        if manifest.dtype == "fp8":
            model, dtype = open_fp8_model(model_dir, manifest.extra, device, dtype, fp8_emulate)
    dev, dt = resolve_device_dtype(device, dtype)
    model = model if model is not None else load_hf_model(model_dir, dtype=dt, device=dev)
    heads = None
    if medusa_dir is not None and with_heads:
        heads = load_heads(medusa_dir, model.config.hidden_size, model.config.vocab_size, dtype=dt, device=dev)
    return start_engine(model, heads, tree, model_dir, max_seq_len, cuda_graphs, compile)


def start_engine(
    model: Transformer,
    heads: MedusaHeads | None,
    tree: str | ChoiceTree | None,
    tokenizer_dir: str | Path,
    max_seq_len: int | None = None,
    cuda_graphs: bool | None = None,
    compile: bool = False,
) -> MedusaEngine:
    """An engine over a loaded model and heads (tree default mc_sim_7b_63, KV cache default 2048),
    warmed up: on CUDA the prefill buckets and greedy steps are captured now, not in a timed request."""
    tree = tree or DEFAULT_TREE
    engine = MedusaEngine(
        model,
        heads,
        read_tree(tree),
        Tokenizer(tokenizer_dir),
        max_seq_len=max_seq_len or DEFAULT_MAX_SEQ_LEN,
        cuda_graphs=cuda_graphs,
        compile=compile,
    )
    engine.warmup()
    return engine
