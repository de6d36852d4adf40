"""Shared fixtures: the real pycoder-26m checkpoint from ../shared and heads made from it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("MEDUSA_FORGE_SHARED", REPO.parent / "shared"))
MODEL_DIR = SHARED / "models" / "pycoder-26m"
pytest_plugins = ["heads_layouts_fixtures"]  # the heads-layout fixtures, for the test files that split them
PROMPTS = SHARED / "data" / "code_prompts.jsonl"
# The small MMLU set we wrote (4 computer-science subjects) in both standard layouts.
FIXTURE_MMLU = Path(__file__).resolve().parent / "fixtures" / "mmlu_csv"
FIXTURE_MMLU_HF = Path(__file__).resolve().parent / "fixtures" / "mmlu_hf"

# Under pytest-xdist each worker takes one core: two workers of two torch threads each on two cores
# spent 78% more CPU than one process alone; with one thread each the suite took 6.3 min, not 9.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # the CLIs and tritonserver stubs the tests start, too
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config) -> int | None:
    """`-n auto`: the CPUs this process may run on (affinity, then a cgroup v2 quota), at most 8, since
    each worker loads its own model copies and servers. psutil's count would ignore both limits."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook reads it
    from medusa_forge.bench.meta import usable_cpus

    return min(usable_cpus(), 8)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        # the marker, not keywords: those hold every folder name, and a checkout under a folder
        # named gpu would skip the whole suite
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    if not (MODEL_DIR / "config.json").is_file():
        pytest.fail(f"reference checkpoint missing: {MODEL_DIR} (../shared must sit beside the repo)")
    return MODEL_DIR


@pytest.fixture(scope="session")
def prompts_path() -> Path:
    return PROMPTS


@pytest.fixture(scope="session")
def held_out_prompts() -> list[dict]:
    return [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]


def make_heads(
    model_dir: Path, out_dir: Path, num_heads: int = 4, num_layers: int = 1, seed: int = 0, noise: float = 0.02
) -> Path:
    """Medusa-1 initialisation (projections from lm_head) plus random ResBlock weights: "random heads"."""
    from medusa_forge.heads.checkpoint import save_heads
    from medusa_forge.heads.medusa_head import MedusaHeads, MedusaHeadsConfig
    from medusa_forge.model.checkpoint import load_hf_model

    model = load_hf_model(model_dir)
    cfg = model.config
    heads = MedusaHeads.from_lm_head(
        MedusaHeadsConfig(
            num_heads, num_layers, cfg.hidden_size, cfg.vocab_size, base_model_name_or_path=str(model_dir)
        ),
        model.lm_head.weight,
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        heads.res_weight.normal_(0, noise, generator=g)
        heads.res_bias.normal_(0, noise, generator=g)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_heads(heads, out_dir)
    return out_dir


@pytest.fixture(scope="session")
def heads_dir(model_dir, tmp_path_factory) -> Path:
    """Random 4-head, 1-layer heads for pycoder-26m in the FasterDecoding layout."""
    return make_heads(model_dir, tmp_path_factory.mktemp("heads"))


@dataclass
class NativeTriton:
    """A running tritonserver hosting one native engine twice: with Medusa and as plain decoding."""

    grpc_url: str  # host:port for tritonclient / TritonLLMClient
    medusa_model: str  # Triton model name: Medusa decoding (tree `small`)
    base_model: str  # Triton model name: plain greedy decoding of the same weights
    engine_dir: Path  # the native engine both models serve (load_engine(engine_dir) for in-process runs)
    repo: Path
    server: TritonServer  # noqa: F821 - medusa_forge.serve.tritonserver.TritonServer


@pytest.fixture(scope="session")
def native_triton(model_dir, heads_dir, tmp_path_factory):
    """pycoder-26m + random heads built as a float32 native engine (tree `small`), served by a real
    tritonserver on 127.0.0.1 (free ports) as two decoupled models, `medusa` and `base`, for the session."""
    from medusa_forge.build.native import NativeBuildConfig, build_native
    from medusa_forge.serve.triton_repo import RepoRequest, write_triton_repo
    from medusa_forge.serve.tritonserver import TritonServer

    root = tmp_path_factory.mktemp("native_triton")
    engine = root / "engine"
    build_native(
        NativeBuildConfig(
            model_dir=model_dir, out_dir=engine, dtype="float32", medusa_dir=heads_dir, tree="small", verify_tokens=4
        )
    )
    repo = root / "repo"
    write_triton_repo(RepoRequest(engine=engine, out=repo, name="medusa", decoupled=True))
    write_triton_repo(RepoRequest(engine=engine, out=repo, name="base", decoupled=True, use_medusa=False, add=True))
    with TritonServer(repo, exit_timeout_s=5, log_path=root / "tritonserver.log") as server:
        yield NativeTriton(server.grpc_url, "medusa", "base", engine, repo, server)


def triton_inputs(**tensors) -> list:
    """tritonclient gRPC inputs from numpy arrays (BYTES, INT32, FP32, BOOL), for hand-made requests."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    dtypes = {
        np.dtype(np.object_): "BYTES",
        np.dtype(np.int32): "INT32",
        np.dtype(np.float32): "FP32",
        np.dtype(bool): "BOOL",
    }
    out = []
    for name, array in tensors.items():
        t = grpcclient.InferInput(name, list(array.shape), dtypes[array.dtype])
        t.set_data_from_numpy(array)
        out.append(t)
    return out


def run_cli(args: list, capsys) -> tuple[int, str, str]:
    """Run ``medusa-forge ARGS`` in process: (exit code, stdout, stderr) of this command alone."""
    from medusa_forge.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@contextlib.contextmanager
def ctrl_c_for_children():
    """Children started here get SIGINT's default action. A shell starts background jobs with SIGINT
    ignored, children inherit that, and Python started so never raises KeyboardInterrupt."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def one_thread():
    """pycoder-26m's GEMMs are tiny: one thread is as fast, and far steadier when other runs share the 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
