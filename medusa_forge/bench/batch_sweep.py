"""``medusa-forge bench batch``: the serve sweep in process. The same client counts and modes as
``bench serve`` (plain or Medusa, serial or batched), each client a thread handing requests straight
to the engine's scheduler (the serial loop, or the in-flight batcher with ``--max-batch-size``
slots): no tritonserver, no gRPC. It isolates what the scheduler and the engine do under load from
the serving layer, and runs where no tritonserver does.

Every answer must equal the engine's own one-at-a-time greedy output for its prompt; reported per
(mode, clients): aggregate tokens/s, p50/p99 latency and time to first token, as ``bench serve``'s
sweep reports them (the same JSON rows, Markdown and PNG).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from medusa_forge.atomic import atomic_write_json, atomic_write_text
from medusa_forge.bench.harness import ClientRun, run_clients
from medusa_forge.bench.meta import machine
from medusa_forge.bench.serve_sweep import MODES, document, parse_modes, plot, ratios, summary_lines, sweep_row
from medusa_forge.engine.batcher import InflightBatcher
from medusa_forge.engine.fresh_thread import in_fresh_thread
from medusa_forge.engine.generation import GenerationConfig
from medusa_forge.engine.options import engine_options
from medusa_forge.engine.serial import SerialScheduler
from medusa_forge.errors import ForgeError
from medusa_forge.prompts import read_prompts


@dataclass
class BatchSweepConfig:
    clients: list[int]
    modes: list[str]
    requests: int = 4  # per client
    max_tokens: int = 32
    max_batch_size: int = 8
    speculation: str = "auto"
    timeout_s: float = 300.0


def run_batch_sweep(engine, prompts: list[list[int]], cfg: BatchSweepConfig, progress=print) -> dict[str, Any]:
    """Run every (clients, mode) pair in turn; ``passed``: no error and every answer the reference."""
    if not cfg.clients or min(cfg.clients) < 1:
        raise ForgeError("--clients: every client count must be >= 1")
    modes = [m for m in cfg.modes if engine.heads is not None or not m.startswith("medusa")]
    t_start = time.perf_counter()
    # Set-up and schedulers off this thread, each scheduler alive only for its run: as served, the
    # loop thread running the steps is the process's only OpenMP team (engine/fresh_thread.py).
    reference = in_fresh_thread(lambda: [engine.generate_ids(ids, _gcfg(cfg, medusa=False)).tokens for ids in prompts])
    costs: dict[str, Any] = {}  # each batched mode's cost model, measured by its first scheduler
    described: dict[str, dict] = {}
    rows = []
    for n in cfg.clients:
        for mode in modes:  # interleaved, so a drift of the machine's speed touches every mode alike
            progress(f"{mode}: {n} client(s) x {cfg.requests} request(s), {cfg.max_tokens} tokens each")
            scheduler = in_fresh_thread(lambda mode=mode: _scheduler(engine, mode, cfg, costs.get(mode)))
            try:
                run = _load(scheduler, prompts, n, cfg, medusa=mode.startswith("medusa"))
                described[mode] = scheduler.describe()
            finally:
                scheduler.close()
            if getattr(scheduler, "policy", None) is not None:
                costs[mode] = scheduler.policy.cost
            slots = 1 if mode.endswith("serial") else cfg.max_batch_size
            rows.append(sweep_row(mode, n, cfg.requests, run, lambda r: reference[r["prompt"]], slots))
    checks = {
        "zero_errors": all(r["errors"] == 0 for r in rows),
        "answers_identical_to_sequential": all(r["mismatches"] == 0 for r in rows),
    }
    return {
        "kind": "batch_sweep",
        "passed": all(checks.values()),
        "checks": checks,
        "config": {
            **vars(cfg),
            "modes": modes,
            "num_prompts": len(prompts),
            "engine_dtype": str(engine.model.lm_head.weight.dtype).removeprefix("torch."),
            "device": str(engine.device),
            "tree_nodes": engine.tree.num_nodes if engine.tree is not None else 0,
            "schedulers": described,
        },
        "machine": machine(),
        "rows": rows,
        "ratios": ratios(rows),
        "elapsed_s": round(time.perf_counter() - t_start, 3),
    }


def _gcfg(cfg: BatchSweepConfig, medusa: bool) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=cfg.max_tokens, use_medusa=medusa, ignore_eos=True)


def _scheduler(engine, mode: str, cfg: BatchSweepConfig, cost=None):
    if mode.endswith("serial"):
        return SerialScheduler(engine)
    return InflightBatcher(engine, cfg.max_batch_size, speculation=cfg.speculation, cost=cost)


def _load(scheduler, prompts: list[list[int]], clients: int, cfg: BatchSweepConfig, medusa: bool) -> ClientRun:
    """``clients`` threads, each sending ``cfg.requests`` requests one after another (prompts in rotation)."""
    gcfg = _gcfg(cfg, medusa)

    def client(i: int, records: list) -> None:
        for r in range(cfg.requests):
            p = (i * cfg.requests + r) % len(prompts)
            first: list[float] = []
            t0 = time.perf_counter()
            try:
                ticket = scheduler.submit(
                    prompts[p], gcfg, on_tokens=lambda _t: first or first.append(time.perf_counter())
                )
                res = ticket.result(timeout=cfg.timeout_s)
                rec = {"prompt": p, "tokens": res.tokens, "latency_ms": (time.perf_counter() - t0) * 1e3}
                rec["ttft_ms"] = ((first[0] if first else time.perf_counter()) - t0) * 1e3
            except Exception as e:  # one request's failure is a counted error, not the end of the run
                rec = {"prompt": p, "error": f"{type(e).__name__}: {e}"}
            records.append(rec)

    return run_clients(clients, client, lambda: cfg.timeout_s * cfg.requests, name="batch-client")


def markdown(doc: dict[str, Any]) -> str:
    c = doc["config"]
    return document(
        doc,
        "Batch sweep in process: clients x modes",
        "clients are threads calling the engine's scheduler (no tritonserver, no gRPC)",
        f"native {c['engine_dtype']} on {c['device']}, Medusa tree of {c['tree_nodes']} nodes; batched modes "
        f"{c['max_batch_size']} slots, speculation `{c['speculation']}`; serial one request at a time",
    )


@click.command("batch")
@engine_options
@click.option("--prompts", required=True, type=click.Path(), help="JSONL with a 'prompt' per line.")
@click.option("--num-prompts", default=8, show_default=True, help="Distinct prompts used (the first N).")
@click.option("--max-prompt-tokens", default=128, show_default=True, help="Keep the last N tokens of each prompt.")
@click.option("--clients", default="1,2,4,8,16,32", show_default=True, help="Concurrent clients (threads).")
@click.option("--modes", default=",".join(MODES), show_default=True, help="plain|medusa x serial|batched.")
@click.option("--max-batch-size", default=8, show_default=True, help="Request slots of the batched modes.")
@click.option("--speculation", default="auto", show_default=True, help="Batched Medusa: auto, fixed, off-above:N.")
@click.option("--requests", default=4, show_default=True, help="Requests per client.")
@click.option("--max-tokens", default=32, show_default=True, help="New tokens per request (EOS ignored).")
@click.option("--out", default=None, type=click.Path(), help="Write the JSON here (.md and .png beside it).")
def batch_cmd(model, medusa, tree, device, dtype, max_seq_len, compile_, **opts):
    """The serve sweep in process: clients x modes against the engine's schedulers directly.
    Exit 1 if a request fails or an answer differs from the engine's own one-at-a-time output."""
    from medusa_forge.engine.load import load_engine

    counts = sorted({int(c) for c in opts["clients"].split(",") if c.strip()})
    engine = in_fresh_thread(
        lambda: load_engine(
            model, medusa, tree=tree, device=device, dtype=dtype, max_seq_len=max_seq_len, compile=compile_
        )
    )
    texts = [p.prompt for p in read_prompts(opts["prompts"], limit=opts["num_prompts"])]
    ids = [engine.tokenizer.encode(t)[-opts["max_prompt_tokens"] :] for t in texts]
    cfg = BatchSweepConfig(
        counts,
        parse_modes(opts["modes"]),
        **{k: opts[k] for k in ("requests", "max_tokens", "max_batch_size", "speculation")},
    )
    doc = run_batch_sweep(engine, ids, cfg, progress=lambda m: click.echo(m, err=True))
    for line in summary_lines(doc):
        click.echo(line)
    if opts["out"]:
        path = Path(opts["out"])
        atomic_write_json(path, doc)
        atomic_write_text(path.with_suffix(".md"), markdown(doc))
        plot(doc, path.with_suffix(".png"), title="bench batch (in process)")
        click.echo(f"wrote {path} (+ .md, .png)")
    if not doc["passed"]:
        raise SystemExit(1)
