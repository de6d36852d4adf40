"""What the serve benchmarks (``bench serve``, its client sweep, the soak) share: a tritonserver
serving one engine as named models, the sequential answers every answer under load is checked
against, concurrent client threads, one timed request, and Triton's own counters."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medusa_forge.errors import ForgeError


@dataclass(frozen=True)
class ServedModel:
    """One Triton model of the benchmark's repository (decoupled: unary and streaming both work)."""

    name: str
    use_medusa: bool
    max_batch_size: int | None = None  # request slots decoded together; 1: serial; None: the engine's
    instances: int = 1


@dataclass
class Serving:
    server: Any  # TritonServer, started
    served: list[Any]  # write_triton_repo's answers, one per model (their ``details["parameters"]``)

    @property
    def url(self) -> str:
        return self.server.grpc_url


@contextmanager
def serving(
    engine: Path,
    work: Path,
    models: list[ServedModel],
    torch_threads: int | None,
    request_timeout_s: float = 600.0,
    exit_timeout_s: float = 5.0,
    progress: Callable[[str], None] = print,
) -> Iterator[Serving]:
    """Write ``work/repo`` with ``models`` and run tritonserver on it (log: ``work/tritonserver.log``)."""
    from medusa_forge.serve.triton_repo import RepoRequest, write_triton_repo
    from medusa_forge.serve.tritonserver import TritonServer

    repo = work / "repo"
    served = [
        write_triton_repo(
            RepoRequest(
                engine=engine,
                out=repo,
                name=m.name,
                decoupled=True,
                use_medusa=m.use_medusa,
                max_batch_size=m.max_batch_size,
                instances=m.instances,
                torch_threads=torch_threads,
                request_timeout_s=request_timeout_s,
                add=k > 0,
                overwrite=k == 0,
            )
        )
        for k, m in enumerate(models)
    ]
    progress(
        f"repository {repo} ({', '.join(m.name for m in models)}); starting tritonserver "
        f"(log: {work / 'tritonserver.log'})"
    )
    with TritonServer(repo, exit_timeout_s=exit_timeout_s, log_path=work / "tritonserver.log") as server:
        yield Serving(server, served)


def request(
    client, prompt: str, max_tokens: int, stream: bool, on_text: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """One greedy request (EOS ignored): its tokens, text, latency and time to first text (ms), as
    the caller sees them, queueing included (without streaming the first text is the last)."""
    reply = client.generate(prompt, max_tokens, stream=stream, end_id=-1, on_text=on_text)
    return {
        "tokens": reply.output_tokens,
        "text": reply.text,
        "latency_ms": 1e3 * reply.total_s,
        "ttft_ms": 1e3 * reply.ttft_s,
    }


def sequential_answers(
    url: str, models: list[str], prompts: list[str], max_tokens: int, timeout_s: float, stream: bool = True
) -> dict[tuple[str, int], dict[str, Any]]:
    """What one client alone gets for every (model, prompt): the reference for every answer under load."""
    from medusa_forge.serve.client import TritonLLMClient

    out = {}
    for m in models:
        with TritonLLMClient(url, m, timeout_s) as client:
            for i, p in enumerate(prompts):
                out[m, i] = request(client, p, max_tokens, stream)
    return out


@dataclass
class ClientRun:
    """What concurrent clients did: every record they made, the wall time, the threads still running."""

    records: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    hung: list[str] = field(default_factory=list)


def run_clients(
    clients: int, body: Callable[[int, list], None], join_s: Callable[[], float], name: str = "bench-client"
) -> ClientRun:
    """``clients`` threads released together, each running ``body(i, records)``, which appends its
    records to the list it is given (kept even when ``body`` raises). ``join_s()`` is how long the
    caller still waits for each thread; the wall time runs from the release to the last join."""
    run, lock = ClientRun(), threading.Lock()
    start = threading.Barrier(clients + 1)

    def thread(i: int) -> None:
        mine: list[dict[str, Any]] = []
        try:
            start.wait(timeout=60)
            body(i, mine)
        finally:
            with lock:
                run.records.extend(mine)

    pool = [threading.Thread(target=thread, args=(i,), daemon=True, name=f"{name}-{i}") for i in range(clients)]
    for t in pool:
        t.start()
    start.wait(timeout=60)
    t0 = time.perf_counter()
    for t in pool:
        t.join(timeout=max(0.0, join_s()))
    run.wall_s = time.perf_counter() - t0
    run.hung = [t.name for t in pool if t.is_alive()]
    with lock:
        run.records = list(run.records)
    return run


class Clock:
    """Wall time of one call, in ms."""

    def __init__(self):
        self.ms = 0.0

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.ms = 1e3 * (time.perf_counter() - self.t0)


def server_stats(client) -> dict[str, int]:
    """Triton's cumulative counters of the client's model: requests, and queue/compute time (ns)."""
    try:
        stats = client.inference_statistics()["model_stats"][0]
    except (ForgeError, KeyError, IndexError):
        return {}
    inf = stats.get("inference_stats", {})

    def ns(key: str) -> int:
        return int(inf.get(key, {}).get("ns", 0))

    return {
        "success": int(inf.get("success", {}).get("count", 0)),
        "fail": int(inf.get("fail", {}).get("count", 0)),
        "queue_ns": ns("queue"),
        "compute_infer_ns": ns("compute_infer"),
        "success_ns": ns("success"),
    }


def settled_stats(client, requests: int, timeout_s: float = 2.0) -> dict[str, int]:
    """Triton's counters once they include ``requests`` finished requests: a decoupled model's
    statistics are updated just after its final response goes out, so a read right after the
    client has that response can still miss it."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = server_stats(client)
        if stats.get("success", 0) + stats.get("fail", 0) >= requests or time.monotonic() > deadline:
            return stats
        time.sleep(0.001)


def rate(count: float, wall_s: float) -> float:
    return round(count / wall_s, 3) if wall_s else 0.0
