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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medusa_forge.bench.harness import (
    ClientRun,
    Clock,
    ServedModel,
    rate,
    run_clients,
    serving,
    settled_stats,
)
from medusa_forge.bench.meta import machine
from medusa_forge.errors import ForgeError
from medusa_forge.stats import percentiles

DEFAULT_PROMPTS = (
    "def fibonacci(n):",
    "import numpy as np\n\ndef normalize(x):",
    "class Stack:\n    def __init__(self):",
    "def read_json(path):\n    with open(path) as f:",
    "import torch\n\nclass MLP(torch.nn.Module):",
    "def quicksort(items):",
    "import pandas as pd\n\ndf = pd.read_csv(",
    "def is_prime(n: int) -> bool:",
)
MODEL = "bench"


@dataclass
class ServeBenchConfig:
    engine: Path  # native engine dir, or HF model dir (built into a native engine first)
    medusa: Path | None = None  # heads for a HF model dir
    tree: str | None = None  # choice tree for the build (default: build native's)
    dtype: str | None = None  # build dtype (default: float32 on CPU, bfloat16 on CUDA)
    use_medusa: bool | None = None  # None: Medusa when the engine has heads
    clients: int = 32
    requests: int = 10  # per client
    max_tokens: int = 16
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    stream: bool = False  # load requests stream (one response per step)
    keep_stream: bool = False  # load clients keep one gRPC stream open (default: one per request, as `query`)
    overhead_trials: int = 30
    warmup: int = 3
    timeout_s: float = 120.0  # per request
    time_limit_s: float = 600.0  # the whole load phase
    instances: int = 1
    max_batch_size: int | None = None  # request slots decoded together (1: serial); None: the engine's
    torch_threads: int | None = None  # None: this process's torch thread count, for server and baseline alike
    goal_overhead_ms: float = 2.0
    workdir: Path | None = None  # keep engine/repo/log here (default: a temporary directory)

    def check(self) -> None:
        if self.clients < 1 or self.requests < 1 or self.max_tokens < 1:
            raise ForgeError("--clients, --requests and --max-tokens must be >= 1")
        if self.overhead_trials < 1 or self.warmup < 0:
            raise ForgeError("--overhead-trials must be >= 1 and --warmup >= 0")
        if self.timeout_s <= 0 or self.time_limit_s <= 0:
            raise ForgeError("--timeout and --time-limit must be > 0")
        if not self.prompts or not all(self.prompts):
            raise ForgeError("give at least one non-empty prompt")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ForgeError(f"--max-batch-size must be >= 1 (1: serial), got {self.max_batch_size}")


def _engine_dir(cfg: ServeBenchConfig, work: Path) -> tuple[Path, bool]:
    """(native engine directory, built here?)."""
    from medusa_forge.manifest import EngineManifest, is_engine_dir

    engine = Path(cfg.engine)
    if not engine.is_dir():
        raise ForgeError(f"--engine {engine}: no such directory")
    if is_engine_dir(engine):
        kind = EngineManifest.load(engine).kind
        if kind != "native":
            raise ForgeError(f"--engine {engine} is a {kind} engine; bench serve compares a native engine served "
                             "by Triton with the same engine in process")
        if cfg.medusa or cfg.tree or cfg.dtype:
            raise ForgeError("--medusa/--medusa-choices/--dtype apply when --engine is a HF model directory "
                             "(they are built in); an engine directory carries its own")
        return engine.absolute(), False
    if not (engine / "config.json").is_file():
        raise ForgeError(f"--engine {engine}: neither a native engine (medusa_forge.json) nor a HF model directory")
    import torch

    from medusa_forge.build.native import NativeBuildConfig, build_native

    out = work / "engine"
    dtype = cfg.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    build_native(NativeBuildConfig(model_dir=engine, out_dir=out, dtype=dtype,
                                   medusa_dir=Path(cfg.medusa) if cfg.medusa else None, tree=cfg.tree,
                                   verify_tokens=4))
    return out, True


def run_serve_bench(cfg: ServeBenchConfig, progress=print) -> dict[str, Any]:
    """Run the benchmark; returns the result document (``passed`` says whether every check held)."""
    import torch

    from medusa_forge.manifest import EngineManifest

    cfg.check()
    t_start = time.perf_counter()
    threads = cfg.torch_threads or torch.get_num_threads()
    with ExitStack() as stack:
        work = workdir(cfg.workdir, stack, "mf-serve-bench-")
        engine, built = _engine_dir(cfg, work)
        manifest = EngineManifest.load(engine)
        use_medusa = bool(manifest.num_medusa_heads) if cfg.use_medusa is None else cfg.use_medusa
        model = ServedModel(MODEL, use_medusa, cfg.max_batch_size, cfg.instances)
        progress(f"engine {engine}{' (built)' if built else ''}")
        live = stack.enter_context(serving(engine, work, [model], threads, max(cfg.timeout_s, cfg.time_limit_s),
                                           progress=progress))
        seq = _Sequential(cfg, live.url, live.served[0].details["parameters"], use_medusa)
        progress(f"tritonserver ready at {live.url}; sequential answers for {len(cfg.prompts)} prompt(s)")
        seq.answer_all()
        progress(f"gRPC overhead: {cfg.overhead_trials} trial(s) of {cfg.max_tokens} tokens, in process vs Triton")
        overhead = seq.overhead()
        seq.service = None  # free the baseline's engine before the load phase
        run, stats = _load(cfg, live.url, seq, progress)
        live.server.check_alive("during the load phase")
        server = {"binary": str(live.server.install.binary), "source": live.server.install.source,
                  "grpc_url": live.url}
    load = _load_summary(cfg, run, seq.answers, stats)
    checks = {"zero_errors": load["errors"] == 0, "answers_identical_to_sequential": load["mismatches"] == 0,
              "sequential_equals_in_process": not seq.mismatch}
    config = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
                 if k not in ("prompts", "workdir")},
              "num_prompts": len(cfg.prompts), "engine_dir": str(engine) if cfg.workdir else None,
              "engine_built": built, "use_medusa": use_medusa,
              "tree_nodes": len(manifest.medusa_choices) if use_medusa and manifest.medusa_choices else 0,
              "engine_dtype": manifest.dtype, "torch_threads": threads, "model": MODEL, "decoupled": True}
    return {"kind": "serve_load", "passed": all(checks.values()), "checks": checks, "config": config,
            "machine": machine(), "server": server,
            "sequential": {"prompts": len(cfg.prompts), "tokens_per_answer": [len(s) for s in seq.answers],
                           "mismatch_prompts_in_process": sorted(set(seq.mismatch))},
            "overhead": overhead, "load": load, "elapsed_s": round(time.perf_counter() - t_start, 3)}


def workdir(path: Path | None, stack: ExitStack, prefix: str) -> Path:
    """``path`` (created), or a temporary directory that lives as long as ``stack``."""
    if path is None:
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
    work = Path(path).absolute()
    work.mkdir(parents=True, exist_ok=True)
    return work


class _Sequential:
    """One request at a time: each prompt over gRPC and in process (the Triton model's own class,
    with the parameters the server got), then the overhead trials on the first prompt."""

    def __init__(self, cfg: ServeBenchConfig, url: str, parameters: dict, use_medusa: bool):
        from medusa_forge.engine.generation import GenerationConfig
        from medusa_forge.serve.native_service import NativeModelSettings, NativeService

        self.cfg, self.url = cfg, url
        self.service = NativeService(NativeModelSettings.from_parameters(parameters))
        self.gcfg = GenerationConfig(max_new_tokens=cfg.max_tokens, use_medusa=use_medusa, ignore_eos=True)
        self.answers: list[list[int]] = []
        self.mismatch: list[int] = []
        self.sent = 0  # requests Triton has had so far
        self.stats_before: dict[str, int] = {}

    def in_process(self, prompt: str) -> list[int]:
        from medusa_forge.serve.request import RowRequest

        return self.service.run(RowRequest(prompt, self.gcfg, False)).tokens

    def over_grpc(self, client, prompt: str, stream: bool = False) -> list[int]:
        return client.generate(prompt, self.cfg.max_tokens, stream=stream, end_id=-1).output_tokens

    def answer_all(self) -> None:
        from medusa_forge.serve.client import TritonLLMClient

        with TritonLLMClient(self.url, MODEL, self.cfg.timeout_s) as client:
            for i, prompt in enumerate(self.cfg.prompts):
                served = self.over_grpc(client, prompt)
                self.answers.append(served)
                if served != self.in_process(prompt):
                    self.mismatch.append(i)
        self.sent = len(self.cfg.prompts)

    def overhead(self) -> dict[str, Any]:
        """Same prompt, same tokens: in process, a stream per request, a kept stream, in turn; each
        gRPC request also gets its time outside Triton (caller's wall - Triton's success time)."""
        from medusa_forge.serve.client import TritonLLMClient

        cfg, prompt = self.cfg, self.cfg.prompts[0]
        with TritonLLMClient(self.url, MODEL, cfg.timeout_s) as client, \
                TritonLLMClient(self.url, MODEL, cfg.timeout_s, keep_stream=True) as kept:
            sides = {"in_process": self.in_process, "per_request_stream": lambda p: self.over_grpc(client, p),
                     "kept_stream": lambda p: self.over_grpc(kept, p)}
            for _ in range(cfg.warmup):
                for fn in sides.values():
                    fn(prompt)
            self.sent += 2 * cfg.warmup
            times, outside = self._trials(client, sides, prompt)
            self.stats_before = settled_stats(client, self.sent)
        return _overhead_summary(cfg, len(prompt), times, outside)

    def _trials(self, client, sides: dict, prompt: str) -> tuple[dict, dict]:
        names = list(sides)
        times: dict[str, list[float]] = {k: [] for k in names}
        outside: dict[str, list[float]] = {k: [] for k in names[1:]}
        for t in range(self.cfg.overhead_trials):
            for which in names[t % 3:] + names[:t % 3]:  # rotate who goes first
                grpc = which != "in_process"
                before = settled_stats(client, self.sent) if grpc else {}
                with Clock() as c:
                    tokens = sides[which](prompt)
                times[which].append(c.ms)
                if grpc:  # Triton's own time for this one request (queue included)
                    self.sent += 1
                    after = settled_stats(client, self.sent)
                    if after.get("success", 0) == before.get("success", 0) + 1:
                        outside[which].append(c.ms - (after["success_ns"] - before["success_ns"]) / 1e6)
                if tokens != self.answers[0]:
                    self.mismatch.append(0)
        return times, outside


def _overhead_summary(cfg: ServeBenchConfig, prompt_chars: int, times: dict, outside: dict) -> dict[str, Any]:
    local_ms = times["in_process"]
    local_p50 = float(np.percentile(local_ms, 50))
    overhead: dict[str, Any] = {"prompt_chars": prompt_chars, "tokens": cfg.max_tokens,
                                "trials": cfg.overhead_trials, "goal_p50_ms": cfg.goal_overhead_ms,
                                "in_process_ms": percentiles(local_ms)}
    for side in ("per_request_stream", "kept_stream"):
        ms = times[side]
        over = round(float(np.percentile(ms, 50)) - local_p50, 3)
        overhead[side] = {"triton_ms": percentiles(ms), "overhead_p50_ms": over,
                          "overhead_paired_median_ms": round(float(np.median(np.subtract(ms, local_ms))), 3),
                          # per request: caller's wall time - Triton's time for it (success ns), i.e. gRPC
                          # and Triton's frontend only, without the model (and without its run-to-run noise)
                          "outside_triton_ms": percentiles(outside[side]),
                          "meets_goal": over <= cfg.goal_overhead_ms}
    # The headline: a client that keeps its stream open (what a serving frontend does); `query`
    # and `eval` open one stream per request, which adds the stream's setup and teardown.
    overhead["overhead_p50_ms"] = overhead["kept_stream"]["overhead_p50_ms"]
    overhead["meets_goal"] = overhead["kept_stream"]["meets_goal"]
    return overhead


def load_phase(url: str, model: str, prompts: list[str], clients: int, requests: int, max_tokens: int,
               stream: bool, keep_stream: bool, timeout_s: float, time_limit_s: float) -> ClientRun:
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


def _load(cfg: ServeBenchConfig, url: str, seq: _Sequential, progress) -> tuple[ClientRun, dict]:
    from medusa_forge.serve.client import TritonLLMClient

    total = cfg.clients * cfg.requests
    progress(f"load: {cfg.clients} clients x {cfg.requests} requests ({total}), {cfg.max_tokens} tokens each"
             f"{', streaming' if cfg.stream else ''}")
    run = load_phase(url, MODEL, cfg.prompts, cfg.clients, cfg.requests, cfg.max_tokens, cfg.stream,
                     cfg.keep_stream, cfg.timeout_s, cfg.time_limit_s)
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
    return {"completed": len(ok), "errors": len(errors) + missing, "error_samples": samples,
            "mismatches": len(mismatched), "identical_to_sequential": len(ok) - len(mismatched),
            "wall_s": round(run.wall_s, 3), "requests_per_s": rate(len(ok), run.wall_s),
            "tokens_per_s": rate(tokens, run.wall_s), "latency_ms": percentiles([r["latency_ms"] for r in ok])}


def _load_summary(cfg: ServeBenchConfig, run: ClientRun, answers: list[list[int]], delta: dict) -> dict[str, Any]:
    total = cfg.clients * cfg.requests
    n = delta.get("success", 0)

    def mean_ms(key: str) -> float | None:
        return round(delta.get(key, 0) / n / 1e6, 3) if n else None

    return {"clients": cfg.clients, "requests_per_client": cfg.requests, "requests": total,
            **tally(run, total, lambda r: answers[r["prompt"]]),
            "server": {"requests": n, "failed": delta.get("fail", 0), "mean_queue_ms": mean_ms("queue_ns"),
                       "mean_compute_ms": mean_ms("compute_infer_ns")}}

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
