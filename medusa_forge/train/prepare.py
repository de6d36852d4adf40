"""Assemble a run's data: the user's file, self-distilled continuations, the held-out split and eval set."""

from __future__ import annotations

from medusa_forge.errors import ForgeError
from medusa_forge.model.llama import Transformer
from medusa_forge.model.tokenizer import Tokenizer
from medusa_forge.prompts import read_prompts
from medusa_forge.train.config import TrainConfig
from medusa_forge.train.data import Example, count_targets, load_examples, split_examples
from medusa_forge.train.evaluate import encode_eval_prompts, prompt_continuations
from medusa_forge.train.self_distill import check_no_overlap, distill
from medusa_forge.train.source_prompts import HeldOut, source_prompts
from medusa_forge.train.trainer import say


def distill_prompts(cfg: TrainConfig, tok: Tokenizer, held_out: HeldOut) -> tuple[list[list[int]], dict]:
    """Token-id prompts for self-distillation from --prompts and/or --prompts-from-python-sources."""
    prompts: list[list[int]] = []
    info: dict = {}
    if cfg.prompts:
        texts = [p.prompt for p in read_prompts(cfg.prompts)]
        check_no_overlap(texts, held_out, cfg.prompts)
        prompts += [tok.encode(t) for t in texts]
        info["prompts_file"] = {"path": cfg.prompts, "prompts": len(texts)}
    if cfg.prompts_from_python_sources > 0:
        max_prompt = cfg.max_seq_len - cfg.distill_new_tokens
        ids, summary = source_prompts(
            cfg.prompts_from_python_sources,
            tok,
            held_out,
            roots=list(cfg.sources_roots) or None,
            min_tokens=min(32, max_prompt),
            max_tokens=max_prompt,
            seed=cfg.seed,
        )
        prompts += ids
        info["python_sources"] = summary
    return prompts, info


def prepare_data(
    cfg: TrainConfig,
    model: Transformer,
    tok: Tokenizer,
    *,
    pad_id: int,
    eos_ids: tuple[int, ...],
    distill_batch: int,
    eval_batch: int,
) -> tuple[list[Example], list[Example], list[Example], dict]:
    """(train, val, eval-prompt continuations, summary) for one run."""
    held_out = HeldOut.from_file(cfg.exclude_sources or cfg.eval_prompts)
    examples: list[Example] = []
    meta: dict = {"sources": {}}
    if cfg.data:
        file_examples = load_examples(cfg.data, tok, cfg.max_seq_len)
        examples += file_examples
        meta["sources"]["data"] = {
            "path": cfg.data,
            "examples": len(file_examples),
            "targets": count_targets(file_examples),
        }
    if cfg.self_distill:
        prompts, info = distill_prompts(cfg, tok, held_out)
        distilled, stats = distill(
            model,
            prompts,
            new_tokens=cfg.distill_new_tokens,
            max_seq_len=cfg.max_seq_len,
            samples_per_prompt=cfg.distill_samples_per_prompt,
            temperature=cfg.distill_temperature,
            batch_size=distill_batch,
            seed=cfg.seed,
            eos_ids=eos_ids,
            pad_id=pad_id,
            progress=cfg.progress,
        )
        examples += distilled
        say(
            f"self-distill: {stats.prompts} prompts x {stats.samples_per_prompt}, {stats.generated_tokens} tokens "
            f"in {stats.seconds:.1f} s ({stats.tokens_per_s:.0f} tok/s, {stats.eos_fraction:.0%} ended at EOS)"
        )
        meta["sources"]["self_distill"] = info | stats.to_dict() | {"examples": len(distilled)}
    if not examples:
        raise ForgeError("no training examples")
    train, val = split_examples(examples, cfg.val_fraction, cfg.seed)
    eval_examples: list[Example] = []
    if cfg.eval_prompts:
        limit = model.config.max_position_embeddings - cfg.eval_new_tokens
        eval_prompts = encode_eval_prompts(tok, cfg.eval_prompts, limit)
        eval_examples = prompt_continuations(
            model,
            eval_prompts,
            new_tokens=cfg.eval_new_tokens,
            batch_size=eval_batch,
            eos_ids=eos_ids,
            pad_id=pad_id,
            progress=cfg.progress,
        )
        meta["eval_prompts"] = {
            "path": cfg.eval_prompts,
            "prompts": len(eval_examples),
            "targets": count_targets(eval_examples),
            "new_tokens": cfg.eval_new_tokens,
        }
    meta |= {
        "train_examples": len(train),
        "val_examples": len(val),
        "train_targets": count_targets(train),
        "val_targets": count_targets(val),
        "train_tokens": sum(len(ex.ids) for ex in train),
    }
    return train, val, eval_examples, meta
