"""The ``auto`` choice tree: searched for this model, these heads and this device.

1. Acceptance, conditional on the path. On calibration prompts the base model writes its own greedy
   continuation; one full pass gives the hidden state at every position t, and the heads' top-10 there.
   For each t we record the *true rank vector* ``R_t = (r_0, r_1, ...)``: r_d is the rank of the true
   token x[t+2+d] in head d's top-10 (-1 if absent). Under greedy verification a tree node
   ``p = (p_0..p_k)`` is accepted at t iff ``R_t[:k+1] == p`` — depth d is only reached when depths < d
   matched — so ``P(p)`` is the fraction of positions whose R_t starts with p (the empirical joint,
   not a product of per-head marginals). Accepted nodes form a chain, hence for a prefix-closed tree
   ``E[tokens per step] = 1 + sum_{p in tree} P(p)``.
2. Latency. Trees of several sizes are decoded for real on this device (same engine, CUDA graphs on
   GPU) and the time per decoding step is interpolated over tree size.
3. Growth. Nodes are added greedily in order of P(p) (a child never beats its parent, so every prefix
   of that order is a valid tree and the best tree of each size); the size with the most expected
   tokens per second, ``E(n) / step_ms(n)``, wins.
4. Depth. A deeper tree runs more heads every step (each head is a vocab-sized GEMV), so depth is a
   second axis: steps 2-3 run for every depth limit in ``depths``, and the best few (depth, size)
   candidates by expected tokens/s are then decoded on all calibration prompts; the fastest
   *measured* one is the tree. Expected and measured figures of every finalist are kept.

The manifest's ``tree_stats`` keeps the curve, the expected acceptance length and the acceptance
length then measured by decoding the calibration prompts with the chosen tree.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from medusa_forge.engine.generation import GenerationConfig
from medusa_forge.engine.medusa_engine import MedusaEngine
from medusa_forge.errors import ForgeError
from medusa_forge.heads.medusa_head import MedusaHeads
from medusa_forge.model.forward import full_pass
from medusa_forge.model.llama import Transformer
from medusa_forge.tree.choice_tree import MAX_TREE_NODES, TOPK, ChoiceTree

# 63 draft nodes: TensorRT-LLM's default max_draft_len, so an auto tree also fits a converted checkpoint.
DEFAULT_MAX_NODES = 63
DEFAULT_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 63)


@dataclass(frozen=True)
class SearchConfig:
    calib_limit: int = 32  # calibration prompts
    prompt_tokens: int = 256  # prompts keep their last N tokens
    new_tokens: int = 64  # greedy continuation per prompt (the positions acceptance is measured on)
    max_nodes: int = DEFAULT_MAX_NODES
    sizes: tuple[int, ...] = DEFAULT_SIZES  # tree sizes whose step latency is measured
    timing_prompts: int = 4
    timing_tokens: int = 64
    depths: tuple[int, ...] = ()  # depth limits searched; (): 2 .. number of heads
    finalists: int = 3  # candidates decoded on every calibration prompt before choosing


@dataclass
class Calibration:
    """True rank vectors [positions, depth] (-1 = not in the head's top-k) from calibration prompts."""

    ranks: Tensor
    prompts: int

    @property
    def positions(self) -> int:
        return int(self.ranks.shape[0])

    def path_counts(self) -> Counter:
        """How many positions accept each path (each prefix of every rank vector up to its first miss)."""
        counts: Counter = Counter()
        for row in self.ranks.tolist():
            for d, r in enumerate(row):
                if r < 0:
                    break
                counts[tuple(row[: d + 1])] += 1
        return counts

    def ranked_nodes(self, max_depth: int) -> list[tuple[tuple[int, ...], int]]:
        """(path, count) in greedy growth order; every prefix of the list is a prefix-closed tree."""
        nodes = [(p, c) for p, c in self.path_counts().items() if len(p) <= max_depth]
        return sorted(nodes, key=lambda pc: (-pc[1], len(pc[0]), pc[0]))

    def expected_tokens_per_step(self, tree: ChoiceTree) -> float:
        counts = self.path_counts()
        return 1.0 + sum(counts.get(p, 0) for p in tree.paths) / max(1, self.positions)


def encode_prompts(tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Tokenize and keep each prompt's last ``max_tokens`` tokens (BOS kept in front)."""
    out = []
    for text in texts:
        ids = tokenizer.encode(text)
        if len(ids) > max_tokens:
            bos = ids[:1] if ids and ids[0] == tokenizer.hf.bos_token_id else []
            ids = bos + ids[len(ids) - max_tokens + len(bos) :]
        if ids:
            out.append(ids)
    if not out:
        raise ForgeError("calibration prompts tokenized to nothing")
    return out


def kv_len(prompt_ids: list[list[int]], new_tokens: int) -> int:
    """A KV cache long enough for any prompt + new tokens + the largest tree (with the engine's slack)."""
    return max(len(ids) for ids in prompt_ids) + new_tokens + 2 * (MAX_TREE_NODES + 1) + 8


@torch.inference_mode()
def calibrate(
    model: Transformer, heads: MedusaHeads, tokenizer, prompt_ids: list[list[int]], new_tokens: int, depth: int
) -> Calibration:
    """Measure true rank vectors on the base model's own greedy continuations of the prompts."""
    engine = MedusaEngine(model, None, None, tokenizer, max_seq_len=kv_len(prompt_ids, new_tokens), cuda_graphs=False)
    gcfg = GenerationConfig(max_new_tokens=new_tokens, use_medusa=False, ignore_eos=True)
    dev = engine.device
    rows = []
    for ids in prompt_ids:
        seq = ids + engine.generate_ids(ids, gcfg).tokens
        first, last = len(ids) - 1, len(seq) - 2 - depth  # t: root x[t+1] generated, x[t+1+depth] known
        if last < first:
            continue
        hidden = full_pass(model, seq)
        t = torch.arange(first, last + 1, device=dev)
        topk = heads(hidden[t], model.lm_head.weight, num_heads=depth).topk(TOPK, dim=-1).indices  # [D, n, K]
        seq_t = torch.tensor(seq, device=dev)
        targets = torch.stack([seq_t[t + 2 + d] for d in range(depth)])  # [D, n]
        match = topk == targets[..., None]
        rank = torch.where(match.any(-1), match.int().argmax(-1), torch.full_like(targets, -1))
        rows.append(rank.t().cpu())
    if not rows:
        raise ForgeError("calibration produced no positions; use longer continuations (new_tokens > tree depth)")
    return Calibration(torch.cat(rows), len(prompt_ids))


@torch.inference_mode()
def tree_from_nodes(nodes: list[tuple[tuple[int, ...], int]], n: int, name: str = "auto") -> ChoiceTree:
    return ChoiceTree.from_paths([list(p) for p, _ in nodes[:n]], name=name)


def decode_stats(
    model: Transformer,
    heads: MedusaHeads | None,
    tree: ChoiceTree | None,
    tokenizer,
    prompt_ids: list[list[int]],
    tokens: int,
) -> dict:
    """Decode for real: ms per step, tokens per step and decode tokens/s (after a warm-up on GPU)."""
    engine = MedusaEngine(model, heads if tree else None, tree, tokenizer, max_seq_len=kv_len(prompt_ids, tokens))
    gcfg = GenerationConfig(max_new_tokens=tokens, use_medusa=tree is not None, ignore_eos=True)
    if engine.device.type == "cuda":
        engine.generate_ids(prompt_ids[0], gcfg)  # warm-up: CUDA graph capture, kernel autotuning
    seconds, steps, produced = 0.0, 0, 0
    for ids in prompt_ids:
        r = engine.generate_ids(ids, gcfg)
        seconds += r.total_s - r.ttft_s
        steps += r.steps
        produced += sum(r.accepted_per_step)
    del engine
    return {
        "step_ms": 1e3 * seconds / max(1, steps),
        "tokens_per_step": produced / max(1, steps),
        "decode_tokens_per_s": produced / seconds if seconds > 0 else 0.0,
    }


def choose_size(expected: np.ndarray, sizes: list[int], step_ms: list[float]) -> tuple[int, np.ndarray, np.ndarray]:
    """The node count with the most expected tokens per second.

    ``expected[n-1]``: expected tokens per step of the first n ranked nodes; ``step_ms``: measured
    step time of the trees of ``sizes`` nodes. A bigger tree is never faster, so timer noise is
    clipped (running maximum) before interpolating over every n. Returns (n, clipped step_ms at
    ``sizes``, expected tokens/s for every n).
    """
    clipped = np.maximum.accumulate(np.asarray(step_ms, dtype=np.float64))
    lat = np.interp(np.arange(1, len(expected) + 1), sizes, clipped)
    tps = 1e3 * np.asarray(expected) / lat
    return int(np.argmax(tps)) + 1, clipped, tps


def search_depths(cfg: SearchConfig, num_heads: int) -> list[int]:
    depths = sorted(set(cfg.depths)) if cfg.depths else list(range(min(2, num_heads), num_heads + 1))
    bad = [d for d in depths if not 1 <= d <= num_heads]
    if bad:
        raise ForgeError(f"--search-depths {bad}: depths must be between 1 and the {num_heads} Medusa heads")
    return depths


def search_tree(
    model: Transformer, heads: MedusaHeads, tokenizer, texts: list[str], cfg: SearchConfig = SearchConfig()
) -> tuple[ChoiceTree, dict]:
    """The ``auto`` tree for this model, heads and device, and the stats that justify it."""
    depths = search_depths(cfg, heads.config.num_heads)
    ids = encode_prompts(tokenizer, texts[: cfg.calib_limit], cfg.prompt_tokens)
    cal = calibrate(model, heads, tokenizer, ids, cfg.new_tokens, max(depths))
    timing = ids[: cfg.timing_prompts]
    candidates, curves = [], {}
    for depth in depths:
        nodes = cal.ranked_nodes(depth) or [((0,), 0)]  # heads never right: the smallest tree
        limit = min(cfg.max_nodes, len(nodes))
        sizes = sorted({min(max(1, s), limit) for s in cfg.sizes} | {1, limit})
        measured = [
            decode_stats(model, heads, tree_from_nodes(nodes, n), tokenizer, timing, cfg.timing_tokens) for n in sizes
        ]
        counts = np.array([c for _, c in nodes[:limit]], dtype=np.float64)
        expected = 1.0 + np.cumsum(counts) / max(1, cal.positions)  # expected[n-1]: first n nodes
        best, step_ms, tps = choose_size(expected, sizes, [m["step_ms"] for m in measured])
        curves[depth] = [
            {
                "nodes": n,
                "step_ms": round(float(ms), 4),
                "expected_acceptance_length": round(float(expected[n - 1]), 4),
                "expected_tokens_per_s": round(float(tps[n - 1]), 2),
            }
            for n, ms in zip(sizes, step_ms)
        ]
        candidates.append(
            {
                "depth_limit": depth,
                "nodes": best,
                "expected_acceptance_length": float(expected[best - 1]),
                "expected_tokens_per_s": float(tps[best - 1]),
                "tree": tree_from_nodes(nodes, best),
            }
        )
    finalists = sorted(candidates, key=lambda c: -c["expected_tokens_per_s"])[: max(1, cfg.finalists)]
    for c in finalists:  # the same prompts for each: the measured winner is the tree
        c["measured"] = decode_stats(model, heads, c["tree"], tokenizer, ids, cfg.new_tokens)
    chosen = max(finalists, key=lambda c: c["measured"]["decode_tokens_per_s"])
    tree, final = chosen["tree"], chosen["measured"]
    base = decode_stats(model, None, None, tokenizer, timing, cfg.timing_tokens)
    stats = {
        "method": "auto",
        "device": device_name(model.lm_head.weight.device),
        "calib_prompts": cal.prompts,
        "calib_positions": cal.positions,
        "nodes": chosen["nodes"],
        "depth": tree.depth,
        "depth_limit": chosen["depth_limit"],
        "expected_acceptance_length": round(chosen["expected_acceptance_length"], 4),
        "measured_acceptance_length": round(final["tokens_per_step"], 4),
        "expected_tokens_per_s": round(chosen["expected_tokens_per_s"], 2),
        "measured_decode_tokens_per_s": round(final["decode_tokens_per_s"], 2),
        "base_step_ms": round(base["step_ms"], 4),
        "base_decode_tokens_per_s": round(base["decode_tokens_per_s"], 2),
        "latency_curve": curves[chosen["depth_limit"]],
        "depth_curves": {str(d): curve for d, curve in curves.items()},
        "finalists": [
            {
                "depth_limit": c["depth_limit"],
                "nodes": c["nodes"],
                "depth": c["tree"].depth,
                "expected_tokens_per_s": round(c["expected_tokens_per_s"], 2),
                "measured_decode_tokens_per_s": round(c["measured"]["decode_tokens_per_s"], 2),
                "measured_acceptance_length": round(c["measured"]["tokens_per_step"], 4),
            }
            for c in finalists
        ],
    }
    return tree, stats


def tree_report(
    model: Transformer,
    heads: MedusaHeads,
    tokenizer,
    texts: list[str],
    tree: ChoiceTree,
    cfg: SearchConfig = SearchConfig(),
) -> dict:
    """Expected and measured acceptance of a given (preset or file) tree on calibration prompts."""
    ids = encode_prompts(tokenizer, texts[: cfg.calib_limit], cfg.prompt_tokens)
    cal = calibrate(model, heads, tokenizer, ids, cfg.new_tokens, tree.depth)
    final = decode_stats(model, heads, tree, tokenizer, ids, cfg.new_tokens)
    return {
        "method": "given",
        "device": device_name(model.lm_head.weight.device),
        "calib_prompts": cal.prompts,
        "calib_positions": cal.positions,
        "nodes": tree.num_nodes - 1,
        "depth": tree.depth,
        "expected_acceptance_length": round(cal.expected_tokens_per_step(tree), 4),
        "measured_acceptance_length": round(final["tokens_per_step"], 4),
        "measured_decode_tokens_per_s": round(final["decode_tokens_per_s"], 2),
        "step_ms": round(final["step_ms"], 4),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"
