"""TrainConfig: every knob of one ``train-heads`` run, validated before any work starts.

Defaults follow the Medusa-1 recipes (FasterDecoding/Medusa README and the SageMaker recipe in
../shared/seeds/000_*: 5 heads, 1 ResBlock, frozen base, heads coefficient 0.2, decay 0.8,
max_seq_len 256); the learning rate is the FasterDecoding one (1e-3) rather than SageMaker's 1e-4,
since only the small heads train.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from medusa_forge.errors import ForgeError
from medusa_forge.heads.checkpoint import MAX_HEADS

MAX_LAYERS = 8
SCHEDULES = ("cosine", "constant")


@dataclass
class TrainConfig:
    model: str
    out: str
    data: str | None = None
    self_distill: bool = False
    prompts: str | None = None
    prompts_from_python_sources: int = 0
    sources_roots: tuple[str, ...] = ()
    exclude_sources: str | None = None
    distill_new_tokens: int = 128
    distill_samples_per_prompt: int = 1
    distill_temperature: float = 0.0
    distill_batch_size: int = 0  # 0: 512 on CUDA, 16 on CPU
    num_heads: int = 5
    num_layers: int = 1
    shared_lm_head: bool = False
    epochs: int = 3
    max_steps: int = 0  # 0: epochs decide
    max_train_minutes: float = 0.0  # 0: no limit; else stop (and still evaluate and save) after this long
    lr: float = 1e-3
    schedule: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_seq_len: int = 256
    batch_size: int = 8
    heads_coefficient: float = 0.2
    decay_coefficient: float = 0.8
    val_fraction: float = 0.05
    eval_every: int = 0  # steps; 0: about ten evaluations per run
    eval_prompts: str | None = None
    eval_new_tokens: int = 128
    eval_acceptance: int = 0  # prompts decoded by the native engine with eval_tree; 0: skip
    eval_tree: str = "mc_sim_7b_63"
    device: str | None = None
    bf16: bool | None = None  # None: on for CUDA
    save_every: int = 0  # steps; 0: once per epoch
    log_every: int = 10
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    progress: bool = True

    @property
    def checkpoint_dir(self) -> Path:
        """Resumable state lives beside the output: ``<out>.ckpt`` (the output itself stays clean)."""
        out = Path(self.out).absolute()
        return out.parent / f"{out.name}.ckpt"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sources_roots"] = list(self.sources_roots)
        return d

    def validate(self) -> None:
        """Raise one ForgeError line for the first invalid setting."""
        if not 1 <= self.num_heads <= MAX_HEADS:
            raise ForgeError(f"--num-heads {self.num_heads} is out of range (1..{MAX_HEADS})")
        if not 0 <= self.num_layers <= MAX_LAYERS:
            raise ForgeError(f"--num-layers {self.num_layers} is out of range (0..{MAX_LAYERS})")
        if self.data is None and not self.self_distill:
            raise ForgeError(
                "no training data: give --data FILE, or --self-distill with --prompts FILE "
                "and/or --prompts-from-python-sources N"
            )
        if self.self_distill and not self.prompts and self.prompts_from_python_sources <= 0:
            raise ForgeError("--self-distill needs prompts: --prompts FILE and/or --prompts-from-python-sources N")
        if not self.self_distill and (self.prompts or self.prompts_from_python_sources):
            raise ForgeError("--prompts/--prompts-from-python-sources are self-distillation inputs; add --self-distill")
        if self.max_seq_len < 8:
            raise ForgeError(f"--max-seq-len {self.max_seq_len} is too short (at least 8 tokens)")
        if self.self_distill and self.distill_new_tokens >= self.max_seq_len:
            raise ForgeError(
                f"--distill-new-tokens {self.distill_new_tokens} leaves no room for the prompt "
                f"within --max-seq-len {self.max_seq_len}"
            )
        checks = [
            (self.distill_new_tokens >= 1, "--distill-new-tokens must be >= 1"),
            (self.distill_samples_per_prompt >= 1, "--distill-samples-per-prompt must be >= 1"),
            (self.distill_temperature >= 0, "--distill-temperature must be >= 0"),
            (
                self.distill_samples_per_prompt == 1 or self.distill_temperature > 0,
                "--distill-samples-per-prompt > 1 needs --distill-temperature > 0 (greedy samples are identical)",
            ),
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.max_steps >= 0, "--max-steps must be >= 0"),
            (self.max_train_minutes >= 0, "--max-train-minutes must be >= 0"),
            (self.lr > 0, "--lr must be > 0"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}"),
            (0 <= self.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.heads_coefficient > 0, "--heads-coefficient must be > 0"),
            (0 < self.decay_coefficient <= 1, "--decay-coefficient must be in (0, 1]"),
            (0 <= self.val_fraction < 1, "--val-fraction must be in [0, 1)"),
            (self.eval_new_tokens >= 2, "--eval-new-tokens must be >= 2"),
            (self.eval_acceptance >= 0, "--eval-acceptance must be >= 0"),
            (self.eval_acceptance == 0 or self.eval_prompts, "--eval-acceptance needs --eval-prompts FILE"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ForgeError(msg)
