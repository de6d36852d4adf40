"""Find where Medusa tree decoding stops being bit-identical to plain greedy decoding.

Token identity is a blunt test: a one-ulp difference flips a token only at a near-tie. This probe
compares the *KV cache* instead, which every committed token writes in every layer: plain greedy
decoding fills slots 0..L, then tree decoding of the same prompt must leave the same bytes there.
The first slot/layer that differs says which computation is not row invariant (layer 0's K/V
come straight from the QKV GEMM of that token's row in the tree step).

Trained heads are not needed: "oracle heads" put the base model's own future tokens at random
ranks along a random tree path each step, so every tree row and every path length gets
exercised. Run on CUDA (CPU engines run the reference ops, checked against transformers).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from medusa_forge.engine.cuda_graphs import capture
from medusa_forge.engine.generation import GenerationConfig
from medusa_forge.engine.medusa_engine import MedusaEngine
from medusa_forge.model.gemm_layout import linear_groups
from medusa_forge.tree.choice_tree import TOPK


@dataclass
class PromptProbe:
    prompt_tokens: int
    first_token_mismatch: int | None  # index into the generated tokens, None when all equal
    first_kv_mismatch: dict | None  # {slot, layer, kv, tree_row, max_abs_diff}
    accepted_mean: float


@dataclass
class ProbeReport:
    prompts: list[PromptProbe] = field(default_factory=list)
    gemm_rows: dict = field(default_factory=dict)
    layouts: dict = field(default_factory=dict)

    def summary(self) -> dict:
        n = len(self.prompts)
        return {
            "prompts": n,
            "tokens_identical": sum(p.first_token_mismatch is None for p in self.prompts),
            "kv_identical": sum(p.first_kv_mismatch is None for p in self.prompts),
            "mean_accepted_per_step": round(sum(p.accepted_mean for p in self.prompts) / max(n, 1), 3),
        }

    def to_dict(self) -> dict:
        return {
            "summary": self.summary(),
            "layouts": self.layouts,
            "gemm_rows": self.gemm_rows,
            "prompts": [asdict(p) for p in self.prompts],
        }


@torch.inference_mode()
def base_decode(engine: MedusaEngine, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    gcfg = GenerationConfig(max_new_tokens=n, use_medusa=False, ignore_eos=True)
    tokens = engine.generate_ids(ids, gcfg).tokens
    return tokens, engine.model.kv.clone()


@torch.inference_mode()
def oracle_tree_decode(
    engine: MedusaEngine, ids: list[int], truth: list[int], rng: random.Random
) -> tuple[list[int], dict[int, int], list[int]]:
    """Tree decoding whose heads propose ``truth`` along a random path; returns (tokens, slot -> tree
    row that produced the slot's K/V, accepted count per step)."""
    step = engine._step("greedy", GenerationConfig())
    engine._prefill(ids)
    tokens = [int(engine.root.item())]
    rows: dict[int, int] = {}
    accepted: list[int] = []
    paths, depth, vocab = engine.tree.paths, engine.tree.depth, engine.cfg.vocab_size
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    while len(tokens) < len(truth):
        j = len(tokens) - 1  # truth[j] is the pending root
        topk = torch.randint(vocab, (depth, TOPK), generator=gen)
        path = paths[rng.randrange(len(paths))]
        for d, rank in enumerate(path):
            if j + 1 + d < len(truth):
                topk[d, rank] = truth[j + 1 + d]
        engine.head_topk.copy_(topk)
        cur = int(engine.cur_len.item())
        step()
        out = engine.step_out.tolist()
        src = engine.kv_src.tolist()
        for i in range(out[0]):
            rows[cur + i] = src[i] - cur
        accepted.append(out[0])
        tokens.extend(out[1 : 1 + out[0]])
    return tokens[: len(truth)], rows, accepted


def first_kv_mismatch(a: torch.Tensor, b: torch.Tensor, upto: int, rows: dict[int, int]) -> dict | None:
    """kv [layers, 2, 1, kv_heads, S, D]: the lowest slot < upto (then layer) whose entries differ."""
    diff = a[..., :upto, :] != b[..., :upto, :]  # [L, 2, 1, H, upto, D]
    per_slot = diff.any(-1).any(3).any(2)  # [L, 2, upto]
    bad = per_slot.any(0).any(0).nonzero()
    if bad.numel() == 0:
        return None
    slot = int(bad[0, 0])
    layer, kv = (int(v) for v in per_slot[:, :, slot].nonzero()[0])
    delta = (a[layer, kv, ..., slot, :].float() - b[layer, kv, ..., slot, :].float()).abs().max()
    return {"slot": slot, "layer": layer, "kv": "kv"[kv], "tree_row": rows.get(slot), "max_abs_diff": float(delta)}


@torch.inference_mode()
def gemm_row_check(engine: MedusaEngine, rows: int) -> dict:
    """Every row of an M=rows GEMM against the same row at M=1, eager and inside CUDA graphs."""
    result = {}
    g = torch.Generator(device=engine.device).manual_seed(0)
    for key, mods in linear_groups(engine.model).items():
        w = mods[0][0].weight
        x = torch.randn(rows, w.shape[1], generator=g, device=w.device, dtype=torch.float32).to(w.dtype)
        eager_full = F.linear(x, w)
        eager_bad = [i for i in range(rows) if not torch.equal(F.linear(x[i : i + 1], w)[0], eager_full[i])]
        one, full = torch.empty(1, w.shape[0], device=w.device, dtype=w.dtype), torch.empty_like(eager_full)
        xi = torch.empty(1, w.shape[1], device=w.device, dtype=w.dtype)
        g_one = capture(lambda: one.copy_(F.linear(xi, w)))
        g_full = capture(lambda: full.copy_(F.linear(x, w)))
        g_full.replay()
        graph_bad = []
        for i in range(rows):
            xi.copy_(x[i : i + 1])
            g_one.replay()
            if not torch.equal(one[0], full[i]):
                graph_bad.append(i)
        result[key] = {
            "shape": list(w.shape),
            "kn_layout": w.stride(0) == 1,
            "eager_rows_differing": eager_bad,
            "graph_rows_differing": graph_bad,
            "graph_equals_eager": bool(torch.equal(full, eager_full)),
        }
    return result


def probe(engine: MedusaEngine, prompts: list[list[int]], new_tokens: int, seed: int = 0) -> ProbeReport:
    rng = random.Random(seed)
    report = ProbeReport(layouts=engine.gemm_layouts.to_dict())
    if engine.device.type == "cuda":
        report.gemm_rows = gemm_row_check(engine, engine.tree.num_nodes)
    for ids in prompts:
        truth, kv_base = base_decode(engine, ids, new_tokens)
        tokens, rows, accepted = oracle_tree_decode(engine, ids, truth, rng)
        mismatch = next((i for i, (a, b) in enumerate(zip(truth, tokens)) if a != b), None)
        # Slots both runs committed for the same tokens: the prompt, then every agreeing token (the
        # step that produced token m also committed token m-1; the last token is never fed back).
        upto = len(ids) + (mismatch if mismatch is not None else len(truth) - 1)
        kv = first_kv_mismatch(kv_base, engine.model.kv, upto, rows)
        report.prompts.append(PromptProbe(len(ids), mismatch, kv, sum(accepted) / max(len(accepted), 1)))
    return report
