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

import os
import platform
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medusa_forge.errors import ForgeError

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


def _pct(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    a = np.asarray(values, dtype=np.float64)
    return {"count": len(values), "mean": round(float(a.mean()), 3), "p50": round(float(np.percentile(a, 50)), 3),
            "p90": round(float(np.percentile(a, 90)), 3), "p99": round(float(np.percentile(a, 99)), 3),
            "min": round(float(a.min()), 3), "max": round(float(a.max()), 3)}


def machine() -> dict[str, Any]:
    """The host, for the result: CPU model, cores usable here, torch threads, GPU if any."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "usable_cores": usable, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "platform": platform.platform()}


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


class _Clock:
    """Wall time of one call, in ms."""

    def __init__(self):
        self.ms = 0.0

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.ms = 1e3 * (time.perf_counter() - self.t0)


def _server_stats(client) -> dict[str, int]:
    """Triton's cumulative counters of the model: requests, and queue/compute time (ns)."""
    try:
        stats = client.inference_statistics()["model_stats"][0]
    except (ForgeError, KeyError, IndexError):
        return {}
    inf = stats.get("inference_stats", {})

    def ns(key: str) -> int:
        return int(inf.get(key, {}).get("ns", 0))

    return {"success": int(inf.get("success", {}).get("count", 0)), "fail": int(inf.get("fail", {}).get("count", 0)),
            "queue_ns": ns("queue"), "compute_infer_ns": ns("compute_infer"), "success_ns": ns("success")}


def _settled_stats(client, requests: int, timeout_s: float = 2.0) -> dict[str, int]:
    """Triton's counters once they include ``requests`` finished requests: a decoupled model's
    statistics are updated just after its final response goes out, so a read right after the
    client has that response can still miss it."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = _server_stats(client)
        if stats.get("success", 0) + stats.get("fail", 0) >= requests or time.monotonic() > deadline:
            return stats
        time.sleep(0.001)


def run_serve_bench(cfg: ServeBenchConfig, progress=print) -> dict[str, Any]:
    """Run the benchmark; returns the result document (``passed`` says whether every check held)."""
    import torch

    from medusa_forge.engine.generation import GenerationConfig
    from medusa_forge.serve.client import TritonLLMClient
    from medusa_forge.serve.native_service import NativeModelSettings, NativeService
    from medusa_forge.serve.request import RowRequest
    from medusa_forge.serve.triton_repo import RepoRequest, write_triton_repo
    from medusa_forge.serve.tritonserver import TritonServer

    cfg.check()
    t_start = time.perf_counter()
    threads = cfg.torch_threads or torch.get_num_threads()
    with ExitStack() as stack:
        if cfg.workdir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mf-serve-bench-")))
        else:
            work = Path(cfg.workdir).absolute()
            work.mkdir(parents=True, exist_ok=True)
        engine, built = _engine_dir(cfg, work)
        from medusa_forge.manifest import EngineManifest

        manifest = EngineManifest.load(engine)
        use_medusa = bool(manifest.num_medusa_heads) if cfg.use_medusa is None else cfg.use_medusa
        repo = work / "repo"
        served = write_triton_repo(RepoRequest(engine=engine, out=repo, name=MODEL, decoupled=True,
                                               use_medusa=use_medusa, instances=cfg.instances, torch_threads=threads,
                                               request_timeout_s=max(cfg.timeout_s, cfg.time_limit_s), overwrite=True))
        progress(f"engine {engine}{' (built)' if built else ''}; repository {repo}; starting tritonserver")
        server = stack.enter_context(TritonServer(repo, exit_timeout_s=5, log_path=work / "tritonserver.log"))
        url = server.grpc_url
        # The baseline: the Triton model's own code, with the parameters the server got.
        service = NativeService(NativeModelSettings.from_parameters(served.details["parameters"]))
        gcfg = GenerationConfig(max_new_tokens=cfg.max_tokens, use_medusa=use_medusa, ignore_eos=True)

        def in_process(prompt: str) -> list[int]:
            return service.run(RowRequest(prompt, gcfg, False)).tokens

        def over_grpc(client, prompt: str, stream: bool = False) -> list[int]:
            return client.generate(prompt, cfg.max_tokens, stream=stream, end_id=-1).output_tokens

        # ------------------------------------------------ sequential answers
        progress(f"tritonserver ready at {url}; sequential answers for {len(cfg.prompts)} prompt(s)")
        sequential: list[list[int]] = []
        seq_mismatch = []
        with TritonLLMClient(url, MODEL, cfg.timeout_s) as client:
            for i, prompt in enumerate(cfg.prompts):
                served_tokens = over_grpc(client, prompt)
                local = in_process(prompt)
                sequential.append(served_tokens)
                if served_tokens != local:
                    seq_mismatch.append(i)

            # ------------------------------------------------ overhead
            progress(f"gRPC overhead: {cfg.overhead_trials} trial(s) of {cfg.max_tokens} tokens, in process vs Triton")
            prompt = cfg.prompts[0]
            with TritonLLMClient(url, MODEL, cfg.timeout_s, keep_stream=True) as kept:
                sides = {"in_process": in_process, "per_request_stream": lambda p: over_grpc(client, p),
                         "kept_stream": lambda p: over_grpc(kept, p)}
                for _ in range(cfg.warmup):
                    for fn in sides.values():
                        fn(prompt)
                times: dict[str, list[float]] = {k: [] for k in sides}
                names = list(sides)
                outside: dict[str, list[float]] = {k: [] for k in names[1:]}
                sent = len(cfg.prompts) + 2 * cfg.warmup  # requests Triton has had so far
                for t in range(cfg.overhead_trials):
                    for which in names[t % 3:] + names[:t % 3]:  # rotate who goes first
                        before = _settled_stats(client, sent) if which != "in_process" else {}
                        with _Clock() as c:
                            tokens = sides[which](prompt)
                        times[which].append(c.ms)
                        if which != "in_process":  # Triton's own time for this one request (queue included)
                            sent += 1
                            after = _settled_stats(client, sent)
                            if after.get("success", 0) == before.get("success", 0) + 1:
                                outside[which].append(c.ms - (after["success_ns"] - before["success_ns"]) / 1e6)
                        if tokens != sequential[0]:
                            seq_mismatch.append(0)
            stats_before = _settled_stats(client, sent)
        service = None  # free the baseline's engine before the load phase
        local_ms = times["in_process"]
        local_p50 = float(np.percentile(local_ms, 50))
        overhead: dict[str, Any] = {"prompt_chars": len(prompt), "tokens": cfg.max_tokens,
                                    "trials": cfg.overhead_trials, "goal_p50_ms": cfg.goal_overhead_ms,
                                    "in_process_ms": _pct(local_ms)}
        for side in ("per_request_stream", "kept_stream"):
            ms = times[side]
            over = round(float(np.percentile(ms, 50)) - local_p50, 3)
            overhead[side] = {"triton_ms": _pct(ms), "overhead_p50_ms": over,
                              "overhead_paired_median_ms": round(float(np.median(np.subtract(ms, local_ms))), 3),
                              # per request: caller's wall time - Triton's time for it (success ns), i.e. gRPC
                              # and Triton's frontend only, without the model (and without its run-to-run noise)
                              "outside_triton_ms": _pct(outside[side]),
                              "meets_goal": over <= cfg.goal_overhead_ms}
        # The headline: a client that keeps its stream open (what a serving frontend does); `query`
        # and `eval` open one stream per request, which adds the stream's setup and teardown.
        overhead["overhead_p50_ms"] = overhead["kept_stream"]["overhead_p50_ms"]
        overhead["meets_goal"] = overhead["kept_stream"]["meets_goal"]

        # ------------------------------------------------ load
        total = cfg.clients * cfg.requests
        progress(f"load: {cfg.clients} clients x {cfg.requests} requests ({total}), {cfg.max_tokens} tokens each"
                 f"{', streaming' if cfg.stream else ''}")
        records: list[dict[str, Any]] = []
        lock = threading.Lock()
        start = threading.Barrier(cfg.clients + 1)
        deadline = [0.0]

        def worker(c: int) -> None:
            mine = []
            try:
                client = TritonLLMClient(url, MODEL, cfg.timeout_s, keep_stream=cfg.keep_stream)
            except Exception as e:  # noqa: BLE001 - recorded as this client's failures
                client, setup_error = None, f"{type(e).__name__}: {e}"
            try:
                start.wait(timeout=60)
                for k in range(cfg.requests):
                    p = (c + k) % len(cfg.prompts)
                    rec: dict[str, Any] = {"client": c, "request": k, "prompt": p}
                    if client is None:
                        rec["error"] = setup_error
                    elif time.monotonic() > deadline[0]:
                        rec["error"] = f"not sent: the load phase passed its time limit of {cfg.time_limit_s:g} s"
                    else:
                        t0 = time.perf_counter()
                        try:
                            rec["tokens"] = over_grpc(client, cfg.prompts[p], cfg.stream)
                            rec["latency_ms"] = 1e3 * (time.perf_counter() - t0)
                        except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                            rec["error"] = f"{type(e).__name__}: {e}"
                    mine.append(rec)
            finally:
                if client is not None:
                    client.close()
                with lock:
                    records.extend(mine)

        deadline[0] = time.monotonic() + cfg.time_limit_s
        pool = [threading.Thread(target=worker, args=(c,), daemon=True, name=f"bench-client-{c}")
                for c in range(cfg.clients)]
        for t in pool:
            t.start()
        start.wait(timeout=60)
        t0 = time.perf_counter()
        for t in pool:
            t.join(timeout=max(0.0, deadline[0] - time.monotonic()) + cfg.timeout_s + 10)
        wall = time.perf_counter() - t0
        hung = [t.name for t in pool if t.is_alive()]
        with lock:
            done = list(records)
        answered = sum("tokens" in r for r in done)
        with TritonLLMClient(url, MODEL, cfg.timeout_s) as client:  # the last answers' counts may lag them
            stats_after = _settled_stats(client, sent + answered)
        server.check_alive("during the load phase")

    ok = [r for r in done if "error" not in r]
    errors = [r for r in done if "error" in r]
    missing = total - len(done)
    mismatched = [r for r in ok if r["tokens"] != sequential[r["prompt"]]]
    latencies = [r["latency_ms"] for r in ok]
    tokens = sum(len(r["tokens"]) for r in ok)
    server_delta = {k: stats_after.get(k, 0) - stats_before.get(k, 0) for k in stats_after}
    n_server = server_delta.get("success", 0)
    load = {
        "clients": cfg.clients, "requests_per_client": cfg.requests, "requests": total, "completed": len(ok),
        "errors": len(errors) + missing, "error_samples": sorted({r["error"] for r in errors})[:5]
        + ([f"{missing} request(s) never finished ({', '.join(hung[:4])} still running)"] if missing else []),
        "mismatches": len(mismatched), "identical_to_sequential": len(ok) - len(mismatched),
        "wall_s": round(wall, 3), "requests_per_s": round(len(ok) / wall, 3) if wall else 0.0,
        "tokens_per_s": round(tokens / wall, 3) if wall else 0.0, "latency_ms": _pct(latencies),
        "server": {"requests": n_server, "failed": server_delta.get("fail", 0),
                   "mean_queue_ms": round(server_delta.get("queue_ns", 0) / n_server / 1e6, 3) if n_server else None,
                   "mean_compute_ms": round(server_delta.get("compute_infer_ns", 0) / n_server / 1e6, 3)
                   if n_server else None},
    }
    checks = {"zero_errors": load["errors"] == 0, "answers_identical_to_sequential": not mismatched,
              "sequential_equals_in_process": not seq_mismatch}
    return {
        "kind": "serve_load",
        "passed": all(checks.values()),
        "checks": checks,
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
                      if k not in ("prompts", "workdir")},
                   "num_prompts": len(cfg.prompts), "engine_dir": str(engine) if cfg.workdir else None,
                   "engine_built": built, "use_medusa": use_medusa,
                   "tree_nodes": len(manifest.medusa_choices) if use_medusa and manifest.medusa_choices else 0,
                   "engine_dtype": manifest.dtype, "torch_threads": threads,
                   "model": MODEL, "decoupled": True},
        "machine": machine(),
        "server": {"binary": str(server.install.binary), "source": server.install.source, "grpc_url": url},
        "sequential": {"prompts": len(cfg.prompts), "tokens_per_answer": [len(s) for s in sequential],
                       "mismatch_prompts_in_process": sorted(set(seq_mismatch))},
        "overhead": overhead,
        "load": load,
        "elapsed_s": round(time.perf_counter() - t_start, 3),
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
