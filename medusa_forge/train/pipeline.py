"""``train_heads(cfg)``: one run from flags to a heads directory, resumable and atomic.

Order of work: check every input that can be checked cheaply (flags, output dir, checkpoint
state) -> load the base -> prepare or reload the data -> train (checkpointing to ``<out>.ckpt``)
-> write heads, report and loss curve into a temporary sibling of ``--out`` and rename it into
place. A failure at any point leaves no ``--out`` behind; an interruption after data preparation
leaves a checkpoint that ``--resume`` continues.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from medusa_forge.atomic import atomic_output_dir
from medusa_forge.errors import ForgeError
from medusa_forge.heads.checkpoint import load_heads, save_heads
from medusa_forge.heads.medusa_head import MedusaHeads, MedusaHeadsConfig
from medusa_forge.model.checkpoint import load_hf_model
from medusa_forge.model.dtypes import TORCH_DTYPES
from medusa_forge.model.tokenizer import Tokenizer
from medusa_forge.train import checkpoint as ckpt_io
from medusa_forge.train.config import TrainConfig
from medusa_forge.train.evaluate import acceptance_length, evaluate_heads
from medusa_forge.train.prepare import prepare_data
from medusa_forge.train.report import build_report, write_report
from medusa_forge.train.trainer import LoopState, make_optimizer, say, total_steps, train_loop
from medusa_forge.tree.choice_tree import ChoiceTree


def resolve_runtime(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    """cuda when available; the frozen base in bf16 on CUDA (or with --bf16), fp32 otherwise."""
    dev = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ForgeError("--device cuda requested but no CUDA device is available")
    bf16 = cfg.bf16 if cfg.bf16 is not None else dev.type == "cuda"
    return dev, torch.bfloat16 if bf16 else torch.float32


def _preflight(cfg: TrainConfig) -> None:
    out, ckpt = Path(cfg.out), cfg.checkpoint_dir
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        raise ForgeError(f"output directory {out} is not empty; pass --overwrite to replace it")
    has_ckpt = (ckpt / ckpt_io.STATE_FILE).is_file() or (ckpt / ckpt_io.DATA_FILE).is_file()
    if cfg.resume and not has_ckpt:
        raise ForgeError(f"--resume: no checkpoint found at {ckpt}")
    if has_ckpt and not cfg.resume and not cfg.overwrite:
        raise ForgeError(
            f"a checkpoint of an earlier run exists at {ckpt}; pass --resume to continue it "
            "or --overwrite to start over"
        )
    if cfg.eval_acceptance:
        ChoiceTree.parse(cfg.eval_tree).check_heads(cfg.num_heads)


def heads_as(heads: MedusaHeads, dtype: torch.dtype, device) -> MedusaHeads:
    """A detached copy of ``heads`` in another dtype/device (what gets saved or served)."""
    with torch.device("meta"):
        copy = MedusaHeads(heads.config)
    copy.load_state_dict(
        {k: v.detach().to(device=device, dtype=dtype) for k, v in heads.state_dict().items()}, assign=True
    )
    return copy.eval().requires_grad_(False)


def train_heads(cfg: TrainConfig) -> dict:
    """Train, evaluate and write Medusa heads; returns the report that was written."""
    t_start = time.perf_counter()
    cfg.validate()
    _preflight(cfg)
    dev, dtype = resolve_runtime(cfg)
    torch.manual_seed(cfg.seed)
    model = load_hf_model(cfg.model, dtype=dtype, device=dev)
    tok = Tokenizer(cfg.model)
    mc = model.config
    tok.check_fits(mc.vocab_size)
    if cfg.max_seq_len > mc.max_position_embeddings:
        raise ForgeError(
            f"--max-seq-len {cfg.max_seq_len} exceeds the model's max_position_embeddings "
            f"({mc.max_position_embeddings})"
        )
    heads_cfg = MedusaHeadsConfig(
        cfg.num_heads,
        cfg.num_layers,
        mc.hidden_size,
        mc.vocab_size,
        shared_lm_head=cfg.shared_lm_head,
        base_model_name_or_path=str(cfg.model),
    )
    ckpt = cfg.checkpoint_dir
    saved = ckpt_io.load_state(ckpt) if cfg.resume else None
    if saved is not None:
        ckpt_io.check_resumable(saved, heads_cfg, ckpt)
    data = ckpt_io.load_data(ckpt) if cfg.resume else None
    if not cfg.resume and ckpt.exists():
        shutil.rmtree(ckpt)  # --overwrite: the old run's state goes
    eos_ids = tuple(mc.eos_token_ids)
    pad_id = tok.hf.pad_token_id if tok.hf.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    gen_batch = cfg.distill_batch_size or (512 if dev.type == "cuda" else 16)
    amp = dtype == torch.bfloat16
    if data is None:
        t0 = time.perf_counter()
        train, val, evals, meta = prepare_data(
            cfg, model, tok, pad_id=pad_id, eos_ids=eos_ids, distill_batch=gen_batch, eval_batch=gen_batch
        )
        meta["prepare_seconds"] = round(time.perf_counter() - t0, 3)
        ckpt_io.save_data(ckpt, train, val, evals, meta)
    else:
        train, val, evals, meta = data
        say(f"resuming from {ckpt}: prepared data reused")
    say(
        f"data: {meta['train_examples']} train / {meta['val_examples']} val examples, {meta['train_targets']} "
        f"train targets, {len(evals)} eval sequences; prepared in {meta.get('prepare_seconds', 0):.1f} s"
    )

    heads = MedusaHeads.from_lm_head(heads_cfg, model.lm_head.weight.float())
    opt = make_optimizer(heads, cfg)
    loop = LoopState()
    if saved is not None:
        heads.load_state_dict({k: v.to(dev) for k, v in saved["heads"].items()})
        opt.load_state_dict(saved["optimizer"])
        loop = LoopState(**saved["loop"])

    def evaluate() -> dict:
        row = {}
        for name, examples in (("val", val), ("eval_prompts", evals)):
            if examples:
                row[name] = evaluate_heads(
                    model, heads, examples, batch_size=cfg.batch_size, pad_id=pad_id, amp=amp
                ).to_dict()
        return row

    def save() -> None:
        ckpt_io.save_state(
            ckpt,
            {
                "heads_config": heads_cfg.to_dict(),
                "heads": {k: v.detach().cpu() for k, v in heads.state_dict().items()},
                "optimizer": opt.state_dict(),
                "loop": loop.to_dict(),
                "config": cfg.to_dict(),
            },
        )

    if loop.step >= total_steps(cfg, len(train)) and not loop.evals:
        loop.evals.append({"step": loop.step, **evaluate()})
    train_loop(model, heads, opt, train, cfg, loop, amp=amp, pad_id=pad_id, evaluate=evaluate, save=save)

    save_dtype = TORCH_DTYPES.get(mc.torch_dtype, torch.float32)
    with atomic_output_dir(cfg.out, overwrite=cfg.overwrite) as tmp:
        save_heads(heads_as(heads, save_dtype, "cpu"), tmp)
        acceptance = None
        if cfg.eval_acceptance:
            served = load_heads(tmp, mc.hidden_size, mc.vocab_size, dtype=dtype, device=dev)
            prompts = [ex.ids[: ex.prompt_len].tolist() for ex in evals[: cfg.eval_acceptance]]
            acceptance = acceptance_length(
                model, served, tok, prompts, tree=cfg.eval_tree, new_tokens=cfg.eval_new_tokens
            )
        report = build_report(
            cfg,
            heads_cfg,
            meta,
            loop,
            acceptance,
            device=str(dev),
            dtype=str(dtype).split(".")[-1],
            saved_dtype=str(save_dtype).split(".")[-1],
            wall_seconds=time.perf_counter() - t_start,
        )
        write_report(tmp, report)
    return report
