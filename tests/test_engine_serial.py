"""SerialScheduler: the one-at-a-time loop behind tickets, on pycoder-26m (CPU, plain decoding)."""

from __future__ import annotations

import threading
import time

import pytest

from medusa_forge.engine.generation import GenerationConfig
from medusa_forge.engine.serial import SerialScheduler
from medusa_forge.engine.tickets import QueueFull, RequestCancelled, RequestTimedOut
from medusa_forge.errors import ForgeError

PROMPTS = ["def add(a, b):", "class Stack:\n    def push(self, item):", "import os\n\ndef walk(root):"]


def greedy(n: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, use_medusa=False, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(model_dir, one_thread):
    from medusa_forge.engine.load import load_engine

    return load_engine(model_dir)


@pytest.fixture
def scheduler(engine):
    s = SerialScheduler(engine)
    yield s
    s.close()


def ids(engine, prompt: str) -> list[int]:
    return engine.tokenizer.encode(prompt)


def test_tickets_submitted_together_get_the_engines_own_answers_in_order(engine, scheduler):
    expected = [engine.generate(p, greedy(5)).tokens for p in PROMPTS]
    streamed: list[list[int]] = [[] for _ in PROMPTS]
    tickets = [scheduler.submit(ids(engine, p), greedy(5), on_tokens=streamed[i].extend) for i, p in enumerate(PROMPTS)]
    results = [t.result(timeout=60) for t in tickets]
    assert [r.tokens for r in results] == expected == streamed
    assert tickets[0].done() and all(r.finish_reason == "length" for r in results)


def test_a_cancelled_request_frees_the_engine_within_a_step_and_the_next_one_runs(engine, scheduler):
    steps = threading.Event()
    long = scheduler.submit(ids(engine, PROMPTS[0]), greedy(1500), on_tokens=lambda new: steps.set())
    after = scheduler.submit(ids(engine, PROMPTS[1]), greedy(4))
    assert steps.wait(30)
    long.cancel()
    with pytest.raises(RequestCancelled):
        long.result(timeout=5)
    assert after.result(timeout=30).tokens == engine.generate(PROMPTS[1], greedy(4)).tokens


def test_a_request_cancelled_while_it_waited_never_starts(engine, scheduler):
    started = threading.Event()
    first = scheduler.submit(ids(engine, PROMPTS[0]), greedy(40))
    waiting = scheduler.submit(ids(engine, PROMPTS[1]), greedy(4), on_tokens=lambda new: started.set())
    waiting.cancel()
    assert len(first.result(timeout=60).tokens) == 40
    with pytest.raises(RequestCancelled):
        waiting.result(timeout=5)
    assert not started.is_set()


def test_a_request_past_its_timeout_fails_naming_it_and_the_loop_goes_on(engine, scheduler):
    slow = scheduler.submit(ids(engine, PROMPTS[0]), greedy(1500), timeout_s=0.3)
    t0 = time.perf_counter()
    with pytest.raises(RequestTimedOut, match=r"timeout of 0.3 s after \d+ tokens"):
        slow.result(timeout=30)
    assert time.perf_counter() - t0 < 10
    assert len(scheduler.submit(ids(engine, PROMPTS[1]), greedy(3)).result(timeout=30).tokens) == 3


def test_a_full_queue_refuses_a_request_naming_the_bound(engine):
    scheduler = SerialScheduler(engine, max_queue=2)
    running = threading.Event()
    first = scheduler.submit(ids(engine, PROMPTS[0]), greedy(1500), on_tokens=lambda new: running.set())
    assert running.wait(30)
    queued = [scheduler.submit(ids(engine, p), greedy(2)) for p in PROMPTS[1:]]
    with pytest.raises(QueueFull, match=r"request queue is full \(2 waiting for a slot of 1\); retry later"):
        scheduler.submit(ids(engine, PROMPTS[0]), greedy(2))
    first.cancel()
    assert [len(t.result(timeout=30).tokens) for t in queued] == [2, 2]
    scheduler.close()


def test_a_bad_request_is_refused_at_submit(engine, scheduler):
    with pytest.raises(ForgeError, match="exceeds the KV cache"):
        scheduler.submit(ids(engine, PROMPTS[0]), greedy(100_000))


def test_describe_names_the_serial_policy_and_the_queue_bound(engine):
    scheduler = SerialScheduler(engine, max_queue=3)
    try:
        assert scheduler.describe() == {"max_batch_size": 1, "max_queue": 3, "speculation": "serial"}
    finally:
        scheduler.close()


def test_close_fails_the_running_and_the_queued_tickets(engine):
    scheduler = SerialScheduler(engine)
    running = threading.Event()
    first = scheduler.submit(ids(engine, PROMPTS[0]), greedy(1500), on_tokens=lambda new: running.set())
    second = scheduler.submit(ids(engine, PROMPTS[1]), greedy(4))
    assert running.wait(30)
    scheduler.close()
    for ticket in (first, second):
        with pytest.raises(RequestCancelled):
            ticket.result(timeout=5)
    with pytest.raises(ForgeError, match="closed"):
        scheduler.submit(ids(engine, PROMPTS[1]), greedy(4))
