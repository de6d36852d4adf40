"""Faults around a real tritonserver: a server killed mid-stream, a hung server, no server, bad requests.

Every server here is dedicated (never the session's ``native_triton``, which other tests share): it
serves pycoder-26m's plain decoding straight from the HF model directory (no build), as ``base``
(decoupled, streams) and ``unary`` (not decoupled). What must hold is what the README promises: a
dead or hung server becomes one clear error naming it within a bounded time, on the Python client
(:class:`TritonLLMClient`) and on ``medusa-forge query`` (one line ``error: ...``, exit status 2).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import triton_inputs as _inputs

from medusa_forge.errors import ForgeError
from medusa_forge.serve.client import TritonLLMClient
from medusa_forge.serve.triton_repo import RepoRequest, write_triton_repo
from medusa_forge.serve.tritonserver import TritonServer, free_port

LONG = 1500  # tokens: minutes of decoding on this CPU, so the request is surely still running when we strike
BOUND_S = 15.0  # a failure must surface this soon (the clients' timeouts are set below it or near it)


@pytest.fixture(scope="module")
def repo(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    out = root / "repo"
    write_triton_repo(
        RepoRequest(engine=model_dir, out=out, name="base", decoupled=True, use_medusa=False, torch_threads=1)
    )
    return out


@pytest.fixture(scope="module")
def two_model_repo(model_dir, repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults2") / "repo"
    write_triton_repo(
        RepoRequest(engine=model_dir, out=out, name="base", decoupled=True, use_medusa=False, torch_threads=1)
    )
    write_triton_repo(
        RepoRequest(
            engine=model_dir, out=out, name="unary", decoupled=False, use_medusa=False, torch_threads=1, add=True
        )
    )
    return out


@pytest.fixture(scope="module")
def shared_server(two_model_repo):
    """One dedicated server for the tests that leave it alive (bad requests, a paused server)."""
    with TritonServer(two_model_repo, exit_timeout_s=2, log_path=two_model_repo.parent / "tritonserver.log") as s:
        yield s


@pytest.fixture()
def doomed_server(repo, tmp_path):
    """A fresh server that the test kills with SIGKILL."""
    with TritonServer(repo, exit_timeout_s=2, log_path=tmp_path / "tritonserver.log") as s:
        yield s


def _streaming_until_killed(server: TritonServer, client: TritonLLMClient, chunks_before_kill: int = 3):
    """Stream LONG tokens; SIGKILL the server once ``chunks_before_kill`` chunks arrived. Returns
    (the exception raised, seconds from the kill to the exception, chunks received)."""
    chunks: list[str] = []
    killed_at: list[float] = []

    def on_text(text: str) -> None:
        chunks.append(text)
        if len(chunks) == chunks_before_kill:
            killed_at.append(time.perf_counter())
            os.kill(server.proc.pid, signal.SIGKILL)

    with pytest.raises(ForgeError) as err:
        client.generate("def main():", LONG, stream=True, end_id=-1, on_text=on_text)
    return err.value, time.perf_counter() - killed_at[0], len(chunks)


def test_client_gets_one_clear_error_when_the_server_is_killed_mid_stream(doomed_server):
    url = doomed_server.grpc_url
    with TritonLLMClient(url, "base", timeout_s=BOUND_S) as client:
        error, after_kill_s, chunks = _streaming_until_killed(doomed_server, client)
        assert after_kill_s < BOUND_S  # no hang: the broken stream is noticed, not waited out
        message = str(error)
        assert "\n" not in message
        assert message.startswith(
            f"lost the connection to the Triton server at {url} during a request to model "
            f"'base' after {chunks} response(s)"
        )
        assert "did the server die?" in message
        doomed_server.proc.wait(timeout=10)
        assert doomed_server.proc.returncode == -signal.SIGKILL
        # The same client, asked again, says the server is gone (not a tritonclient stream-state message):
        # unreachable, or, when gRPC writes on the dead channel before it notices, a lost connection.
        t0 = time.perf_counter()
        gone = (
            rf"^(Triton server at {url} is unreachable \(.*\); is it running\?"
            rf"|lost the connection to the Triton server at {url} during a request .*did the server die\?)"
        )
        with pytest.raises(ForgeError, match=gone):
            client.generate("def main():", 3)
        assert time.perf_counter() - t0 < BOUND_S


def test_a_kept_stream_carries_request_after_request_and_then_reports_the_killed_server(doomed_server):
    url = doomed_server.grpc_url
    with TritonLLMClient(url, "base", timeout_s=BOUND_S, keep_stream=True) as client:
        first = client.generate("def add(a, b):", 3, end_id=-1)
        stream = client._client._stream
        assert stream is not None  # still open after the final response
        again = client.generate("def add(a, b):", 3, stream=True, end_id=-1)
        assert client._client._stream is stream and again.output_tokens == first.output_tokens
        doomed_server.kill()
        t0 = time.perf_counter()
        with pytest.raises(
            ForgeError,
            match=rf"^(Triton server at {url} is unreachable|lost the connection to the "
            rf"Triton server at {url} during a request)",
        ):
            client.generate("def add(a, b):", 3, end_id=-1)
        assert time.perf_counter() - t0 < BOUND_S
        assert client._client._stream is None  # a broken stream is not kept


def _query(url: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medusa_forge.cli",
            "query",
            "--url",
            url,
            "--model",
            "base",
            "--prompt",
            "def main():",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_query_exits_2_with_one_line_when_the_server_is_killed_mid_stream(doomed_server):
    url = doomed_server.grpc_url
    proc = _query(url, "--max-tokens", str(LONG), "--stream", "--timeout", str(BOUND_S))
    first = proc.stdout.read(1)  # query flushes every streamed chunk: the request is now decoding
    assert first, proc.stderr.read().decode()
    reader = threading.Thread(target=proc.stdout.read)  # drain the rest, so the child never blocks on a pipe
    reader.start()
    t_kill = time.perf_counter()
    doomed_server.kill()
    try:
        code = proc.wait(timeout=BOUND_S + 10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.perf_counter() - t_kill < BOUND_S + 10
    reader.join(timeout=5)
    err = proc.stderr.read().decode()
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"error: lost the connection to the Triton server at {url}"), err
    assert "Traceback" not in err


def _group_members(pgid: int) -> list[int]:
    """Live processes of a process group (zombies excluded), from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[2]) == pgid and stat[0] != "Z":
                members.append(int(entry))
    return members


def test_a_server_killed_mid_stream_leaves_no_orphaned_stub_once_stopped(doomed_server):
    pgid = doomed_server.proc.pid
    assert [p for p in _group_members(pgid) if p != pgid], "the stub runs in the server's process group"
    with TritonLLMClient(doomed_server.grpc_url, "base", timeout_s=BOUND_S) as client:
        _streaming_until_killed(doomed_server, client)
    doomed_server.proc.wait(timeout=10)
    time.sleep(1.0)
    assert _group_members(pgid)  # a stub killed mid-stream outlives its server...
    doomed_server.stop()
    deadline = time.monotonic() + 5
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _group_members(pgid) == []  # ...until stop() ends them


def test_query_where_nothing_listens_is_one_line_and_exit_2():
    url = f"127.0.0.1:{free_port()}"  # free a moment ago: nothing listens there
    t0 = time.perf_counter()
    proc = _query(url, "--max-tokens", "3", "--timeout", "10")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    err = err.decode()
    assert err.count("\n") == 1 and err.startswith(f"error: Triton server at {url} is unreachable ("), err
    assert "is it running? (check --url)" in err and out == b""
    assert time.perf_counter() - t0 < 60


def test_a_hung_server_is_a_timeout_not_a_hang_and_serves_again_once_resumed(shared_server):
    """SIGSTOP the server mid-stream: the client's timeout ends the wait with an error naming the
    server; after SIGCONT the abandoned request was cancelled and the model answers again."""
    url = shared_server.grpc_url
    timeout_s = 3.0
    chunks: list[str] = []

    def on_text(text: str) -> None:
        chunks.append(text)
        if len(chunks) == 2:
            shared_server.signal(signal.SIGSTOP)

    try:
        with TritonLLMClient(url, "base", timeout_s=timeout_s) as client:
            t0 = time.perf_counter()
            with pytest.raises(ForgeError) as err:
                client.generate("def main():", LONG, stream=True, end_id=-1, on_text=on_text)
            waited = time.perf_counter() - t0
    finally:
        shared_server.signal(signal.SIGCONT)
    assert str(err.value) == (
        f"no response from {url} (model 'base') within {timeout_s:g} s; is the server alive? (--timeout to wait longer)"
    )
    assert timeout_s <= waited < timeout_s + 5.0
    t1 = time.perf_counter()
    with TritonLLMClient(url, "base", timeout_s=60) as client:
        assert len(client.generate("def main():", 3, end_id=-1).output_tokens) == 3
    assert time.perf_counter() - t1 < 30.0  # the 1500-token request did not keep the instance busy


PROMPT = np.array([[b"def add(a, b):"]], dtype=np.object_)
FOUR = np.array([[4]], dtype=np.int32)
# Beyond tests/test_serve_native.py's BAD_REQUESTS (missing text_input / max_tokens, negative
# max_tokens, FP32 max_tokens, empty prompt, bad sampling values, bad_words, KV cache overflow):
MORE_BAD_REQUESTS = [
    (
        "unknown model",
        "nope",
        dict(text_input=PROMPT, max_tokens=FOUR),
        "Request for unknown model: 'nope' is not found",
    ),
    (
        "text_input as INT32",
        "base",
        dict(text_input=np.array([[7]], dtype=np.int32), max_tokens=FOUR),
        "inference input 'text_input' data-type is 'INT32', but model 'base' expects 'BYTES'",
    ),
    (
        "unknown input",
        "base",
        dict(text_input=PROMPT, max_tokens=FOUR, prompt=PROMPT),
        "unexpected inference input 'prompt' for model 'base'",
    ),
    (
        "batch above max_batch_size",
        "base",
        dict(
            text_input=np.array([[b"a = 1"], [b"b = 2"]], dtype=np.object_),
            max_tokens=np.array([[4], [4]], dtype=np.int32),
        ),
        "inference request batch-size must be <= 1 for 'base'",
    ),
    (
        "stream on a model that is not decoupled",
        "unary",
        dict(text_input=PROMPT, max_tokens=FOUR, stream=np.array([[True]])),
        "stream=true needs a decoupled model",
    ),
]


@pytest.mark.parametrize(
    "model,inputs,message", [c[1:] for c in MORE_BAD_REQUESTS], ids=[c[0] for c in MORE_BAD_REQUESTS]
)
def test_more_bad_requests_get_an_error_naming_the_problem(shared_server, model, inputs, message):
    with TritonLLMClient(shared_server.grpc_url, model, timeout_s=30) as c:
        with pytest.raises(ForgeError) as err:
            c.send(_inputs(**inputs))
    assert str(err.value).startswith(f"model '{model}' on {shared_server.grpc_url}: ")
    assert message in str(err.value)
    shared_server.check_alive("after a bad request")


def test_the_models_transaction_policy_is_read_from_the_server(shared_server):
    """What `eval speed` uses to decide whether to stream."""
    with (
        TritonLLMClient(shared_server.grpc_url, "base") as base,
        TritonLLMClient(shared_server.grpc_url, "unary") as unary,
    ):
        assert base.decoupled is True and unary.decoupled is False
        assert unary.generate("def add(a, b):", 3, end_id=-1).responses == 1
