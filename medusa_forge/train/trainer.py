"""The training loop, nanoGPT-plain: batch, frozen-base forward, heads forward, loss, backward, step, log.

The base model's hidden states are computed once per batch under ``no_grad`` (bf16 on GPU) and
only positions that have a target for some head go through the heads, so the [K, M, V] logits
never include padding or prompt context. Heads keep fp32 master weights under bf16 autocast; the
optimizer is AdamW (fused on CUDA). The data order is a pure function of (seed, epoch), so a run
resumed at step s sees exactly the batches it would have seen.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from medusa_forge.heads.medusa_head import MedusaHeads
from medusa_forge.model.forward import hidden_states
from medusa_forge.model.llama import Transformer
from medusa_forge.train.config import TrainConfig
from medusa_forge.train.data import IGNORE_INDEX, Example, collate
from medusa_forge.train.evaluate import autocast
from medusa_forge.train.loss import head_weights, medusa_loss, shifted_targets


@dataclass
class LoopState:
    step: int = 0
    history: list[dict] = field(default_factory=list)  # one row per log interval
    evals: list[dict] = field(default_factory=list)  # one row per evaluation
    seconds: float = 0.0  # training time, summed over resumes
    targets_seen: int = 0
    planned_steps: int = 0
    stopped_early: bool = False  # --max-train-minutes cut the run short

    def to_dict(self) -> dict:
        return asdict(self)


def say(msg: str) -> None:
    """One log line on stderr that does not break a progress bar."""
    tqdm.write(msg, file=sys.stderr)


def _heads_str(values: list[float]) -> str:
    return " ".join(f"{v:.3f}" for v in values)


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    return max(1, math.ceil(n_examples / batch_size))


def total_steps(cfg: TrainConfig, n_examples: int) -> int:
    total = cfg.epochs * steps_per_epoch(n_examples, cfg.batch_size)
    return min(total, cfg.max_steps) if cfg.max_steps else total


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup, then constant or cosine decay to a tenth of --lr."""
    warmup = round(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant" or total <= warmup + 1:
        return cfg.lr
    progress = (step - warmup) / (total - warmup - 1)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def make_optimizer(heads: MedusaHeads, cfg: TrainConfig) -> torch.optim.Optimizer:
    fused = heads.res_weight.device.type == "cuda"
    return torch.optim.AdamW(
        heads.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, fused=fused
    )


def train_loop(
    model: Transformer,
    heads: MedusaHeads,
    opt: torch.optim.Optimizer,
    train: list[Example],
    cfg: TrainConfig,
    state: LoopState,
    *,
    amp: bool,
    pad_id: int,
    evaluate: Callable[[], dict],
    save: Callable[[], None],
) -> None:
    """Run from ``state.step`` to the last step, logging, evaluating and checkpointing on the way."""
    dev = model.lm_head.weight.device
    K = heads.res_weight.shape[0]
    B, spe = cfg.batch_size, steps_per_epoch(len(train), cfg.batch_size)
    total = total_steps(cfg, len(train))
    state.planned_steps, state.stopped_early = total, False
    eval_every = cfg.eval_every or max(1, total // 10)
    save_every = cfg.save_every or spe
    weights = head_weights(K, cfg.heads_coefficient, cfg.decay_coefficient)
    lm_head = model.lm_head.weight
    order, order_epoch = [], -1
    acc = torch.zeros(3, K, device=dev)  # loss sum, top-1 hits, targets
    acc_loss, acc_steps, acc_tokens = torch.zeros((), device=dev), 0, 0
    heads.train()
    bar = tqdm(
        total=total, initial=state.step, desc="train-heads", unit="step", disable=not cfg.progress, dynamic_ncols=True
    )
    t_log = time.perf_counter()
    deadline = time.perf_counter() + 60 * cfg.max_train_minutes if cfg.max_train_minutes else math.inf
    while state.step < total:
        epoch, i = divmod(state.step, spe)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(len(train), cfg.seed, epoch), epoch
        tokens, labels = collate([train[j] for j in order[i * B : (i + 1) * B]], pad_id)
        tokens, labels = tokens.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
        hidden = hidden_states(model, tokens)  # frozen base, no grad
        targets = shifted_targets(labels, K)
        sel = (targets != IGNORE_INDEX).any(0)
        h, t = hidden[sel], targets[:, sel]
        lr = lr_at(state.step, total, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast(dev, amp):
            logits = heads(h if amp else h.to(heads.res_weight.dtype), lm_head)
        loss, per_head, hits, counts = medusa_loss(logits, t, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(heads.parameters(), cfg.max_grad_norm)
        opt.step()
        state.step += 1
        acc += torch.stack([per_head * counts, hits.float(), counts.float()])
        acc_loss += loss.detach()
        acc_steps += 1
        acc_tokens += tokens.numel()
        bar.update(1)
        if time.perf_counter() > deadline and state.step < total:
            say(f"--max-train-minutes {cfg.max_train_minutes} reached: stopping at step {state.step} of {total}")
            total, state.stopped_early = state.step, True
        last = state.step == total
        if state.step % cfg.log_every == 0 or last:
            dt = time.perf_counter() - t_log
            state.seconds += dt
            n = acc[2].clamp(min=1)
            row = {
                "step": state.step,
                "epoch": round(state.step / spe, 3),
                "lr": lr,
                "loss": acc_loss.item() / acc_steps,
                "head_loss": (acc[0] / n).tolist(),
                "head_top1": (acc[1] / n).tolist(),
                "tokens_per_s": round(acc_tokens / dt, 1) if dt > 0 else 0.0,
            }
            state.targets_seen += int(acc[2, 0].item())
            state.history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", top1=f"{row['head_top1'][0]:.3f}")
            if not cfg.progress:
                say(
                    f"step {state.step}/{total} loss {row['loss']:.4f} lr {lr:.2e} "
                    f"top1 [{_heads_str(row['head_top1'])}] {row['tokens_per_s']:.0f} tok/s"
                )
            acc.zero_()
            acc_loss.zero_()
            acc_steps, acc_tokens = 0, 0
            t_log = time.perf_counter()
        if state.step % eval_every == 0 or last:
            t_eval = time.perf_counter()
            state.evals.append({"step": state.step, **evaluate()})
            for split, m in state.evals[-1].items():
                if split != "step":
                    say(
                        f"eval step {state.step} {split}: top1 [{_heads_str(m['top1'])}] top5 [{_heads_str(m['top5'])}]"
                    )
            t_log += time.perf_counter() - t_eval  # evaluation is not training time
        if state.step % save_every == 0 or last:
            t_save = time.perf_counter()
            save()
            t_log += time.perf_counter() - t_save
    bar.close()
