"""The demo's stages, each a call into the stage's own library function (no shelling out).

Everything lands under ``cfg.out`` (``out/demo`` from the Makefile)::

    engine-base/ engine-medusa/   native engines (fp32 on a CPU, bf16 on CUDA)
    triton-repo/                  models `base` (plain decoding) and `medusa`, decoupled
    tritonserver.log              the server's output (the terminal only gets progress lines)
    eval/                         mmlu_base.json, mmlu_medusa.json, speed.json, speed_degraded.json
    report/                       the candidate's report.md, report.json and PNG plots
    report-baseline/ report-degraded/
    registry/                     versions/, current -> the promoted engine, history.jsonl
    summary.json                  the figures of the terminal's summary table

The server is a context manager: it is stopped when the stages end, fail or are interrupted
(SIGINT, or SIGTERM through ``medusa_forge.cli``), and it dies with this process otherwise.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from medusa_forge.demo.assets import heads_tree, shipped_heads, shipped_mmlu
from medusa_forge.errors import ForgeError

DEGRADED_TEMPERATURE = 5.0  # typical acceptance this hot accepts drafts greedy decoding would not


@dataclass
class DemoConfig:
    model: Path
    prompts: Path
    out: Path = Path("out/demo")
    heads: Path | None = None  # None: the heads shipped with the package
    tree: str | None = None  # None: the tree shipped beside the heads
    device: str | None = None  # None: cuda when available
    dtype: str | None = None  # None: bf16 on cuda, fp32 on cpu
    max_seq_len: int = 512
    mmlu: Path | None = None  # None: the package's MMLU-format questions
    shots: int = 5
    mmlu_limit: int | None = None  # questions per subject
    per_topic: int = 2  # held-out prompts per topic for `eval speed`
    max_tokens: int = 64
    trials: int = 1
    warmup: int = 1
    max_prompt_chars: int = 1000
    min_speedup: float | None = None  # None: promote's 1.5x on CUDA; no speed gate on a CPU (see speed_gate)
    query_prompt: str = "def fibonacci(n):\n"
    query_tokens: int = 32
    echo: Callable[[str], None] = print
    show_text: bool = False  # print the streamed query's text

    @property
    def on_cuda(self) -> bool:
        import torch

        return (self.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")


@dataclass
class DemoRun:
    """Paths and results the stages hand to each other (and to the summary)."""

    cfg: DemoConfig
    heads: Path
    tree: str | None
    mmlu: Path
    t0: float = field(default_factory=time.perf_counter)
    stage: int = 0
    results: dict = field(default_factory=dict)

    def path(self, *parts: str) -> Path:
        return Path(self.cfg.out).absolute().joinpath(*parts)


STAGES = 8  # build, repo, server, query, mmlu, speed, report, promote


@contextmanager
def stage(run: DemoRun, what: str):
    run.stage += 1
    t = time.perf_counter()
    run.cfg.echo(f"[{run.stage}/{STAGES}] {what} ...")
    yield
    run.cfg.echo(f"      done in {time.perf_counter() - t:.1f} s")


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage; return the summary (also written to ``out/summary.json``)."""
    from medusa_forge.atomic import atomic_write_json
    from medusa_forge.demo.summary import summarize

    heads = Path(cfg.heads) if cfg.heads else shipped_heads()
    if not (heads / "config.json").is_file():
        raise ForgeError(f"--heads {heads}: not a Medusa heads directory (no config.json)")
    run = DemoRun(cfg, heads, cfg.tree or heads_tree(heads), Path(cfg.mmlu) if cfg.mmlu else shipped_mmlu())
    run.path().mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run.path("registry"), ignore_errors=True)  # each demo shows one promotion from empty
    build_engines(run)
    serve_and_evaluate(run)
    write_reports(run)
    gate(run)
    summary = summarize(run)
    atomic_write_json(run.path("summary.json"), summary)
    return summary


def build_engines(run: DemoRun) -> None:
    from medusa_forge.build.native import NativeBuildConfig, build_native

    cfg = run.cfg
    dtype = cfg.dtype or ("bfloat16" if cfg.on_cuda else "float32")
    common = {
        "model_dir": Path(cfg.model),
        "dtype": dtype,
        "device": cfg.device,
        "max_seq_len": cfg.max_seq_len,
        "overwrite": True,
        "verify_tokens": 8,
    }
    with stage(run, f"build a base and a Medusa native engine ({dtype})"):
        build_native(NativeBuildConfig(out_dir=run.path("engine-base"), **common))
        manifest = build_native(
            NativeBuildConfig(
                out_dir=run.path("engine-medusa"), medusa_dir=run.heads, tree=run.tree, **common, **tree_search(run)
            )
        )
    verify = manifest.extra.get("verify", {})
    run.results["engine"] = {
        "dtype": dtype,
        "device": manifest.extra.get("build_device"),
        "tree_nodes": len(manifest.medusa_choices or []),
        "tree": run.tree or "default",
        "heads": str(run.heads),
        "num_heads": manifest.num_medusa_heads,
        "verify_identical": verify.get("medusa_equals_greedy"),
    }


def tree_search(run: DemoRun) -> dict:
    """``auto``: search the tree on the even held-out lines, at sizes that suit the device."""
    if run.tree != "auto":
        return {}
    from medusa_forge.build.tree_search import SearchConfig

    sizes = (8, 16, 32, 48, 63) if run.cfg.on_cuda else (1, 2, 4, 8, 16)
    search = SearchConfig(
        calib_limit=8,
        prompt_tokens=128,
        new_tokens=48,
        max_nodes=sizes[-1],
        sizes=sizes,
        timing_prompts=2,
        timing_tokens=32,
    )
    return {"calib_prompts": Path(run.cfg.prompts), "calib_split": "even", "search": search}


def write_repo(run: DemoRun) -> Path:
    from medusa_forge.serve.triton_repo import RepoRequest, write_triton_repo

    repo = run.path("triton-repo")
    threads = None if run.cfg.on_cuda else 1  # two models share the cores; one GEMM thread each is steadier
    write_triton_repo(
        RepoRequest(
            engine=run.path("engine-medusa"),
            out=repo,
            name="medusa",
            decoupled=True,
            overwrite=True,
            torch_threads=threads,
        )
    )
    write_triton_repo(
        RepoRequest(
            engine=run.path("engine-base"),
            out=repo,
            name="base",
            decoupled=True,
            use_medusa=False,
            add=True,
            torch_threads=threads,
        )
    )
    return repo


def serve_and_evaluate(run: DemoRun) -> None:
    from medusa_forge.serve.tritonserver import TritonServer

    with stage(run, "write a Triton repository: models `base` (plain decoding) and `medusa`"):
        repo = write_repo(run)
    server = TritonServer(repo, log_path=run.path("tritonserver.log"), exit_timeout_s=5)
    try:
        with stage(run, "start tritonserver"):
            server.__enter__()  # stops the server itself when it fails to become ready
        run.results["server"] = {"grpc": server.grpc_url, "log": str(server.log_path)}
        with stage(run, f"streamed gRPC query to `medusa` at {server.grpc_url}"):
            run.results["query"] = streamed_query(run, server.grpc_url)
        with stage(run, "eval mmlu: `base` and `medusa`"):
            run_mmlu_pair(run, server.grpc_url)
        with stage(run, "eval speed per topic, and a degraded candidate's run"):
            run_speed_pair(run, server.grpc_url)
    finally:
        if server.stop() is not None:
            run.cfg.echo(f"      tritonserver stopped (log: {server.log_path})")


def streamed_query(run: DemoRun, url: str) -> dict:
    from medusa_forge.serve.client import TritonLLMClient

    deltas: list[str] = []
    show = run.cfg.echo if run.cfg.show_text else None
    with TritonLLMClient(url, "medusa", timeout_s=120) as client:
        reply = client.generate(run.cfg.query_prompt, run.cfg.query_tokens, stream=True, on_text=deltas.append)
    if show:
        show(run.cfg.query_prompt + "".join(deltas))
    steps = reply.accepted_per_step
    out = {
        "prompt": run.cfg.query_prompt,
        "tokens": len(reply.output_tokens or []),
        "responses": reply.responses,
        "steps": len(steps),
        "tokens_per_step": round(sum(steps) / len(steps), 3) if steps else None,
        "ttft_ms": round(1e3 * reply.ttft_s, 1),
        "total_ms": round(1e3 * reply.total_s, 1),
    }
    run.cfg.echo(
        f"      {out['tokens']} tokens in {out['responses']} streamed responses, {out['steps']} steps "
        f"({out['tokens_per_step']} tokens/step), TTFT {out['ttft_ms']} ms"
    )
    return out


def run_mmlu_pair(run: DemoRun, url: str) -> None:
    from medusa_forge.eval.backends import TritonBackend
    from medusa_forge.eval.runs import run_mmlu

    for model in ("base", "medusa"):
        backend = TritonBackend(url, model, timeout_s=300)
        try:
            doc = run_mmlu(
                backend,
                run.mmlu,
                "test",
                [],
                run.cfg.shots,
                run.cfg.mmlu_limit,
                2,
                run.path("eval", f"mmlu_{model}.json"),
                progress=False,
                meta={"url": url},
            )
        finally:
            backend.close()
        run.cfg.echo(
            f"      {model:6s} micro accuracy {100 * doc['micro_accuracy']:.2f} "
            f"({doc['num_questions']} questions, {run.cfg.shots}-shot)"
        )


def run_speed_pair(run: DemoRun, url: str) -> None:
    from medusa_forge.eval.backends import TritonBackend
    from medusa_forge.eval.runs import run_speed
    from medusa_forge.eval.speed import SpeedConfig
    from medusa_forge.prompts import read_prompts

    cfg = run.cfg
    prompts = read_prompts(cfg.prompts, per_topic=cfg.per_topic)
    one_per_topic = list({p.topic: p for p in reversed(prompts)}.values())[::-1]
    for name, items, temperature in (("speed", prompts, 0.0), ("speed_degraded", one_per_topic, DEGRADED_TEMPERATURE)):
        base = TritonBackend(url, "base", timeout_s=300)
        med = TritonBackend(url, "medusa", timeout_s=300, temperature=temperature)
        scfg = SpeedConfig(
            max_tokens=cfg.max_tokens,
            trials=cfg.trials if not temperature else 1,
            warmup=cfg.warmup if not temperature else 0,
            max_prompt_chars=cfg.max_prompt_chars,
            medusa_temperature=temperature,
        )
        try:
            doc = run_speed(
                items,
                base,
                med,
                scfg,
                run.path("eval", f"{name}.json"),
                prompts_file=cfg.prompts,
                progress=False,
                meta={"url": url},
            )
        finally:
            base.close()
            med.close()
        o = doc["overall"]
        run.cfg.echo(
            f"      {name:14s} {o['speedup']:.2f}x overall, {o['medusa']['mean_acceptance_length']} "
            f"tokens/step, identical {o['identical']}/{o['prompts']}"
        )


def write_reports(run: DemoRun) -> None:
    from medusa_forge.eval.report import write_report

    ev = run.path("eval")
    with stage(run, "eval report: Markdown + PNG"):
        write_report(
            run.path("report"),
            ev / "mmlu_medusa.json",
            ev / "mmlu_base.json",
            ev / "speed.json",
            run.path("engine-medusa"),
            overwrite=True,
        )
        write_report(run.path("report-baseline"), ev / "mmlu_base.json", engine=run.path("engine-base"), overwrite=True)
        write_report(
            run.path("report-degraded"),
            ev / "mmlu_medusa.json",
            ev / "mmlu_base.json",
            ev / "speed_degraded.json",
            run.path("engine-medusa"),
            overwrite=True,
        )


def _registry_state(registry: Path) -> tuple:
    versions = sorted(p.name for p in (registry / "versions").iterdir()) if (registry / "versions").is_dir() else []
    current = os.readlink(registry / "current") if (registry / "current").is_symlink() else None
    return versions, current


def speed_gate(cfg: DemoConfig) -> float:
    """On a CPU a 26M model's Medusa step (four heads' vocab GEMMs plus the tree) costs more than the
    tokens it saves, so the CPU demo gates on MMLU and identity only and reports the speed."""
    if cfg.min_speedup is not None:
        return cfg.min_speedup
    return 1.5 if cfg.on_cuda else 0.0


def gate(run: DemoRun) -> None:
    from medusa_forge.eval import promote as pm

    registry = run.path("registry")
    gates = pm.Gates(max_mmlu_drop=0.0, min_speedup=speed_gate(run.cfg), require_identical=True)
    with stage(run, "promote the candidate, then a degraded one"):
        good = pm.promote(run.path("engine-medusa"), run.path("report"), run.path("report-baseline"), registry, gates)
        before = _registry_state(registry)
        bad = pm.promote(
            run.path("engine-medusa"), run.path("report-degraded"), run.path("report-baseline"), registry, gates
        )
        unchanged = _registry_state(registry) == before
        for name, o in (("candidate", good), ("degraded", bad)):
            failed = [g for g in o.gates if not g.passed]
            run.cfg.echo(
                f"      {name:9s} "
                + (
                    f"promoted as {o.version}"
                    if o.promoted
                    else "rejected: " + "; ".join(f"{g.name}: {g.detail}" for g in failed)
                )
            )
    run.results["promotion"] = {
        "promoted": good.promoted,
        "version": good.version,
        "current": str((registry / "current").resolve()) if good.promoted else None,
        "failed_gates": [g.name for g in good.gates if not g.passed],
        "min_speedup": gates.min_speedup,
    }
    run.results["degraded"] = {
        "rejected": not bad.promoted,
        "registry_unchanged": unchanged,
        "failed_gates": [g.name for g in bad.gates if not g.passed],
    }
