"""Decode-step latency at a large-model shape with random weights, against the HBM floor.

At batch 1 a decode step must read every weight once, so ``weight bytes / copy bandwidth`` is the
floor no implementation beats. We time, as CUDA-graph replays: the single-token step, the Medusa
tree step (verification of the whole tree + acceptance + KV moves + heads), and the heads alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medusa_forge.bench.shapes import LLAMA3_8B
from medusa_forge.engine.cuda_graphs import capture
from medusa_forge.heads.medusa_head import MedusaHeads, MedusaHeadsConfig
from medusa_forge.model.config import ModelConfig
from medusa_forge.model.llama import Transformer
from medusa_forge.tree.choice_tree import ChoiceTree


@dataclass
class StepTimes:
    single_ms: float
    tree_ms: float
    heads_ms: float
    floor_ms: float
    weight_gb: float
    copy_gb_s: float
    tree_nodes: int

    def to_dict(self) -> dict:
        return {
            "single_step_ms": round(self.single_ms, 4),
            "tree_step_ms": round(self.tree_ms, 4),
            "heads_ms": round(self.heads_ms, 4),
            "hbm_floor_ms": round(self.floor_ms, 4),
            "weight_gb": round(self.weight_gb, 3),
            "copy_bandwidth_gb_s": round(self.copy_gb_s, 1),
            "tree_nodes": self.tree_nodes,
            "single_vs_floor": round(self.floor_ms / self.single_ms, 4),
            "tree_vs_single": round(self.tree_ms / self.single_ms, 4),
            "heads_share_of_tree_step": round(self.heads_ms / self.tree_ms, 4),
        }


def copy_bandwidth_gb_s(nbytes: int = 2 << 30, iters: int = 20) -> float:
    """Device-to-device copy rate, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / iters
    del src, dst
    return 2 * nbytes / seconds / 1e9


def random_model(cfg: ModelConfig, dtype=torch.bfloat16, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = Transformer(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.eval().requires_grad_(False)


def step_weight_bytes(model: Transformer) -> int:
    """Bytes a decode step must read: every weight except the embedding table (one row is read).

    Counted over the state dict so FP8 layers (weights held as buffers) count at one byte each.
    """
    total = sum(
        t.numel() * t.element_size()
        for n, t in model.state_dict().items()
        if not n.startswith("embed") and not n.endswith("weight_scale_row")
    )
    if model.config.tie_word_embeddings:
        total += model.embed.weight.numel() * model.embed.weight.element_size()
    return total


def time_graph(fn, reset, iters: int = 50) -> float:
    """Median ms of replays of a captured step; ``reset`` restores the state between replays."""
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(iters):
        reset()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def random_engine(
    cfg: ModelConfig | str,
    tree: str = "mc_sim_7b_63",
    num_heads: int = 5,
    max_seq_len: int = 2048,
    dtype=torch.bfloat16,
    compile: bool = False,
    fp8: bool = False,
):
    """A CUDA engine with random weights at ``cfg``'s shape (or a HF model dir's real weights) and
    random shared-lm_head heads: what the step benchmarks time. ``fp8``: the block GEMMs as FP8
    tensor-core GEMMs (static activation scales), as an fp8 engine runs."""
    from medusa_forge.engine.medusa_engine import MedusaEngine
    from medusa_forge.model.checkpoint import load_hf_model

    model = random_model(cfg, dtype) if isinstance(cfg, ModelConfig) else load_hf_model(cfg, dtype=dtype, device="cuda")
    if fp8:
        from medusa_forge.model.fp8_linear import linear_names, swap_linears

        swap_linears(model, "scaled_mm", input_scales={name: 0.05 for name in linear_names(model)})
        torch.cuda.empty_cache()
    mc = model.config  # a real model gets per-head projections, as trained Medusa-1 heads have
    shared = isinstance(cfg, ModelConfig)
    heads = MedusaHeads(MedusaHeadsConfig(num_heads, 1, mc.hidden_size, mc.vocab_size, shared_lm_head=shared))
    heads = heads.to(device="cuda", dtype=dtype)
    with torch.no_grad():
        heads.res_weight.normal_(0, 0.02)
        if heads.proj_weight is not None:
            heads.proj_weight.copy_(model.lm_head.weight[None].expand_as(heads.proj_weight))
    return MedusaEngine(model, heads, ChoiceTree.parse(tree), None, max_seq_len=max_seq_len, compile=compile)


def prefill_and_reset(engine, context: int):
    """Prefill ``context`` tokens; return a function restoring that state, so every timed replay of a
    step starts from the same committed length, root and heads' top-k."""
    engine._prefill(list(range(1, context + 1)))
    saved = (engine.cur_len.clone(), engine.root.clone(), engine.head_topk.clone())

    def reset() -> None:
        engine.cur_len.copy_(saved[0])
        engine.root.copy_(saved[1])
        engine.head_topk.copy_(saved[2])

    return reset


def measure(
    cfg: ModelConfig = LLAMA3_8B,
    tree: str = "mc_sim_7b_63",
    num_heads: int = 5,
    context: int = 1024,
    max_seq_len: int = 2048,
    dtype=torch.bfloat16,
    compile: bool = False,
    fp8: bool = False,
) -> StepTimes:
    from medusa_forge.engine.generation import GenerationConfig

    engine = random_engine(cfg, tree, num_heads, max_seq_len, dtype, compile, fp8)
    model, heads = engine.model, engine.heads
    reset = prefill_and_reset(engine, context)
    gcfg = GenerationConfig()
    single = engine._step("base", gcfg)
    tree_step = engine._step("greedy", gcfg)
    hidden = torch.randn(1, cfg.hidden_size, device="cuda", dtype=dtype)
    # defaults, not a closure over engine: the del below must be able to drop it
    heads_graph = capture(lambda f=engine._heads_topk, r=engine.row0: f(hidden, r))
    bw = copy_bandwidth_gb_s()
    nbytes = step_weight_bytes(model)
    result = StepTimes(
        single_ms=time_graph(single, reset),
        tree_ms=time_graph(tree_step, reset),
        heads_ms=time_graph(heads_graph.replay, lambda: None),
        floor_ms=nbytes / (bw * 1e9) * 1e3,
        weight_gb=nbytes / 1e9,
        copy_gb_s=bw,
        tree_nodes=engine.tree.num_nodes,
    )
    del engine, model, heads, heads_graph
    torch.cuda.empty_cache()
    return result
