"""``train-heads``: Medusa-1 heads on a frozen base model, with self-distillation and a quality report.

Pipeline, one module each: ``data`` (JSONL -> token examples), ``source_prompts`` (prompts cut from
Python sources), ``base`` (the frozen decoder: hidden states and batched decoding),
``self_distill`` (the base writes its own targets), ``loss`` (the Medusa-1 objective),
``checkpoint`` (resumable state), ``trainer`` (the loop), ``evaluate`` (head accuracy, acceptance),
``report`` (JSON/Markdown/PNG), ``cli``.
"""
