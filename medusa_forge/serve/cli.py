"""``medusa-forge triton-repo``, ``serve`` and ``query``.

Flag names echo tensorrtllm_backend's fill_template keys and launch_triton_server.py where they mean
the same thing (``--max_batch_size`` for triton_max_batch_size, ``--decoupled`` for decoupled_mode,
``--grpc_port``/``--http_port``/``--metrics_port``, ``--world_size``); both spellings are accepted.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click

from medusa_forge.cli_options import json_option, out_dir_option, overwrite_option
from medusa_forge.engine.options import engine_options, no_medusa_option
from medusa_forge.errors import ForgeError


@click.command(name="triton-repo")
@engine_options
@out_dir_option("Model repository to write.", alias="--model_repo")
@click.option("--name", default="ensemble", show_default=True, help="Model name clients call.")
@click.option(
    "--max-batch-size",
    "--max_batch_size",
    "--triton_max_batch_size",
    "max_batch_size",
    type=int,
    default=None,
    help="Triton max_batch_size (default: the engine's). Native: requests decoded together, "
    "1 = one at a time, N = in-flight batching over N slots per instance.",
)
@click.option(
    "--max-queue",
    "max_queue",
    type=int,
    default=0,
    show_default=True,
    help="Native: requests that may wait beyond the running batch, per instance (0 = unbounded); "
    "past it a request gets an error at once.",
)
@click.option(
    "--speculation",
    default="auto",
    show_default=True,
    help="Native, --max-batch-size > 1: the batcher's tree per step under load: auto (from a cost model "
    "measured at load), fixed (the engine's tree always), off-above:N (plain decoding above N "
    "active requests).",
)
@click.option(
    "--decoupled",
    "--decoupled_mode",
    "decoupled",
    is_flag=True,
    help="Decoupled transaction policy: needed for streaming (stream=true).",
)
@click.option(
    "--instances",
    default=1,
    show_default=True,
    help="Model instances (native: one engine each; TensorRT-LLM: pre/post-processing and BLS).",
)
@no_medusa_option("Native: serve plain decoding of the same engine (heads not loaded): the base for `eval`.")
@click.option(
    "--add",
    is_flag=True,
    help="Add this model to the existing repository --out (e.g. `--name base --no-medusa --add` beside "
    "`--name medusa`), so one server hosts both.",
)
@click.option(
    "--request-timeout",
    "request_timeout",
    type=float,
    default=600.0,
    show_default=True,
    help="Native: seconds a request may wait in the queue, and then run, before it fails.",
)
@click.option("--torch-threads", type=int, default=None, help="Native on CPU: intra-op threads per instance.")
@click.option(
    "--tokenizer-dir",
    "--tokenizer_dir",
    "tokenizer_dir",
    type=click.Path(),
    default=None,
    help="TensorRT-LLM: HF tokenizer directory for pre/post-processing (default: from the manifest).",
)
@click.option(
    "--tensorrtllm-backend",
    "tensorrtllm_backend",
    type=click.Path(),
    default=None,
    help="TensorRT-LLM: tensorrtllm_backend v0.11.0 checkout providing the Python models "
    "(default: $TENSORRTLLM_BACKEND_DIR, /opt/tensorrtllm_backend, /tensorrtllm_backend).",
)
@click.option(
    "--kv-cache-free-gpu-mem-fraction",
    "--kv_cache_free_gpu_mem_fraction",
    "kv_fraction",
    type=float,
    default=0.9,
    show_default=True,
    help="TensorRT-LLM: KV cache share of free GPU memory.",
)
@click.option(
    "--batching-strategy",
    "--batching_strategy",
    "batching_strategy",
    default="inflight_fused_batching",
    show_default=True,
    help="TensorRT-LLM: gpt_model_type.",
)
@click.option(
    "--batch-scheduler-policy",
    "--batch_scheduler_policy",
    "batch_scheduler_policy",
    default="guaranteed_no_evict",
    show_default=True,
    help="TensorRT-LLM: guaranteed_no_evict | max_utilization.",
)
@click.option(
    "--max-queue-delay-microseconds",
    "--max_queue_delay_microseconds",
    "max_queue_delay",
    default=0,
    show_default=True,
    help="TensorRT-LLM: dynamic batcher queue delay.",
)
@overwrite_option()
def triton_repo(
    model,
    medusa,
    tree,
    device,
    dtype,
    max_seq_len,
    compile_,
    out,
    name,
    max_batch_size,
    max_queue,
    speculation,
    decoupled,
    instances,
    no_medusa,
    add,
    request_timeout,
    torch_threads,
    tokenizer_dir,
    tensorrtllm_backend,
    kv_fraction,
    batching_strategy,
    batch_scheduler_policy,
    max_queue_delay,
    overwrite,
):
    """Write a Triton model repository for an engine (native or TensorRT-LLM, from its manifest).

    Both kinds expose the same contract under --name (default `ensemble`): tensorrtllm_backend's
    ensemble inputs (text_input, max_tokens, stream, ...) and text_output. With --add the model
    joins an existing repository (a Medusa engine and its base on one server).
    """
    from medusa_forge.serve.triton_repo import RepoRequest, write_triton_repo

    trtllm = {
        "kv_cache_free_gpu_mem_fraction": kv_fraction,
        "batching_strategy": batching_strategy,
        "batch_scheduler_policy": batch_scheduler_policy,
        "max_queue_delay_microseconds": max_queue_delay,
    }
    served = write_triton_repo(
        RepoRequest(
            engine=Path(model),
            out=Path(out),
            name=name,
            max_batch_size=max_batch_size,
            max_queue=max_queue,
            speculation=speculation,
            decoupled=decoupled,
            instances=instances,
            overwrite=overwrite,
            add=add,
            use_medusa=not no_medusa,
            medusa=Path(medusa) if medusa else None,
            tree=tree,
            device=device,
            dtype=dtype,
            max_seq_len=max_seq_len,
            torch_threads=torch_threads,
            compile=compile_,
            request_timeout_s=request_timeout,
            tokenizer_dir=Path(tokenizer_dir) if tokenizer_dir else None,
            tensorrtllm_backend=Path(tensorrtllm_backend) if tensorrtllm_backend else None,
            trtllm=trtllm,
        )
    )
    click.echo(
        f"{'added' if add else 'wrote'} {served.kind} model '{served.name}' "
        f"({'Medusa' if served.use_medusa else 'plain decoding'}, max_batch_size {served.max_batch_size}, "
        f"{'decoupled' if served.decoupled else 'not decoupled'}"
        f"{f', world size {served.world_size}' if served.world_size > 1 else ''}) in {Path(out).absolute()}"
    )


@click.command()
@click.option("--repo", "--model_repo", "repo", required=True, type=click.Path(), help="Model repository.")
@click.option("--grpc-port", "--grpc_port", "grpc_port", default=8001, show_default=True, help="0: a free port.")
@click.option("--http-port", "--http_port", "http_port", default=8000, show_default=True, help="0: a free port.")
@click.option(
    "--metrics-port", "--metrics_port", "metrics_port", default=8002, show_default=True, help="0: a free port."
)
@click.option("--host", default="0.0.0.0", show_default=True, help="Address the three endpoints bind to.")
@click.option(
    "--world-size",
    "--world_size",
    "world_size",
    type=int,
    default=None,
    help="Ranks (one tritonserver each, under mpirun); default: from the repository.",
)
@click.option("--ready-timeout", default=600.0, show_default=True, help="Seconds to wait for every model to load.")
@click.option("--log-verbose", default=0, show_default=True)
def serve(repo, grpc_port, http_port, metrics_port, host, world_size, ready_timeout, log_verbose):
    """Start tritonserver on a repository (PATH's, else the nvidia-pytriton wheel's), wait until ready,
    forward SIGINT/SIGTERM/SIGHUP, and exit with its status (128+N when killed by signal N)."""
    from medusa_forge.serve.tritonserver import TritonServer, serve_foreground

    server = TritonServer(
        repo,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        host=host,
        world_size=world_size,
        console=True,
        log_verbose=log_verbose,
        ready_timeout=ready_timeout,
    )
    models = (
        ", ".join(f"{m.name} ({m.kind}{', Medusa' if m.use_medusa else ''})" for m in server.info.models)
        if server.info
        else "not written by triton-repo"
    )
    click.echo(
        f"tritonserver: {server.install.binary} ({server.install.source}); repository {server.cfg.repo}: {models}",
        err=True,
    )
    status = serve_foreground(server, echo=lambda m: click.echo(m, err=True))
    sys.exit(128 - status if status < 0 else status)


@click.command()
@click.option("--url", default="localhost:8001", show_default=True, help="Triton gRPC endpoint.")
@click.option("--model", default="ensemble", show_default=True)
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--max-tokens", "--max_tokens", "max_tokens", default=128, show_default=True)
@click.option("--stream", is_flag=True, help="Stream tokens as they are generated (decoupled models).")
@click.option(
    "--timeout",
    default=120.0,
    show_default=True,
    help="Seconds to wait for the whole answer; past it the request is cancelled.",
)
@click.option("--temperature", type=float, default=None)
@click.option("--top-k", type=int, default=None)
@click.option("--top-p", type=float, default=None)
@click.option("--stop", "stop", multiple=True, help="Stop string (repeatable); sent as stop_words.")
@json_option("Print one JSON object with text, timings and statistics.")
def query(url, model, prompt, max_tokens, stream, timeout, temperature, top_k, top_p, stop, as_json):
    """Send one prompt over gRPC and print the completion (as it streams with --stream)."""
    from dataclasses import asdict

    from medusa_forge.serve.client import TritonLLMClient

    if not prompt:
        raise ForgeError("empty prompt: give at least one token of input")
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    with TritonLLMClient(url, model, timeout) as client:
        echo = None if as_json else (lambda text: (click.echo(text, nl=False), sys.stdout.flush()))
        reply = client.generate(
            prompt,
            max_tokens,
            stream=stream,
            on_text=echo,
            stop_words=tuple(stop),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
        )
    if as_json:
        click.echo(json.dumps(asdict(reply)))
    else:
        click.echo()
