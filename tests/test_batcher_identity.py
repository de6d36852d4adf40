"""In-flight batching keeps every greedy (and seeded plain sampled) request's output identical to its
batch-1 output (issue 20).

64 requests arrive at random times with mixed prompt and output lengths, greedy and sampled, Medusa
and plain, and share the batch's steps; each step's tree is drawn at random from the policy's
ladder (full tree to plain decoding), so every request meets many trees and neighbours.
"""

from __future__ import annotations

import os
import random
import threading
import time

import numpy as np
import pytest

from medusa_forge.engine.batch_step import CPU_GEMM_ROWS
from medusa_forge.engine.batcher import InflightBatcher
from medusa_forge.engine.generation import GenerationConfig
from medusa_forge.engine.load import load_engine
from medusa_forge.engine.logits_processing import LogitsSettings
from medusa_forge.engine.tickets import QueueFull, RequestCancelled, RequestTimedOut
from medusa_forge.errors import ForgeError
from medusa_forge.model.packed_gemm import packed_rows
from medusa_forge.serve.native_service import scheduler_warnings
from medusa_forge.serve.replies import Reply

# bench/device_run.sh's serve phase runs the identity tests with 256 requests on the GPU.
REQUESTS = int(os.environ.get("MEDUSA_FORGE_IDENTITY_REQUESTS", "64"))
DEVICE = os.environ.get("MEDUSA_FORGE_IDENTITY_DEVICE", "cpu")


@pytest.fixture(scope="module")
def engine(model_dir, heads_dir, one_thread):
    return load_engine(model_dir, heads_dir, tree="small", device=DEVICE, max_seq_len=160)


@pytest.fixture(scope="module")
def requests(engine, held_out_prompts):
    """(prompt ids, config) pairs: prompts of 3..72 tokens (up to 3 prefill chunks), 1..14 new tokens."""
    rng = random.Random(20)
    out = []
    for i in range(REQUESTS):
        ids = engine.tokenizer.encode(held_out_prompts[i % len(held_out_prompts)]["prompt"])
        ids = ids[-rng.randint(3, 72) :]
        sampled = i % 3 == 2
        cfg = GenerationConfig(
            max_new_tokens=rng.randint(1, 14),
            use_medusa=rng.random() < 0.6,
            ignore_eos=i % 4 != 0,
            temperature=0.8 if sampled else 0.0,
            top_k=20 if sampled else 0,
            seed=i,
        )
        out.append((ids, cfg))
    return out


@pytest.fixture(scope="module")
def batch_one(engine, requests):
    """Each greedy (and seeded plain sampled) request's output from the serial engine, alone."""
    return {
        i: engine.generate_ids(ids, cfg).tokens
        for i, (ids, cfg) in enumerate(requests)
        if cfg.temperature == 0 or not cfg.use_medusa
    }


def random_trees(batcher: InflightBatcher, seed: int) -> None:
    """Each step verifies a tree drawn from the ladder, whatever the load."""
    rng = random.Random(seed)
    sizes = batcher.policy.ladder.sizes
    batcher.policy.choose = lambda *a: rng.choice(sizes)


def submit_at_random_times(batcher, requests, seed: int, **kw) -> list:
    rng = random.Random(seed)
    tickets = []
    for ids, cfg in requests:
        tickets.append(batcher.submit(ids, cfg, **kw))
        time.sleep(rng.random() * 0.01)
    return tickets


def test_every_greedy_request_equals_its_batch_one_output_whatever_shares_its_steps(engine, requests, batch_one):
    batcher = InflightBatcher(engine, max_batch_size=6, speculation="fixed", prefill_chunk=24)
    random_trees(batcher, seed=1)
    try:
        tickets = submit_at_random_times(batcher, requests, seed=2)
        results = [t.result(timeout=120) for t in tickets]
    finally:
        batcher.close()
    for i, (r, (ids, cfg)) in enumerate(zip(results, requests)):
        assert len(r.tokens) <= cfg.max_new_tokens and r.prompt_tokens == len(ids)
        if i in batch_one:
            assert r.tokens == batch_one[i], f"request {i} ({'medusa' if cfg.use_medusa else 'plain'})"
    assert sum(max(r.accepted_per_step, default=1) > 1 for r in results) > 0  # trees really verified drafts


def test_cancelling_or_timing_out_a_request_mid_batch_changes_no_other_output(engine, requests, batch_one):
    greedy = [i for i in batch_one if requests[i][1].max_new_tokens >= 6][:8]
    batcher = InflightBatcher(engine, max_batch_size=4, speculation="fixed")
    random_trees(batcher, seed=3)
    try:
        tickets = [batcher.submit(*requests[i]) for i in greedy]
        holder: list = []
        victim = batcher.submit(
            requests[greedy[0]][0],
            GenerationConfig(max_new_tokens=40, ignore_eos=True),
            on_tokens=lambda new: holder[0].cancel(),
        )
        holder.append(victim)
        slow = batcher.submit(
            requests[greedy[1]][0], GenerationConfig(max_new_tokens=40, ignore_eos=True), timeout_s=0.05
        )
        with pytest.raises(RequestCancelled):
            victim.result(timeout=60)
        with pytest.raises(RequestTimedOut, match="timeout"):
            slow.result(timeout=60)
        assert [t.result(timeout=60).tokens for t in tickets] == [batch_one[i] for i in greedy]
    finally:
        batcher.close()


def test_a_failing_stream_callback_fails_only_its_own_request(engine, requests, batch_one):
    i, j = list(batch_one)[:2]
    batcher = InflightBatcher(engine, max_batch_size=2, speculation="fixed")
    try:

        def boom(new):
            raise ValueError("client went away")

        bad = batcher.submit(*requests[i], on_tokens=boom)
        good = batcher.submit(*requests[j])
        with pytest.raises(ValueError, match="client went away"):
            bad.result(timeout=60)
        assert good.result(timeout=60).tokens == batch_one[j]
    finally:
        batcher.close()


def test_a_full_queue_refuses_and_close_cancels_what_waits(engine, requests):
    ids = requests[0][0][:10]
    long = GenerationConfig(max_new_tokens=100, ignore_eos=True, use_medusa=False)
    started = threading.Event()
    batcher = InflightBatcher(engine, max_batch_size=1, max_queue=1, speculation="fixed")
    running = batcher.submit(ids, long, on_tokens=lambda new: started.set())
    assert started.wait(30)
    queued = batcher.submit(ids, long)
    with pytest.raises(QueueFull, match="queue is full"):
        batcher.submit(ids, long)
    batcher.close()
    for t in (running, queued):
        with pytest.raises(RequestCancelled):
            t.result(timeout=5)
    with pytest.raises(ForgeError, match="closed"):
        batcher.submit(ids, long)


def test_bad_requests_are_refused_at_submit(engine):
    batcher = InflightBatcher(engine, max_batch_size=1, speculation="off-above:1")
    try:
        with pytest.raises(ForgeError, match="empty prompt"):
            batcher.submit([], GenerationConfig())
        with pytest.raises(ForgeError, match="exceeds the KV cache"):
            batcher.submit([5] * 100, GenerationConfig(max_new_tokens=100))
    finally:
        batcher.close()
    with pytest.raises(ForgeError, match="speculation 'sometimes'"):
        InflightBatcher(engine, max_batch_size=1, speculation="sometimes")


def test_the_batch_has_its_own_cache_so_the_serial_engine_still_runs_beside_it(engine, requests, batch_one):
    i = next(iter(batch_one))
    batcher = InflightBatcher(engine, max_batch_size=2, speculation="fixed")
    try:
        ticket = batcher.submit(*requests[i])
        assert engine.generate_ids(*requests[i]).tokens == batch_one[i]
        assert ticket.result(timeout=60).tokens == batch_one[i]
    finally:
        batcher.close()


def test_requests_with_logits_processing_get_their_batch_one_tokens_and_log_probs(engine, requests):
    paren = engine.tokenizer.hf.encode("(", add_special_tokens=False)[0]
    settings = [
        LogitsSettings(repetition_penalty=1.4),
        LogitsSettings(presence_penalty=0.6, frequency_penalty=0.3),
        LogitsSettings(embedding_bias=((paren, -6.0),), bad_words=((paren,),)),
        LogitsSettings(min_length=12, end_ids=(2,)),
    ]
    chosen = []
    for k in range(8):
        ids = requests[k][0][-40:]
        cfg = GenerationConfig(
            max_new_tokens=12,
            use_medusa=k % 2 == 0,
            logits_settings=settings[k % 4],
            return_log_probs=True,
            return_generation_logits=k == 1,
            return_context_logits=k == 2,
            stop_words=((paren,),) if k == 5 else (),
        )
        chosen.append((ids, cfg))
    alone = [engine.generate_ids(ids, cfg) for ids, cfg in chosen]
    batcher = InflightBatcher(engine, max_batch_size=4, speculation="fixed", prefill_chunk=16)
    random_trees(batcher, seed=4)
    try:
        batched = [t.result(timeout=60) for t in [batcher.submit(ids, cfg) for ids, cfg in chosen]]
    finally:
        batcher.close()
    for a, b in zip(alone, batched):
        assert b.tokens == a.tokens and b.finish_reason == a.finish_reason
        assert b.log_probs == pytest.approx(a.log_probs, abs=1e-4)
    assert batched[1].generation_logits.shape == alone[1].generation_logits.shape
    assert batched[2].context_logits.shape == alone[2].context_logits.shape == (len(chosen[2][0]), 8192)
    assert np.allclose(batched[2].context_logits, alone[2].context_logits, atol=1e-4)


GEMM_KERNELS = {
    # MKL's own choice of kernel by M: chunks of 2..8 rows (every size checked), then longer totals
    "mkl chunks": (lambda model: CPU_GEMM_ROWS, (*range(2, 9), 3 * 8 + 1, 3 * 8 + 5)),
    # oneDNN over reordered weights: one kernel from 2 rows up to a chunk of 128, and past it
    "onednn packed": (lambda model: packed_rows(model), (*range(2, 20), 47, 64, 100, 128, 129, 2 * 128 + 7)),
}


@pytest.mark.parametrize("kernel", sorted(GEMM_KERNELS))
@pytest.mark.parametrize("threads", [1, 2])
def test_a_rows_gemm_bits_do_not_depend_on_what_shares_its_chunk(engine, threads, kernel):
    """What the batch's invariance rests on (docs/batching.md): every linear of the model, run by
    linear_rows in the CPU's row chunks, gives a row the same bits at any position, beside any
    other rows, whatever the total row count (each chunk size from least to most included)."""
    import torch

    from medusa_forge.model.llama import linear_rows

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(threads)
    layer = engine.model.layers[0]
    make, totals = GEMM_KERNELS[kernel]
    try:
        chunks = make(engine.model)
        assert chunks is not None, f"{kernel} is not available or not row invariant here"
        for mod in (layer.attn.wqkv, layer.attn.wo, layer.ffn.w_gate_up, layer.ffn.w_down, engine.model.lm_head):
            row = torch.randn(1, mod.in_features, generator=g).to(engine.device)
            alone = linear_rows(mod, row, chunks)[0]
            for total in totals:
                others = torch.randn(total, mod.in_features, generator=g).to(engine.device)
                at = int(torch.randint(total, (1,), generator=g))
                others[at] = row[0]
                assert torch.equal(linear_rows(mod, others, chunks)[at], alone), (mod, total)
    finally:
        torch.set_num_threads(before)


def test_the_cpu_batcher_runs_its_gemms_over_onednn_packed_weights(engine):
    batcher = InflightBatcher(engine, max_batch_size=2, speculation="fixed")
    try:
        info = batcher.describe()
    finally:
        batcher.close()
    assert info["gemm"] == "oneDNN packed weights" and info["gemm_rows"] == [2, 128]
    assert info["batch_invariant"] is True


def test_a_cpu_bf16_batcher_says_it_is_not_batch_invariant(model_dir):
    bf16 = load_engine(model_dir, None, dtype="bfloat16", device="cpu", max_seq_len=160)
    batcher = InflightBatcher(bf16, max_batch_size=2)
    try:
        info = batcher.describe()
    finally:
        batcher.close()
    assert info["batch_invariant"] is False and info["gemm"] == "the device's BLAS"
    assert [w for w in scheduler_warnings(info) if "--dtype float32" in w] != []


@pytest.mark.parametrize(
    "scheduler,advice",
    [
        ({"max_batch_size": 1, "speculation": "serial"}, []),
        ({"max_batch_size": 8, "device": "cpu", "batch_invariant": True}, []),
        ({"max_batch_size": 8, "device": "cpu", "batch_invariant": False}, ["--dtype float32"]),
        ({"max_batch_size": 8, "device": "cuda:0", "batch_invariant": True}, ["--max-batch-size 1"]),
        ({"max_batch_size": 8, "device": "cuda", "batch_invariant": True}, ["--max-batch-size 1"]),
    ],
)
def test_a_served_model_warns_of_a_batcher_that_differs_or_is_slower_than_serial(scheduler, advice):
    warnings = scheduler_warnings(scheduler)
    assert len(warnings) == len(advice) and all(a in w for a, w in zip(advice, warnings))


def test_auto_speculation_measures_this_machine_and_records_its_choices(engine, requests, batch_one):
    picked = [i for i in batch_one if requests[i][1].use_medusa][:6]
    batcher = InflightBatcher(engine, max_batch_size=3, speculation="auto")
    try:
        got = [t.result(timeout=60).tokens for t in [batcher.submit(*requests[i]) for i in picked]]
        info = batcher.describe()
    finally:
        batcher.close()
    assert got == [batch_one[i] for i in picked]
    cost = info["cost_model"]
    assert cost["rows"][0] == 1 and cost["rows"][-1] == 3 * 8 and cost["seconds"] == sorted(cost["seconds"])
    assert info["speculation"] == "auto" and info["tree_sizes"] == [0, 1, 2, 4, 7]
    assert sum(info["steps_by_tree_size"].values()) > 0


def test_each_steps_draft_count_is_the_tree_that_step_verified_and_zero_for_a_plain_step(engine, requests):
    """off-above:1 decodes plainly while both requests run and verifies a tree while one runs alone."""
    ids = requests[0][0][:12]
    cfgs = [GenerationConfig(max_new_tokens=n, use_medusa=True, ignore_eos=True) for n in (6, 24)]
    batcher = InflightBatcher(engine, max_batch_size=2, speculation="off-above:1")
    try:
        results = [t.result(timeout=120) for t in [batcher.submit(ids, c) for c in cfgs]]
    finally:
        batcher.close()
    trees = {k: batcher.policy.ladder.buffers[k].tree_indices.shape[0] - 1 for k in batcher.policy.ladder.sizes[1:]}
    for r in results:
        assert len(r.drafts_per_step) == len(r.accepted_per_step)
        assert set(r.drafts_per_step) <= {0, *trees.values()}
        assert all(d > 0 for d, n in zip(r.drafts_per_step, r.accepted_per_step) if n > 1)
        assert Reply.from_result(r).total_draft_tokens == sum(r.drafts_per_step)
    assert 0 in results[0].drafts_per_step  # its steps shared with the other request ran plainly
    assert any(results[1].drafts_per_step)  # the longer one, alone at the end, verified trees
    serial = engine.generate_ids(ids, cfgs[0])
    assert serial.drafts_per_step == [engine.tree.num_nodes - 1] * serial.steps
    plain = engine.generate_ids(ids, GenerationConfig(max_new_tokens=6, use_medusa=False, ignore_eos=True))
    assert plain.drafts_per_step == [0] * plain.steps and Reply.from_result(plain).acceptance_rate == 0.0


@pytest.mark.parametrize("new_rows, prefix", [(1, 3), (1, 150), (5, 60), (17, 3), (32, 120)])
def test_a_slots_attention_bits_do_not_depend_on_the_thread_count(engine, new_rows, prefix):
    """The packed step runs each slot's attention at one thread (llama's _packed): that is exact
    only because SDPA gives a row the same bits at any thread count."""
    import torch
    import torch.nn.functional as F

    cfg = engine.cfg
    g = torch.Generator().manual_seed(new_rows * 1000 + prefix)
    group, seen = cfg.num_heads // cfg.num_kv_heads, prefix + new_rows
    q = torch.randn(1, cfg.num_kv_heads, group * new_rows, cfg.head_dim, generator=g)
    k, v = (torch.randn(1, cfg.num_kv_heads, seen, cfg.head_dim, generator=g) for _ in range(2))
    causal = torch.ones(new_rows, new_rows, dtype=torch.bool).tril_()
    mask = torch.cat([torch.ones(new_rows, prefix, dtype=torch.bool), causal], 1)[None, None].repeat(1, 1, group, 1)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(*outs)
