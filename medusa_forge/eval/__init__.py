"""Evaluation and promotion: MMLU regression and per-topic speed against the base, through Triton.

Modules, one job each: ``mmlu_data`` (MMLU on disk), ``mmlu`` (prompts, answers, scores),
``speed`` (side-by-side timing), ``backends`` (Triton gRPC or an in-process engine), ``cache``
(resumable partial results), ``runs`` (one command's run), ``report`` + ``plots`` (report.md/json,
PNGs) and ``promote`` (gates, registry, rollback). ``cli`` wires them to ``medusa-forge``.
"""
