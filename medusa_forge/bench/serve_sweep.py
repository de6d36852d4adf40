"""``medusa-forge bench serve`` with several client counts: a sweep of concurrent streaming clients
against one tritonserver serving the engine in up to four modes, one Triton model each:

- ``plain-serial`` / ``medusa-serial``: ``--max-batch-size 1``, one request decoded at a time;
- ``plain-batched`` / ``medusa-batched``: ``--max-batch-size N``, up to N request slots decoded together.

For each client count, every mode in turn gets ``clients`` threads sending ``requests`` streaming
requests each (prompts in rotation); every answer must equal the mode's sequential answer, and the
modes' sequential answers must agree with each other (greedy decoding is exact whatever the mode).
Reported per (mode, clients): aggregate tokens/s, p50/p99 latency and time to first token (the
caller's, queueing included); per decoding, batched against serial at each client count. Written as
JSON, Markdown and a PNG of throughput and latency against clients.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

from medusa_forge.bench.harness import ServedModel, sequential_answers, serving
from medusa_forge.bench.meta import served_result
from medusa_forge.bench.serve_bench import (
    ServeBenchConfig,
    load_phase,
    served_engine,
    tally,
)
from medusa_forge.errors import ForgeError
from medusa_forge.stats import percentiles

MODES = ("plain-serial", "plain-batched", "medusa-serial", "medusa-batched")
DEFAULT_CLIENTS = (1, 2, 4, 8, 16, 32)
DEFAULT_BATCH = 8


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ForgeError(f"--modes {text!r}: give a comma-separated list of {', '.join(MODES)}")
    return list(dict.fromkeys(modes))


def served_models(modes: list[str], max_batch_size: int, instances: int) -> list[ServedModel]:
    return [
        ServedModel(m, m.startswith("medusa"), 1 if m.endswith("serial") else max_batch_size, instances) for m in modes
    ]


def run_serve_sweep(cfg: ServeBenchConfig, clients: list[int], modes: list[str], progress=print) -> dict[str, Any]:
    """Run the sweep; returns the result document (``passed``: no error, every answer the sequential one)."""
    import torch

    cfg.check()
    if not clients or min(clients) < 1:
        raise ForgeError("--clients: every client count must be >= 1")
    batch = cfg.max_batch_size or DEFAULT_BATCH
    stream = cfg.stream is not False  # a sweep streams unless told --unary: its TTFT is the first chunk's
    t_start = time.perf_counter()
    threads = cfg.torch_threads or torch.get_num_threads()
    with ExitStack() as stack:
        work, engine, built, manifest = served_engine(cfg, stack, "mf-serve-sweep-")
        if not manifest.num_medusa_heads or cfg.use_medusa is False:
            modes = [m for m in modes if not m.startswith("medusa")]
        if not modes:
            raise ForgeError("no mode left to run: the Medusa modes need an engine with heads (and no --no-medusa)")
        models = served_models(modes, batch, cfg.instances)
        live = stack.enter_context(
            serving(engine, work, models, threads, max(cfg.timeout_s, cfg.time_limit_s), progress=progress)
        )
        progress(f"tritonserver ready at {live.url}; sequential answers for {len(modes)} mode(s)")
        reference = sequential_answers(live.url, modes, cfg.prompts, cfg.max_tokens, cfg.timeout_s)
        rows = []
        for n in clients:
            for mode in modes:  # interleaved, so a drift of the machine's speed touches every mode alike
                progress(f"{mode}: {n} client(s) x {cfg.requests} request(s), {cfg.max_tokens} tokens each")
                run = load_phase(
                    live.url,
                    mode,
                    cfg.prompts,
                    n,
                    cfg.requests,
                    cfg.max_tokens,
                    stream,
                    False,
                    cfg.timeout_s,
                    cfg.time_limit_s,
                )
                slots = next(m.max_batch_size for m in models if m.name == mode)
                rows.append(
                    sweep_row(mode, n, cfg.requests, run, lambda r: reference[mode, r["prompt"]]["tokens"], slots)
                )
        live.server.check_alive("during the sweep")
        server = {"binary": str(live.server.install.binary), "source": live.server.install.source}
    agree = _modes_agree(reference, modes, len(cfg.prompts))
    checks = {
        "zero_errors": all(r["errors"] == 0 for r in rows),
        "answers_identical_to_sequential": all(r["mismatches"] == 0 for r in rows),
        "modes_agree": agree,
    }
    config = {
        **{
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in asdict(cfg).items()
            if k
            not in ("prompts", "workdir", "clients", "overhead_trials", "goal_overhead_ms", "stream", "keep_stream")
        },
        "clients": clients,
        "modes": modes,
        "max_batch_size": batch,
        "num_prompts": len(cfg.prompts),
        "engine_built": built,
        "engine_dtype": manifest.dtype,
        "torch_threads": threads,
        "tree_nodes": len(manifest.medusa_choices or []),
        "stream": stream,
    }
    return served_result(
        "serve_sweep",
        checks,
        config,
        server,
        rows=rows,
        ratios=ratios(rows),
        elapsed_s=round(time.perf_counter() - t_start, 3),
    )


def sweep_row(mode: str, clients: int, requests: int, run, want, max_batch_size: int) -> dict[str, Any]:
    """One (mode, clients) row: the load tally against ``want(record)`` (the expected tokens), plus TTFT."""
    row = {
        "mode": mode,
        "decoding": mode.split("-")[0],
        "batching": mode.split("-")[1],
        "max_batch_size": max_batch_size,
        "clients": clients,
        "requests": clients * requests,
    }
    row |= tally(run, clients * requests, want)
    row["ttft_ms"] = percentiles([r["ttft_ms"] for r in run.records if "error" not in r])
    return row


def _modes_agree(reference: dict, modes: list[str], prompts: int) -> bool:
    return all(reference[m, i]["tokens"] == reference[modes[0], i]["tokens"] for m in modes for i in range(prompts))


def ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per decoding and client count, batched / serial (tokens/s; p50 latency and TTFT, lower is
    better); per mode, tokens/s and p50 latency against its own one-client figures."""
    at = {(r["mode"], r["clients"]): r for r in rows}
    out: dict[str, Any] = {"batched_vs_serial": {}, "vs_one_client": {}, "medusa_vs_plain_batched": {}}
    for (mode, n), r in at.items():
        if mode.endswith("batched") and (serial := at.get((mode.replace("batched", "serial"), n))):
            out["batched_vs_serial"].setdefault(r["decoding"], {})[str(n)] = _compare(r, serial)
        if (one := at.get((mode, min(c for m, c in at if m == mode)))) is not None and one is not r:
            out["vs_one_client"].setdefault(mode, {})[str(n)] = _compare(r, one)
        if mode == "medusa-batched" and (plain := at.get(("plain-batched", n))):
            out["medusa_vs_plain_batched"][str(n)] = _compare(r, plain)
    return out


def _compare(a: dict, b: dict) -> dict[str, float | None]:
    def div(x: float, y: float) -> float | None:
        return round(x / y, 3) if y else None

    return {
        "tokens_per_s": div(a["tokens_per_s"], b["tokens_per_s"]),
        "latency_p50": div(a["latency_ms"]["p50"], b["latency_ms"]["p50"]),
        "ttft_p50": div(a["ttft_ms"]["p50"], b["ttft_ms"]["p50"]),
    }


def markdown(doc: dict[str, Any]) -> str:
    c = doc["config"]
    return document(
        doc,
        "Serve sweep: clients x modes",
        f"torch threads {c['torch_threads']}; tritonserver on 127.0.0.1, gRPC, "
        + ("streaming" if c.get("stream", True) else "unary requests (TTFT = the whole answer)"),
        f"native {c['engine_dtype']}, Medusa tree of {c['tree_nodes']} nodes; batched modes "
        f"`--max-batch-size {c['max_batch_size']}`, serial `1`; {c['instances']} instance(s) each",
    )


def document(doc: dict[str, Any], title: str, setting: str, engine: str) -> str:
    """A sweep's Markdown: what ran (``setting``: how clients reach the engine), then its tables."""
    c, m = doc["config"], doc["machine"]
    lines = [
        f"# {title} ({'PASSED' if doc['passed'] else 'FAILED'})",
        "",
        f"- machine: {m['cpu']}, {m['usable_cores']} usable core(s){', ' + m['cuda'] if m['cuda'] else ''}; {setting}",
        f"- engine: {engine}",
        f"- {c['requests']} request(s) per client, {c['max_tokens']} new tokens each (EOS ignored), "
        f"{c['num_prompts']} prompt(s)",
        "- checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in doc["checks"].items()),
    ]
    return "\n".join(lines + table_lines(doc)) + "\n"


def table_lines(doc: dict[str, Any]) -> list[str]:
    """The rows, then batched / serial at each client count (Markdown)."""
    lines = [
        "",
        "| mode | clients | tok/s | req/s | p50 ms | p99 ms | TTFT p50 ms | TTFT p99 ms | errors | identical |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["rows"]:
        lat, ttft = r["latency_ms"], r["ttft_ms"]
        lines.append(
            f"| {r['mode']} | {r['clients']} | {r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | "
            f"{lat['p50']:.0f} | {lat['p99']:.0f} | {ttft['p50']:.0f} | {ttft['p99']:.0f} | "
            f"{r['errors']} | {r['identical_to_sequential']}/{r['completed']} |"
        )
    bvs = doc["ratios"]["batched_vs_serial"]
    if bvs:
        lines += [
            "",
            "Batched / serial at the same client count (tok/s: higher is better; p50 latency and "
            "TTFT: lower is better):",
            "",
            "| decoding | clients | tok/s | p50 latency | TTFT p50 |",
            "|---|---:|---:|---:|---:|",
        ]
        for dec, by_n in bvs.items():
            for n, v in by_n.items():
                lines.append(f"| {dec} | {n} | {v['tokens_per_s']} | {v['latency_p50']} | {v['ttft_p50']} |")
    return lines


def plot(doc: dict[str, Any], path: Path, title: str = "bench serve sweep") -> None:
    """Aggregate tokens/s, p50 latency and p50 TTFT against clients, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = (
        ("tokens/s (aggregate)", lambda r: r["tokens_per_s"]),
        ("p50 latency (ms)", lambda r: r["latency_ms"]["p50"]),
        ("p50 time to first token (ms)", lambda r: r["ttft_ms"]["p50"]),
    )
    for ax, (label, value) in zip(axes, panels):
        for mode in doc["config"]["modes"]:
            rows = [r for r in doc["rows"] if r["mode"] == mode]
            style = "-" if mode.endswith("batched") else "--"
            ax.plot([r["clients"] for r in rows], [value(r) for r in rows], style, marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xticks(doc["config"]["clients"], [str(n) for n in doc["config"]["clients"]])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    machine = doc["machine"]
    fig.suptitle(f"{title} ({machine.get('cuda') or machine['cpu']})", fontsize=9)  # where the engines ran
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_lines(doc: dict[str, Any]) -> list[str]:
    return [
        f"{r['mode']:>15} x{r['clients']:<3} {r['tokens_per_s']:8.1f} tok/s  p50 {r['latency_ms']['p50']:8.0f} ms"
        f"  p99 {r['latency_ms']['p99']:8.0f} ms  TTFT p50 {r['ttft_ms']['p50']:8.0f} ms  errors {r['errors']}"
        f"  identical {r['identical_to_sequential']}/{r['completed']}"
        for r in doc["rows"]
    ]
