"""``medusa-forge bench serve``: a native engine behind a real tritonserver under concurrent gRPC load.

One run, in order:

1. the engine: a native engine directory is used as is; a HF model directory (plus ``--medusa``
   heads) is first built into one (``build native``) in the work directory;
2. a Triton repository for it (one decoupled native model, so unary and streaming requests both
   work) in the work directory, and a real tritonserver on 127.0.0.1 (free ports);
3. the same engine in this process, opened with the model's own ``parameters`` through the class
   the Triton model runs (:class:`~medusa_forge.serve.native_service.NativeService`): the baseline;
4. sequential answers: each prompt once over gRPC and once in process; they must be equal;
5. gRPC overhead: the same prompt and the same number of tokens (EOS ignored), in turn in process,
   over gRPC with a stream per request (what ``query`` and ``eval`` do) and over gRPC with a stream
   kept open (a long-lived client), one request at a time; overhead = p50 latency over gRPC - p50
   latency in process (goal: <= 2 ms; the headline figure is the kept stream's), each the caller's
   wall time around one whole request. Two processes running the same steps differ by more than
   2 ms from run to run on a busy CPU, so each gRPC request also gets its share outside Triton,
   paired on the request itself: the caller's wall time minus Triton's own time for it (the
   ``success`` duration of Triton's statistics, read before and after);
6. load: ``clients`` threads, each with its own gRPC client, send ``requests`` requests each at
   once (prompts in rotation); every request is bounded by ``timeout_s`` and the whole phase by
   ``time_limit_s`` (requests not sent by then count as errors). Every answer must equal the
   sequential answer for its prompt, and there must be no error.

Latencies are the caller's: request sent -> final response received, Triton's queueing included
(one instance decodes one request at a time, so under load most of a request's latency is its
wait in the queue; the ``server`` figures from Triton's statistics split queue from compute).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

from medusa_forge.bench.harness import (
    ClientRun,
    ServedModel,
    rate,
    run_clients,
    serving,
    settled_stats,
)
from medusa_forge.bench.meta import served_result
from medusa_forge.bench.serve_config import MODEL, ServeBenchConfig
from medusa_forge.bench.serve_overhead import SequentialAnswers
from medusa_forge.errors import ForgeError
from medusa_forge.stats import percentiles


def _engine_dir(cfg: ServeBenchConfig, work: Path) -> tuple[Path, bool]:
    """(native engine directory, built here?)."""
    from medusa_forge.manifest import EngineManifest, is_engine_dir

    engine = Path(cfg.engine)
    if not engine.is_dir():
        raise ForgeError(f"--engine {engine}: no such directory")
    if is_engine_dir(engine):
        kind = EngineManifest.load(engine).kind
        if kind != "native":
            raise ForgeError(
                f"--engine {engine} is a {kind} engine; bench serve compares a native engine served "
                "by Triton with the same engine in process"
            )
        if cfg.medusa or cfg.tree or cfg.dtype:
            raise ForgeError(
                "--medusa/--medusa-choices/--dtype apply when --engine is a HF model directory "
                "(they are built in); an engine directory carries its own"
            )
        return engine.absolute(), False
    if not (engine / "config.json").is_file():
        raise ForgeError(f"--engine {engine}: neither a native engine (medusa_forge.json) nor a HF model directory")
    import torch

    from medusa_forge.build.native import NativeBuildConfig, build_native

    out = work / "engine"
    dtype = cfg.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    build_native(
        NativeBuildConfig(
            model_dir=engine,
            out_dir=out,
            dtype=dtype,
            medusa_dir=Path(cfg.medusa) if cfg.medusa else None,
            tree=cfg.tree,
            verify_tokens=4,
        )
    )
    return out, True


def run_serve_bench(cfg: ServeBenchConfig, progress=print) -> dict[str, Any]:
    """Run the benchmark; returns the result document (``passed`` says whether every check held)."""
    import torch

    cfg.check()
    t_start = time.perf_counter()
    threads = cfg.torch_threads or torch.get_num_threads()
    with ExitStack() as stack:
        work, engine, built, manifest = served_engine(cfg, stack, "mf-serve-bench-")
        use_medusa = bool(manifest.num_medusa_heads) if cfg.use_medusa is None else cfg.use_medusa
        model = ServedModel(MODEL, use_medusa, cfg.max_batch_size, cfg.instances)
        progress(f"engine {engine}{' (built)' if built else ''}")
        live = stack.enter_context(
            serving(engine, work, [model], threads, max(cfg.timeout_s, cfg.time_limit_s), progress=progress)
        )
        seq = SequentialAnswers(cfg, live.url, live.served[0].details["parameters"], use_medusa)
        progress(f"tritonserver ready at {live.url}; sequential answers for {len(cfg.prompts)} prompt(s)")
        seq.answer_all()
        progress(f"gRPC overhead: {cfg.overhead_trials} trial(s) of {cfg.max_tokens} tokens, in process vs Triton")
        overhead = seq.overhead()
        seq.service = None  # free the baseline's engine before the load phase
        run, stats = _load(cfg, live.url, seq, progress)
        live.server.check_alive("during the load phase")
        server = {"binary": str(live.server.install.binary), "source": live.server.install.source, "grpc_url": live.url}
    load = _load_summary(cfg, run, seq.answers, stats)
    checks = {
        "zero_errors": load["errors"] == 0,
        "answers_identical_to_sequential": load["mismatches"] == 0,
        "sequential_equals_in_process": not seq.mismatch,
    }
    config = {
        **{
            k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k not in ("prompts", "workdir")
        },
        "num_prompts": len(cfg.prompts),
        "engine_dir": str(engine) if cfg.workdir else None,
        "engine_built": built,
        "use_medusa": use_medusa,
        "tree_nodes": len(manifest.medusa_choices) if use_medusa and manifest.medusa_choices else 0,
        "engine_dtype": manifest.dtype,
        "torch_threads": threads,
        "model": MODEL,
        "decoupled": True,
    }
    return served_result(
        "serve_load",
        checks,
        config,
        server,
        sequential={
            "prompts": len(cfg.prompts),
            "tokens_per_answer": [len(s) for s in seq.answers],
            "mismatch_prompts_in_process": sorted(set(seq.mismatch)),
        },
        overhead=overhead,
        load=load,
        elapsed_s=round(time.perf_counter() - t_start, 3),
    )


def served_engine(cfg: ServeBenchConfig, stack: ExitStack, prefix: str) -> tuple[Path, Path, bool, Any]:
    """(work directory, native engine directory, built here?, its manifest) for a served benchmark."""
    from medusa_forge.manifest import EngineManifest

    work = workdir(cfg.workdir, stack, prefix)
    engine, built = _engine_dir(cfg, work)
    return work, engine, built, EngineManifest.load(engine)


def workdir(path: Path | None, stack: ExitStack, prefix: str) -> Path:
    """``path`` (created), or a temporary directory that lives as long as ``stack``."""
    if path is None:
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
    work = Path(path).absolute()
    work.mkdir(parents=True, exist_ok=True)
    return work


def load_phase(
    url: str,
    model: str,
    prompts: list[str],
    clients: int,
    requests: int,
    max_tokens: int,
    stream: bool,
    keep_stream: bool,
    timeout_s: float,
    time_limit_s: float,
) -> ClientRun:
    """``clients`` threads with a gRPC client each send ``requests`` requests back to back (prompts
    in rotation); requests not sent within ``time_limit_s`` are recorded as errors."""
    from medusa_forge.bench.harness import request
    from medusa_forge.serve.client import TritonLLMClient

    deadline = time.monotonic() + time_limit_s

    def body(c: int, out: list) -> None:
        try:
            client = TritonLLMClient(url, model, timeout_s, keep_stream=keep_stream)
        except Exception as e:  # noqa: BLE001 - recorded as this client's failures
            client, setup_error = None, f"{type(e).__name__}: {e}"
        try:
            for k in range(requests):
                rec: dict[str, Any] = {"client": c, "request": k, "prompt": (c + k) % len(prompts)}
                if client is None:
                    rec["error"] = setup_error
                elif time.monotonic() > deadline:
                    rec["error"] = f"not sent: the load phase passed its time limit of {time_limit_s:g} s"
                else:
                    try:
                        rec |= request(client, prompts[rec["prompt"]], max_tokens, stream)
                    except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                        rec["error"] = f"{type(e).__name__}: {e}"
                out.append(rec)
        finally:
            if client is not None:
                client.close()

    return run_clients(clients, body, lambda: deadline - time.monotonic() + timeout_s + 10)


def _load(cfg: ServeBenchConfig, url: str, seq: SequentialAnswers, progress) -> tuple[ClientRun, dict]:
    from medusa_forge.serve.client import TritonLLMClient

    total = cfg.clients * cfg.requests
    progress(
        f"load: {cfg.clients} clients x {cfg.requests} requests ({total}), {cfg.max_tokens} tokens each"
        f"{', streaming' if cfg.stream else ''}"
    )
    run = load_phase(
        url,
        MODEL,
        cfg.prompts,
        cfg.clients,
        cfg.requests,
        cfg.max_tokens,
        bool(cfg.stream),
        cfg.keep_stream,
        cfg.timeout_s,
        cfg.time_limit_s,
    )
    answered = sum("tokens" in r for r in run.records)
    with TritonLLMClient(url, MODEL, cfg.timeout_s) as client:  # the last answers' counts may lag them
        after = settled_stats(client, seq.sent + answered)
    delta = {k: after.get(k, 0) - seq.stats_before.get(k, 0) for k in after}
    return run, delta


def tally(run: ClientRun, expected: int, want: Callable[[dict], list[int]]) -> dict[str, Any]:
    """Completed, errors (requests never finished included), mismatches against ``want(record)``,
    rates and latency; the fields every load summary has."""
    ok = [r for r in run.records if "error" not in r]
    errors = [r for r in run.records if "error" in r]
    missing = expected - len(run.records)
    mismatched = [r for r in ok if r["tokens"] != want(r)]
    tokens = sum(len(r["tokens"]) for r in ok)
    samples = sorted({r["error"] for r in errors})[:5]
    if missing:
        samples.append(f"{missing} request(s) never finished ({', '.join(run.hung[:4])} still running)")
    return {
        "completed": len(ok),
        "errors": len(errors) + missing,
        "error_samples": samples,
        "mismatches": len(mismatched),
        "identical_to_sequential": len(ok) - len(mismatched),
        "wall_s": round(run.wall_s, 3),
        "requests_per_s": rate(len(ok), run.wall_s),
        "tokens_per_s": rate(tokens, run.wall_s),
        "latency_ms": percentiles([r["latency_ms"] for r in ok]),
    }


def _load_summary(cfg: ServeBenchConfig, run: ClientRun, answers: list[list[int]], delta: dict) -> dict[str, Any]:
    total = cfg.clients * cfg.requests
    n = delta.get("success", 0)

    def mean_ms(key: str) -> float | None:
        return round(delta.get(key, 0) / n / 1e6, 3) if n else None

    return {
        "clients": cfg.clients,
        "requests_per_client": cfg.requests,
        "requests": total,
        **tally(run, total, lambda r: answers[r["prompt"]]),
        "server": {
            "requests": n,
            "failed": delta.get("fail", 0),
            "mean_queue_ms": mean_ms("queue_ns"),
            "mean_compute_ms": mean_ms("compute_infer_ns"),
        },
    }


def summary_lines(doc: dict[str, Any]) -> list[str]:
    """A short human summary (also the Markdown written beside the JSON)."""
    m, o, ld, c = doc["machine"], doc["overhead"], doc["load"], doc["config"]
    lat, srv = ld["latency_ms"], ld["server"]
    kept, fresh = o["kept_stream"], o["per_request_stream"]
    decoding = f"Medusa ({c['tree_nodes']}-node tree)" if c["use_medusa"] else "plain decoding"
    return [
        f"# Serve load benchmark ({'PASSED' if doc['passed'] else 'FAILED'})",
        "",
        f"- machine: {m['cpu']}, {m['usable_cores']} usable core(s), torch threads {c['torch_threads']}"
        f"{', ' + m['cuda'] if m['cuda'] else ''}; tritonserver ({doc['server']['source']}) on 127.0.0.1, gRPC",
        f"- engine: native {c['engine_dtype']}, {decoding}, {c['instances']} instance(s), "
        f"{c['max_tokens']} new tokens per request (EOS ignored)",
        f"- load: {ld['clients']} clients x {ld['requests_per_client']} requests = {ld['requests']}: "
        f"{ld['completed']} completed, {ld['errors']} errors, {ld['identical_to_sequential']}/{ld['completed']} "
        f"identical to the sequential answer; {ld['wall_s']:.2f} s wall, {ld['requests_per_s']:.1f} req/s, "
        f"{ld['tokens_per_s']:.1f} tok/s",
        f"- load latency ms: p50 {lat.get('p50', 0):.1f}, p90 {lat.get('p90', 0):.1f}, p99 {lat.get('p99', 0):.1f} "
        f"(Triton per request: queue {srv['mean_queue_ms']} ms, compute {srv['mean_compute_ms']} ms)",
        f"- one request at a time ({o['trials']} trials, {o['tokens']} tokens), p50: in process "
        f"{o['in_process_ms']['p50']:.2f} ms; over gRPC {kept['triton_ms']['p50']:.2f} ms (kept stream), "
        f"{fresh['triton_ms']['p50']:.2f} ms (a stream per request, as `query`/`eval`)",
        f"- gRPC overhead p50: {kept['overhead_p50_ms']:.2f} ms kept stream, {fresh['overhead_p50_ms']:.2f} ms stream "
        f"per request; goal <= {o['goal_p50_ms']:g} ms: {'met' if o['meets_goal'] else 'NOT met'} (kept stream)",
        f"- time outside Triton per request (caller's wall - Triton's own), p50: "
        f"{kept['outside_triton_ms']['p50']:.2f} ms kept stream, {fresh['outside_triton_ms']['p50']:.2f} ms stream "
        f"per request",
    ]
