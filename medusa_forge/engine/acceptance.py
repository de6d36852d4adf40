"""Choosing the accepted path from one verification pass; pure tensor code, no host syncs.

Both functions take the verify logits of every tree node [N, V], the candidate tokens of every
root-to-leaf path [P, D+1] (column 0 is the root), the node index of each path entry and the
validity mask of the padded paths. They return (best path index, number of accepted draft
tokens), both 0-d tensors, so the whole step can run inside one CUDA graph.
"""

from __future__ import annotations

import torch
from torch import Tensor


def greedy_accept(logits: Tensor, path_tokens: Tensor, path_nodes: Tensor, path_valid: Tensor) -> tuple[Tensor, Tensor]:
    """Accept a draft token iff it equals the argmax at its parent; longest path wins (first on ties).

    Exact: the accepted tokens are those plain greedy decoding would produce.
    """
    pred = logits.argmax(-1)
    match = (path_tokens[:, 1:] == pred[path_nodes[:, :-1]]) & path_valid[:, 1:]
    accepted = match.long().cumprod(1).sum(1)
    best = accepted.argmax().view(1)
    return best, accepted.index_select(0, best)


def typical_accept(
    logits: Tensor,
    path_tokens: Tensor,
    path_nodes: Tensor,
    path_valid: Tensor,
    temperature: float,
    threshold: float,
    alpha: float,
) -> tuple[Tensor, Tensor]:
    """FasterDecoding's typical acceptance: p(x) > min(threshold, alpha * exp(-H(p))).

    Among the longest accepted paths, the one with the highest summed log-probability wins.
    """
    probs = torch.softmax(logits / temperature, dim=-1)
    entropy = -(probs * torch.log(probs + 1e-5)).sum(-1)
    limit = torch.minimum(torch.full_like(entropy, threshold), alpha * torch.exp(-entropy))
    parents = path_nodes[:, :-1]
    cand_prob = probs[parents, path_tokens[:, 1:]]
    ok = (cand_prob > limit[parents]) & path_valid[:, 1:]
    kept = ok.long().cumprod(1)
    accepted = kept.sum(1)
    # Length dominates (log-probs of accepted tokens are > log(1e-30) > -1e2 per token).
    score = accepted.float() * 1e4 + (torch.log(cand_prob.clamp_min(1e-30)) * kept).sum(1)
    best = score.argmax().view(1)
    return best, accepted.index_select(0, best)


def sample_token(
    logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """Sample one token per row of logits [R, V] (temperature > 0) with top-k / top-p filtering."""
    scores = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cum = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_scores, dim=-1) > top_p  # keep the token that crosses top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def commit_path(
    logits: Tensor,
    tree_tokens: Tensor,
    path_nodes: Tensor,
    best: Tensor,
    accepted: Tensor,
    cur_len: Tensor,
    step_out: Tensor,
    root: Tensor,
    last: Tensor,
    src: Tensor,
    dst: Tensor,
) -> None:
    """The step's bookkeeping once a path is chosen, written into the engine's state tensors.

    step_out = [a + 1, drafts[:a], new root, ...]; root = argmax at the last accepted node (the
    base's own greedy token); last = that node; src/dst = cache slots moving the path's K/V into
    place (all D+1 path entries: padding lands past the committed length); cur_len += a + 1.
    """
    nodes = path_nodes.index_select(0, best)[0]
    last.copy_(nodes.index_select(0, accepted))
    root.copy_(logits.index_select(0, last).argmax(-1))
    new_tokens = torch.cat([tree_tokens[nodes][1:], root])
    new_tokens.scatter_(0, accepted, root)  # drafts[:a] then the new root
    step_out[0:1].copy_(accepted + 1)
    step_out[1:].copy_(new_tokens)
    src.copy_(cur_len + nodes)
    dst.copy_(cur_len + torch.arange(nodes.shape[0], device=nodes.device))
    cur_len.add_(accepted[0] + 1)
