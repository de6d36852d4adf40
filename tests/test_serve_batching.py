"""Many clients at once on the native model behind a real tritonserver (CPU), queried over gRPC.

One server for the module: pycoder-26m with random heads (tree `small`), served as
  serial          max_batch_size 1, Medusa, not decoupled: the reference answers (one at a time)
  batched         max_batch_size 4, Medusa, decoupled: in-flight batching, streaming
  batched_unary   max_batch_size 4, plain decoding, not decoupled, 2 instances (a scheduler each)
  tiny_queue      max_batch_size 2, plain decoding, decoupled, max_queue 1
Greedy answers must not depend on what else shares the batch, so every answer a batched model
gives under load must equal the serial model's answer to the same request made alone.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import threading
import time

import numpy as np
import pytest
from conftest import triton_inputs as _inputs

from medusa_forge.errors import ForgeError
from medusa_forge.serve.client import TritonLLMClient

# Without the in-flight batcher (medusa_forge/engine/batcher.py) the "batched" models run the serial
# scheduler: the same answers, the same queue bound, one request decoding at a time.
BATCH = 4 if importlib.util.find_spec("medusa_forge.engine.batcher") is not None else 1
MODELS = {  # name -> (max_batch_size, use_medusa, decoupled, max_queue, instances)
    "serial": (1, True, False, 0, 1),
    "batched": (BATCH, True, True, 0, 1),
    "batched_unary": (BATCH, False, False, 0, 2),
    "tiny_queue": (min(BATCH, 2), False, True, 1, 1),
}


class Gone(Exception):
    """Raised in a streaming callback: the client walks away (its stream closes, cancelling the request)."""


@pytest.fixture(scope="module")
def server(model_dir, heads_dir, tmp_path_factory):
    from medusa_forge.serve.triton_repo import RepoRequest, write_triton_repo
    from medusa_forge.serve.tritonserver import TritonServer

    root = tmp_path_factory.mktemp("batching")
    repo = root / "repo"
    for i, (name, (batch, medusa, decoupled, queue, instances)) in enumerate(MODELS.items()):
        write_triton_repo(
            RepoRequest(
                engine=model_dir,
                out=repo,
                name=name,
                add=i > 0,
                max_batch_size=batch,
                max_queue=queue,
                decoupled=decoupled,
                use_medusa=medusa,
                instances=instances,
                medusa=heads_dir if medusa else None,
                tree="small" if medusa else None,
                torch_threads=1,
                dtype="float32",
            )
        )
    with TritonServer(repo, exit_timeout_s=5, log_path=root / "tritonserver.log") as s:
        yield s


@pytest.fixture(scope="module")
def prompts(held_out_prompts) -> list[str]:
    """Six held-out prompts of different lengths (30 to 180 characters)."""
    return [p["prompt"][: 30 + 30 * i] for i, p in enumerate(held_out_prompts[:6])]


def client(server, model: str) -> TritonLLMClient:
    return TritonLLMClient(server.grpc_url, model, 120.0)


def serial_answers(server, work: list[tuple[str, int]]) -> dict[tuple[str, int], list[int]]:
    with client(server, "serial") as c:
        return {(p, n): c.generate(p, n, end_id=-1).output_tokens for p, n in set(work)}


def run_clients(server, work_by_client: list[list[tuple[str, str, int, bool]]], delays: list[float]):
    """One thread per client, each sending its (model, prompt, max_tokens, stream) requests in turn after
    its delay; returns [(request, tokens)] and the errors."""
    results, errors = [], []

    def worker(i: int) -> None:
        time.sleep(delays[i])
        try:
            with client(server, work_by_client[i][0][0]) as c:
                for model, prompt, n, stream in work_by_client[i]:
                    c.model = model
                    results.append(
                        ((model, prompt, n, stream), c.generate(prompt, n, stream=stream, end_id=-1).output_tokens)
                    )
        except Exception as e:  # noqa: BLE001 - collected and asserted by the caller
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(work_by_client))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results, errors


def test_every_model_of_the_repository_is_ready(server):
    import tritonclient.grpc as grpcclient

    index = grpcclient.InferenceServerClient(server.grpc_url).get_model_repository_index(as_json=True)
    assert {m["name"]: m["state"] for m in index["models"]} == {name: "READY" for name in MODELS}


@pytest.mark.parametrize("model", ["batched", "batched_unary"])
def test_concurrent_clients_get_exactly_the_serial_models_answers(server, prompts, model):
    """8 clients, arriving at random times, 2 requests each of 6 to 24 tokens (streamed and not when the
    model streams): every answer equals the one the serial model gives to that request alone."""
    rng = random.Random(20)
    streams = model == "batched"
    work = [
        [
            (model, prompts[rng.randrange(len(prompts))], rng.choice([6, 12, 24]), streams and k == i % 2)
            for k in range(2)
        ]
        for i in range(8)
    ]
    expected = serial_answers(server, [(p, n) for w in work for _, p, n, _ in w])
    results, errors = run_clients(server, work, delays=[rng.uniform(0, 0.5) for _ in work])
    assert not errors and len(results) == 16
    assert all(tokens == expected[req[1], req[2]] for req, tokens in results)


def test_a_request_of_two_rows_gets_both_serial_answers(server, prompts):
    """One request carrying two prompts (batch dimension 2) on the model that does not stream: both rows
    join the batch and come back stacked, each the serial model's answer."""
    import tritonclient.grpc as grpcclient

    if BATCH == 1:
        pytest.skip("needs medusa_forge.engine.batcher (max_batch_size 1 takes one row per request)")
    expected = serial_answers(server, [(p, 8) for p in prompts[:2]])
    inputs = _inputs(
        text_input=np.array([[p.encode()] for p in prompts[:2]], dtype=np.object_),
        max_tokens=np.array([[8], [8]], dtype=np.int32),
        end_id=np.array([[-1], [-1]], dtype=np.int32),
    )
    result = grpcclient.InferenceServerClient(server.grpc_url).infer("batched_unary", inputs, client_timeout=120)
    rows = result.as_numpy("output_tokens")
    assert [list(rows[i][rows[i] >= 0]) for i in range(2)] == [expected[p, 8] for p in prompts[:2]]


def test_cancelling_one_stream_mid_generation_changes_no_other_answer(server, prompts):
    """A client walks away from a 1500-token stream after a few chunks while 3 others stream beside it:
    they get the serial answers, and the model serves the next request at once."""
    expected = serial_answers(server, [(p, 24) for p in prompts[:3]])
    chunks = []

    def walk_away(text: str) -> None:
        chunks.append(text)
        if len(chunks) == 3:
            raise Gone()

    def leaver() -> None:
        with client(server, "batched") as c, pytest.raises(Gone):
            c.generate(prompts[3], 1500, stream=True, end_id=-1, on_text=walk_away)

    leaving = threading.Thread(target=leaver)
    leaving.start()
    results, errors = run_clients(server, [[("batched", p, 24, True)] for p in prompts[:3]], delays=[0.1, 0.2, 0.3])
    leaving.join(timeout=120)
    assert not errors and len(chunks) == 3
    assert {req[1]: tokens for req, tokens in results} == {p: expected[p, 24] for p in prompts[:3]}
    t0 = time.perf_counter()
    with client(server, "batched") as c:
        assert (
            c.generate(prompts[4], 6, end_id=-1).output_tokens
            == serial_answers(server, [(prompts[4], 6)])[prompts[4], 6]
        )
    assert time.perf_counter() - t0 < 30


def test_a_request_abandoned_on_a_model_that_does_not_stream_frees_it(server, prompts):
    """Not decoupled either: the client gives up on 1500 tokens after 1 s (its stream closes with
    cancel_requests) and the serial model answers the next request within seconds, not minutes."""
    with TritonLLMClient(server.grpc_url, "serial", 1.0) as c, pytest.raises(ForgeError, match="within 1 s"):
        c.generate(prompts[0], 1500, end_id=-1)
    t0 = time.perf_counter()
    with client(server, "serial") as c:
        assert len(c.generate(prompts[1], 4, end_id=-1).output_tokens) == 4
    assert time.perf_counter() - t0 < 10


class Holder:
    """A streaming request kept running until released (then its client walks away)."""

    def __init__(self, server, prompt: str, model: str = "tiny_queue"):
        self.started, self.release = threading.Event(), threading.Event()
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, args=(server, prompt, model))
        self.thread.start()

    def _on_text(self, _text: str) -> None:
        self.started.set()
        if self.release.is_set():
            raise Gone()

    def _run(self, server, prompt: str, model: str) -> None:
        try:
            with client(server, model) as c:
                c.generate(prompt, 1500, stream=True, end_id=-1, on_text=self._on_text)
        except Gone:
            pass
        except Exception as e:  # noqa: BLE001 - asserted by the test
            self.error = e


def test_a_full_queue_answers_at_once_with_an_error_naming_the_bound(server, prompts):
    """`tiny_queue` decodes 2 requests and lets 1 wait (--max-queue 1): a fourth request is refused at once,
    and once the others leave the model serves again."""
    slots = MODELS["tiny_queue"][0]
    holders = running = [Holder(server, p) for p in prompts[:slots]]
    try:
        assert all(h.started.wait(60) for h in running)
        waiting = Holder(server, prompts[slots])
        holders = running + [waiting]
        time.sleep(0.5)
        assert not waiting.started.is_set()
        t0 = time.perf_counter()
        with (
            client(server, "tiny_queue") as c,
            pytest.raises(ForgeError, match=rf"request queue is full \(1 waiting for a slot of {slots}\); retry later"),
        ):
            c.generate(prompts[0], 4, end_id=-1)
        assert time.perf_counter() - t0 < 5, "refused at once, not after a wait"
    finally:
        for h in holders:
            h.release.set()
        for h in holders:
            h.thread.join(timeout=120)
    assert all(h.error is None for h in holders)
    with client(server, "tiny_queue") as c:
        assert len(c.generate(prompts[0], 4, end_id=-1).output_tokens) == 4


@pytest.mark.parametrize("model", ["batched", "batched_unary"])
def test_a_bad_request_gets_an_error_naming_it_and_the_model_keeps_serving(server, model):
    prompt = np.array([[b"def add(a, b):"]], dtype=np.object_)
    with client(server, model) as c:
        with pytest.raises(ForgeError, match=r"input 'beam_width' must be 1 \(the native engine decodes a single"):
            c.send(
                _inputs(
                    text_input=prompt,
                    max_tokens=np.array([[4]], dtype=np.int32),
                    beam_width=np.array([[4]], dtype=np.int32),
                )
            )
        assert len(c.generate("def add(a, b):", 3, end_id=-1).output_tokens) == 3


def test_each_model_logs_its_scheduler_the_speculation_policy_and_its_cost_model_at_load(server):
    lines = {
        name: next((ln for ln in server.log_text().splitlines() if f"medusa-forge scheduler of {name}:" in ln), "")
        for name in MODELS
    }
    # Triton may quote a backend's log message (escaping its quotes): read the JSON object inside.
    info = {
        name: json.loads(line[line.index("{") : line.rindex("}") + 1].replace('\\"', '"'))
        for name, line in lines.items()
    }
    assert info["serial"] == {"max_batch_size": 1, "max_queue": 0, "speculation": "serial"}
    if BATCH > 1:
        batched = info["batched"]
        assert batched["speculation"] == "auto" and batched["max_batch_size"] == BATCH
        assert batched["cost_model"]["rows"][0] == 1 and len(batched["cost_model"]["seconds"]) == len(
            batched["cost_model"]["rows"]
        )
        assert info["tiny_queue"]["max_queue"] == 1


def test_triton_repo_records_the_batch_and_queue_bounds_in_the_models_parameters(model_dir, tmp_path):
    from medusa_forge.serve.triton_repo import RepoRequest, write_triton_repo

    served = write_triton_repo(
        RepoRequest(
            engine=model_dir,
            out=tmp_path / "repo",
            name="m",
            use_medusa=False,
            max_batch_size=BATCH,
            max_queue=3,
            instances=2,
        )
    )
    config = (tmp_path / "repo" / "m" / "config.pbtxt").read_text()
    assert f"max_batch_size: {BATCH}\n" in config and "count: 2" in config
    for key, value in (("max_batch_size", str(BATCH)), ("max_queue", "3")):
        assert f'key: "{key}"\n  value: {{\n    string_value: "{value}"' in config
    assert served.details["parameters"]["max_queue"] == "3" and served.max_batch_size == BATCH


def test_a_negative_max_queue_is_refused_before_anything_is_written(model_dir, tmp_path):
    from medusa_forge.serve.triton_repo import RepoRequest, write_triton_repo

    with pytest.raises(ForgeError, match=r"--max-queue must be >= 0 \(0 = unbounded\), got -1"):
        write_triton_repo(RepoRequest(engine=model_dir, out=tmp_path / "repo", use_medusa=False, max_queue=-1))
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            dict(max_batch_size=1, speculation="fixed"),
            "--speculation fixed steers the in-flight batcher; it needs --max-batch-size > 1",
        ),
        (
            dict(max_batch_size=2, speculation="sometimes"),
            "speculation 'sometimes': expected auto, fixed or off-above:N",
        ),
    ],
    ids=["speculation without batching", "unknown speculation policy"],
)
def test_a_speculation_policy_the_batcher_cannot_run_is_refused(model_dir, heads_dir, tmp_path, flags, message):
    from medusa_forge.serve.triton_repo import RepoRequest, write_triton_repo

    if flags["max_batch_size"] > 1 and BATCH == 1:
        pytest.skip("needs medusa_forge.engine.batcher")
    with pytest.raises(ForgeError, match=re.escape(message)):
        write_triton_repo(RepoRequest(engine=model_dir, out=tmp_path / "repo", medusa=heads_dir, **flags))
    assert not (tmp_path / "repo").exists()
