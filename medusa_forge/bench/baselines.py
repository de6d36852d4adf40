"""Peers we measure against, run on the same model, prompts and device in the same process.

* ``hf_generate``: transformers' ``generate`` (greedy), with the static cache and a compiled forward
  when asked (transformers' documented recipe for fast decoding), else its defaults.
* ``ReferenceMedusa``: FasterDecoding/Medusa's eager tree decoding, step for step as
  ``medusa/model/medusa_model.py::medusa_generate`` and ``medusa/model/utils.py`` do it
  (commit 10a2697): candidates from the heads' top-10 at the last position, one tree forward of
  the HF model with a 4D tree mask, heads evaluated on every tree node, greedy posterior with a
  host-side accept length, the accepted KV entries copied to the front and the cache cropped.
  It uses our heads and tree buffers so the algorithm, not the weights, is what differs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from medusa_forge.heads.medusa_head import MedusaHeads
from medusa_forge.tree.choice_tree import TOPK, ChoiceTree, tree_buffers


@dataclass
class PeerResult:
    name: str
    tokens: int
    seconds: float
    outputs: list[list[int]]
    note: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def load_hf(model_dir, device, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], max_new_tokens: int, compiled: bool) -> PeerResult:
    """Greedy ``generate`` over the prompts; with ``compiled``: static cache + torch.compile'd forward."""
    device = model.device
    note = "default (dynamic cache, eager)"
    kwargs = {}
    if compiled:
        # transformers compiles the one-token decode forward itself when the cache is static (its
        # generation_config.compile_config); compiling model.forward by hand would also recompile
        # the prefill for every distinct prompt length.
        kwargs = {"cache_implementation": "static"}
        note = "static cache, decode step auto-compiled by transformers"

    # Never stop or suppress at EOS, like our engines' ignore_eos benchmark setting: same token counts.
    model.generation_config.eos_token_id = None

    def run(ids: list[int]) -> list[int]:
        x = torch.tensor([ids], device=device)
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )
        return out[0, len(ids) :].tolist()

    run(prompts[0])  # warm-up (compilation happens here)
    run(prompts[0])
    _sync(device)
    t0 = time.perf_counter()
    outputs = [run(ids) for ids in prompts]
    _sync(device)
    return PeerResult("hf_generate", sum(map(len, outputs)), time.perf_counter() - t0, outputs, note)


class ReferenceMedusa:
    """FasterDecoding's eager Medusa loop over a transformers model and a DynamicCache."""

    def __init__(self, model, heads: MedusaHeads, tree: ChoiceTree):
        self.model, self.heads = model, heads
        self.buffers = tree_buffers(tree, device=model.device)
        self.lm_head = model.get_output_embeddings().weight

    def _forward(self, ids, cache, positions, mask):
        out = self.model.model(
            input_ids=ids, past_key_values=cache, position_ids=positions, attention_mask=mask, use_cache=True
        )
        hidden = out.last_hidden_state[0]
        logits = self.model.lm_head(hidden).float()
        medusa_logits = self.heads(hidden, self.lm_head).float()  # every node, as the reference does
        return logits, medusa_logits

    def _tree_mask(self, prefix: int, dtype) -> torch.Tensor:
        n = self.buffers.attn_mask.shape[0]
        allowed = torch.cat(
            [torch.ones(n, prefix, dtype=torch.bool, device=self.model.device), self.buffers.attn_mask], dim=1
        )
        mask = torch.zeros(allowed.shape, dtype=dtype, device=self.model.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]

    @staticmethod
    def _move_kv(cache, select: torch.Tensor, start: int) -> None:
        """Copy the accepted entries to ``start..`` and crop (utils.update_inference_inputs)."""
        layers = getattr(cache, "layers", None)
        pairs = (
            [(layer.keys, layer.values) for layer in layers]
            if layers is not None
            else list(zip(cache.key_cache, cache.value_cache))
        )
        for k, v in pairs:
            k[:, :, start : start + len(select)] = k[:, :, select]
            v[:, :, start : start + len(select)] = v[:, :, select]
        keep = start + len(select)
        try:  # transformers < 5.2x: crop(final length)
            cache.crop(keep)
        except ValueError:  # newer: crop(-tokens to remove)
            cache.crop(keep - cache.get_seq_length())

    @torch.inference_mode()
    def generate(self, ids: list[int], max_new_tokens: int) -> tuple[list[int], int]:
        from transformers import DynamicCache

        b, device = self.buffers, self.model.device
        cache = DynamicCache()
        x = torch.tensor([ids], device=device)
        logits, medusa_logits = self._forward(x, cache, torch.arange(len(ids), device=device)[None], None)
        logits, medusa_logits = logits[-1:], medusa_logits[:, -1:]
        seq_len, out, steps = len(ids), [], 0
        while len(out) < max_new_tokens:
            # generate_candidates
            root = logits[-1].argmax(-1, keepdim=True)
            top = torch.topk(medusa_logits[:, -1], TOPK, dim=-1).indices.flatten()
            candidates = torch.cat([root, top])
            tree_tokens = candidates[b.tree_indices]
            cart = tree_tokens[b.retrieve_indices]
            # tree_decoding
            positions = (b.positions + seq_len)[None]
            t_logits, t_medusa = self._forward(
                tree_tokens[None], cache, positions, self._tree_mask(seq_len, self.model.dtype)
            )
            logits_p, medusa_p = t_logits[b.retrieve_indices], t_medusa[:, b.retrieve_indices]
            # evaluate_posterior (greedy), with the reference's host-side accept length
            match = (cart[:, 1:] == logits_p[:, :-1].argmax(-1)) & b.retrieve_valid[:, 1:]
            lengths = match.int().cumprod(1).sum(1)
            accept = int(lengths.max())
            best = int(torch.argmax(lengths)) if accept > 0 else 0
            # update_inference_inputs
            select = b.retrieve_indices[best, : accept + 1] + seq_len
            self._move_kv(cache, select, seq_len)
            out.extend(cart[best, : accept + 1].tolist())
            seq_len += accept + 1
            logits = logits_p[None, best, accept]
            medusa_logits = medusa_p[:, None, best, accept]
            steps += 1
        return out[:max_new_tokens], steps

    def bench(self, prompts: list[list[int]], max_new_tokens: int) -> PeerResult:
        self.generate(prompts[0], 16)
        _sync(self.model.device)
        t0 = time.perf_counter()
        outputs = [self.generate(ids, max_new_tokens)[0] for ids in prompts]
        _sync(self.model.device)
        return PeerResult(
            "reference_medusa_eager",
            sum(map(len, outputs)),
            time.perf_counter() - t0,
            outputs,
            "FasterDecoding medusa_generate algorithm, eager, transformers DynamicCache",
        )
